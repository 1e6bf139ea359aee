"""Turn trajectories into model inputs for the learner (no Ray here).

Trajectories keep one <|image_pad|> per image; the model needs one per merged 28x28 patch. The
image processor gives each image's grid, the pads are expanded to match, and the loss mask,
behaviour log-probs and advantages are expanded alongside (0 on the inserted pads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainSample:
    """What the learner needs of a trajectory (images as uint8 arrays, as the model saw them)."""

    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    images: list[np.ndarray]
    advantage: float


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
    """Expanded (token_ids, loss_mask, behaviour_logprobs) with each pad repeated per image token."""
    ids, mask, logprobs = [], [], []
    image_index = 0
    for token, m, lp in zip(sample.token_ids, sample.loss_mask, sample.behaviour_logprobs):
        if token == image_pad_id:
            if image_index >= len(tokens_per_image):
                raise ValueError("more image pads than images in a trajectory")
            count = tokens_per_image[image_index]
            image_index += 1
            ids.extend([token] * count)
            mask.extend([0] * count)
            logprobs.extend([0.0] * count)
        else:
            ids.append(token)
            mask.append(m)
            logprobs.append(lp)
    if image_index != len(tokens_per_image):
        raise ValueError(f"{len(tokens_per_image)} images but {image_index} image pads in a trajectory")
    return ids, mask, logprobs


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
        input_ids[row, :n] = torch.tensor(ids)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(m, dtype=torch.float32)
        old[row, :n] = torch.tensor(lp, dtype=torch.float32)
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
