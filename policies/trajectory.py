"""The one record that flows between roles: a Trajectory (no Ray in here).

Token ids keep ONE <|image_pad|> per image (vLLM and the learner expand it from the image's
grid); `loss_mask` is 1 on tokens the policy sampled and 0 on prompt and observation tokens;
`behaviour_logprobs` are the engine's log-probs of the sampled tokens (0 where the mask is 0).

The three token columns are typed arrays (`array.array`: int32 ids, int8 mask, float32 log-probs;
vLLM's log-probs are float32, so nothing is rounded), not lists: a trajectory crosses Ray from its
engine to the driver and on to a learner, and a list of Python numbers pickles one object per
token, an array as one block of bytes (the driver's CPU per trajectory: 0.32 ms with lists, 0.19
with arrays; `benchmarks/pipeline.py` part a). Arrays grow in place like lists, and numpy reads
them without a copy (`np.asarray`).
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOKEN_TYPECODE, MASK_TYPECODE, LOGPROB_TYPECODE = "i", "b", "f"


def token_array(values: Sequence[int] = ()) -> array:
    """Token ids as a trajectory stores them (convert a shared prompt once; extending from it copies bytes)."""
    return _column(TOKEN_TYPECODE, values)


def _column(typecode: str, values: Sequence) -> array:
    """`values` as an array of `typecode`: itself if it is one already, else converted."""
    if isinstance(values, array) and values.typecode == typecode:
        return values
    column = array(typecode)
    _append(column, values)
    return column


def _append(column: array, values: Sequence) -> None:
    if isinstance(values, array) and values.typecode == column.typecode:
        column.extend(values)  # a block copy
    else:
        column.fromlist(values if isinstance(values, list) else list(values))


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
    token_ids: array = field(default_factory=lambda: array(TOKEN_TYPECODE))
    loss_mask: array = field(default_factory=lambda: array(MASK_TYPECODE))
    behaviour_logprobs: array = field(default_factory=lambda: array(LOGPROB_TYPECODE))
    images: list[np.ndarray] = field(default_factory=list)  # what the model saw, HxWx3 uint8, in pad order
    response_text: str = ""  # every assistant turn, concatenated (answers are read from it)
    visual_operations: list[VisualOperation] = field(default_factory=list)
    finish_reason: str = ""
    policy_version: int = 0
    rewards: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # columns given as lists (tests, hand-made records) become arrays
        self.token_ids = _column(TOKEN_TYPECODE, self.token_ids)
        self.loss_mask = _column(MASK_TYPECODE, self.loss_mask)
        self.behaviour_logprobs = _column(LOGPROB_TYPECODE, self.behaviour_logprobs)

    def extend(self, token_ids: Sequence[int], trainable: bool, logprobs: Sequence[float] | None = None) -> None:
        """Append a segment; sampled (trainable) segments carry the engine's log-probs."""
        if trainable and (logprobs is None or len(logprobs) != len(token_ids)):
            raise ValueError("a trainable segment needs one behaviour log-prob per token")
        count = len(token_ids)
        _append(self.token_ids, token_ids)
        self.loss_mask.frombytes((b"\x01" if trainable else b"\x00") * count)
        if trainable:
            _append(self.behaviour_logprobs, logprobs)
        else:
            self.behaviour_logprobs.frombytes(bytes(count * self.behaviour_logprobs.itemsize))  # 0.0

    @property
    def num_visual_operations(self) -> int:
        return len(self.visual_operations)

    @property
    def last_operation_failed(self) -> bool:
        return bool(self.visual_operations) and not self.visual_operations[-1].ok

    @property
    def num_response_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_mask))


def rewarded_operations(trajectory: Trajectory, max_crop_area: float = 1.0, count_failed: bool = True) -> int:
    """The visual operations the reward counts (curiosity bonus, efficiency penalty): all of them
    (the paper's n_vo), less crops covering more than `max_crop_area` of their image and, unless
    `count_failed`, calls that returned an execution error. Either pays the curiosity bonus for
    seeing nothing new, and RL learned both: whole-image crops, then malformed calls that never
    reach an answer (benchmarks/LEARNING.md, "A checked warm start")."""
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
