"""Turn trajectories into model inputs for the learner (no Ray here).

Trajectories keep one <|image_pad|> per image; the model needs one per merged 28x28 patch. The
image processor gives each image's grid, the pads are expanded to match, and the loss mask,
behaviour log-probs and advantages are expanded alongside (0 on the inserted pads).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class TrainSample:
    """What the learner needs of a trajectory (images as uint8 arrays, as the model saw them).

    The token columns are any sequences: the pipeline passes a trajectory's typed arrays as they
    are (built on the engine, `policies/trajectory.py`; nothing is converted on the driver), SFT
    passes lists; learner-side code reads them through `np.asarray`."""

    token_ids: Sequence[int]
    loss_mask: Sequence[int]  # 1 on trained tokens
    behaviour_logprobs: Sequence[float]
    images: list[np.ndarray]
    advantage: float

    def __post_init__(self):
        if not len(self.token_ids) == len(self.loss_mask) == len(self.behaviour_logprobs):
            raise ValueError(f"a sample's token_ids, loss_mask and behaviour_logprobs differ in length "
                             f"({len(self.token_ids)}, {len(self.loss_mask)}, {len(self.behaviour_logprobs)})")

    @property
    def num_trained_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_mask))


def mini_batch_count(kept: int, samples_per_step: int, updates_per_step: int, fixed_mini_batch: bool) -> int:
    """Optimizer steps for a step that kept `kept` of its planned `samples_per_step` samples:
    `updates_per_step`, or with `fixed_mini_batch` as many as the kept samples fill shares of
    samples_per_step / updates_per_step (rounded up), at most `updates_per_step` and at least 1."""
    if not fixed_mini_batch:
        return updates_per_step
    share = math.ceil(samples_per_step / updates_per_step)
    return max(1, min(updates_per_step, math.ceil(kept / share)))


def mini_batches(samples: list, count: int) -> list[list]:
    """`samples` in at most `count` mini-batches of near-equal size, strided so that each holds
    samples of every prompt group (a step's samples arrive grouped by prompt); none empty."""
    return [batch for batch in (samples[start::count] for start in range(count)) if batch]


@dataclass
class ModelBatch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel_values, image_grid_thw
    targets: torch.Tensor  # (batch, length-1) the next token at each position
    loss_mask: torch.Tensor  # (batch, length-1)
    old_logprobs: torch.Tensor  # (batch, length-1)
    advantages: torch.Tensor  # (batch, length-1)


def expand_image_pads(sample: TrainSample, image_pad_id: int, tokens_per_image: list[int]):
    """Expanded (token_ids, loss_mask, behaviour_logprobs) arrays with each pad repeated per image
    token (masked, log-prob 0)."""
    token_ids = np.asarray(sample.token_ids, dtype=np.int64)
    is_pad = token_ids == image_pad_id
    pads = int(is_pad.sum())
    if pads != len(tokens_per_image):
        raise ValueError(f"{len(tokens_per_image)} images but {pads} image pads in a trajectory")
    repeats = np.ones(len(is_pad), dtype=np.int64)
    repeats[is_pad] = tokens_per_image
    mask = np.asarray(sample.loss_mask, dtype=np.float32)
    logprobs = np.asarray(sample.behaviour_logprobs, dtype=np.float32)
    return (np.repeat(token_ids, repeats), np.repeat(np.where(is_pad, 0.0, mask), repeats),
            np.repeat(np.where(is_pad, 0.0, logprobs), repeats))


def collate(samples: list[TrainSample], image_processor, image_pad_id: int, pad_id: int) -> ModelBatch:
    """Right-padded batch for a Qwen-VL forward pass plus the per-token loss inputs."""
    from PIL import Image

    merge = getattr(image_processor, "merge_size", 2)
    all_images = [Image.fromarray(image) for s in samples for image in s.images]
    vision: dict[str, torch.Tensor] = {}
    tokens_per_image: list[int] = []
    if all_images:
        processed = image_processor(images=all_images, return_tensors="pt")
        vision = {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}
        tokens_per_image = [int(g.prod()) // (merge * merge) for g in processed["image_grid_thw"]]
    rows, offset = [], 0
    for sample in samples:
        count = len(sample.images)
        rows.append(expand_image_pads(sample, image_pad_id, tokens_per_image[offset:offset + count]))
        offset += count
    length = max(len(ids) for ids, _, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.float32)
    old = torch.zeros((batch, length), dtype=torch.float32)
    for row, (ids, m, lp) in enumerate(rows):
        n = len(ids)
        input_ids[row, :n] = torch.from_numpy(ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.from_numpy(m)
        old[row, :n] = torch.from_numpy(lp)
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)[:, None].expand(batch, length - 1)
    # Marks the image tokens (1) for transformers' Qwen2.5-VL: without it, its forward silently
    # falls back to 1-D text positions for the whole sequence instead of the 3-D M-RoPE positions
    # (time, row, column) that vLLM gives image tokens, so learner and engine would disagree on
    # every token after an image.
    token_types = (input_ids == image_pad_id).to(torch.int32)
    return ModelBatch(
        inputs={"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": token_types, **vision},
        targets=input_ids[:, 1:],
        loss_mask=mask[:, 1:],
        old_logprobs=old[:, 1:],
        advantages=advantages.contiguous(),
    )


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) at each position from logits (batch, length, vocab) -> (batch, length-1)."""
    shifted = logits[:, :-1].float() / temperature
    return torch.log_softmax(shifted, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
