"""The one record that flows between roles: a Trajectory (no Ray in here).

Token ids keep ONE <|image_pad|> per image (vLLM and the learner expand it from the image's
grid); `loss_mask` is 1 on tokens the policy sampled and 0 on prompt and observation tokens;
`behaviour_logprobs` are the engine's log-probs of the sampled tokens (0 where the mask is 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class VisualOperation:
    name: str | None
    ok: bool
    error_kind: str | None = None
    target_image: int | None = None
    box_pixels: tuple[int, int, int, int] | None = None
    frames: list[int] | None = None
    source_size: tuple[int, int] | None = None  # (width, height) of the image the box is in

    @property
    def area_fraction(self) -> float | None:
        """Share of its source image a crop covers (1.0: the whole image, no zoom); None if unknown."""
        if self.box_pixels is None or not self.source_size:
            return None
        left, top, right, bottom = self.box_pixels
        return (right - left) * (bottom - top) / (self.source_size[0] * self.source_size[1])


@dataclass
class Trajectory:
    qid: str
    sample_index: int  # which of the G samples of this prompt
    answers: tuple[str, ...]
    is_video: bool = False
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)  # what the model saw, HxWx3 uint8, in pad order
    response_text: str = ""  # every assistant turn, concatenated (answers are read from it)
    visual_operations: list[VisualOperation] = field(default_factory=list)
    finish_reason: str = ""
    policy_version: int = 0
    rewards: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def extend(self, token_ids: list[int], trainable: bool, logprobs: list[float] | None = None) -> None:
        """Append a segment; sampled (trainable) segments carry the engine's log-probs."""
        if trainable and (logprobs is None or len(logprobs) != len(token_ids)):
            raise ValueError("a trainable segment needs one behaviour log-prob per token")
        self.token_ids.extend(token_ids)
        self.loss_mask.extend([int(trainable)] * len(token_ids))
        self.behaviour_logprobs.extend(logprobs if trainable else [0.0] * len(token_ids))

    @property
    def num_visual_operations(self) -> int:
        return len(self.visual_operations)

    @property
    def last_operation_failed(self) -> bool:
        return bool(self.visual_operations) and not self.visual_operations[-1].ok

    @property
    def num_response_tokens(self) -> int:
        return sum(self.loss_mask)


def rewarded_operations(trajectory: Trajectory, max_crop_area: float = 1.0, count_failed: bool = True) -> int:
    """The visual operations the reward counts (curiosity bonus, efficiency penalty): all of them
    (the paper's n_vo), less crops covering more than `max_crop_area` of their image and, unless
    `count_failed`, calls that returned an execution error. Either pays the curiosity bonus for
    seeing nothing new, and RL learned both: whole-image crops, then malformed calls that never
    reach an answer (README, "Learning demonstration")."""
    return sum(1 for op in trajectory.visual_operations
               if (op.ok or count_failed) and (op.area_fraction is None or op.area_fraction <= max_crop_area + 1e-9))


def crop_hits(trajectory: Trajectory, gold_box: Any, image_size: tuple[int, int]) -> list[bool]:
    """For each successful crop of the prompt's image (`target_image` 1) in `trajectory`: does its
    box contain the centre of `gold_box`, the normalized [x1, y1, x2, y2] of what the question asks
    about in an image of `image_size` (width, height)? Tells a model that zooms at the answer from
    one that zooms anywhere (RaPR counts both)."""
    x1, y1, x2, y2 = (float(v) for v in gold_box)
    centre_x, centre_y = (x1 + x2) / 2 * image_size[0], (y1 + y2) / 2 * image_size[1]
    hits = []
    for op in trajectory.visual_operations:
        if op.ok and op.box_pixels is not None and op.target_image in (None, 1):
            left, top, right, bottom = op.box_pixels
            hits.append(left <= centre_x <= right and top <= centre_y <= bottom)
    return hits
