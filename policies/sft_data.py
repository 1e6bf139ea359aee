"""Warm-start SFT data: the Pixel Reasoner SFT format, and traces generated for the synthetic task.

Both produce `SFTExample`s in EXACTLY the token layout of an RL rollout (policies/episode.py):

    prompt_token_ids(...)                       system + user (image pads, question) + "assistant\\n"
    assistant turn 1 (text, ends </tool_call>)  trained
    observation_token_ids(...)                  "<|im_end|>" (trained) + user turn with the
                                                observation + "<|im_start|>assistant\\n" (masked)
    ...
    final assistant turn + "<|im_end|>"         trained

so SFT teaches the policy the very token sequences RL will sample and condition on. One
<|image_pad|> per image (the learner's collate expands it), images resized to their role's pixel
budget (original / crop / frame) as the model sees them in RL. The loss mask is 1 exactly on the
assistant turns' tokens and each turn's closing <|im_end|> (RL never trains the <|im_end|> after
a </tool_call>, since generation stops at the tag; training it is harmless and is what the public
SFT code does); 0 on the prompt, the observations and every image pad.

Pure: no Ray, no torch (transformers' resize rounding and a tokenizer are used).
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from PIL import Image

from policies.batching import TrainSample
from policies.episode import IMAGE_PLACEHOLDER, derive_seed, observation_token_ids, prompt_token_ids
from policies.protocol import CROP_TOOL, TOOL_SYSTEM_PROMPT, SelectFramesCall, parse_tool_call
from policies.synthetic import (REGIONS, SyntheticZoomSpec, ZoomExample, closeup_question, draw_example,
                                likeliest_answer, region_box)
from policies.visual_ops import ImageRole, Observation, PixelBudgets, resize_to_budget, run_turn

logger = logging.getLogger(__name__)

IM_END = "<|im_end|>"


@dataclass
class SFTExample:
    """One training conversation in the RL token layout."""

    token_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (incl. their closing <|im_end|>), else 0
    images: list[np.ndarray]  # HxWx3 uint8 as the model sees them, one per <|image_pad|>, in order
    qid: str = ""
    kind: str = ""  # "pixel_reasoner", or generated: "zoom", "zoom_miss", "zoom_error", "zoom_misdirected", "direct", "closeup"
    assistant_text: str = ""  # the assistant turns, "\n"-joined (diagnostics, tests)
    metadata: dict[str, Any] = field(default_factory=dict)

    def train_sample(self) -> TrainSample:
        return TrainSample(list(self.token_ids), list(self.loss_mask), [0.0] * len(self.token_ids),
                           list(self.images), 0.0)

    def engine_length(self, patch: int = 28) -> int:
        """Length as the engine and the model count it: each pad expands to one token per patch x patch block."""
        return len(self.token_ids) + sum((i.shape[1] // patch) * (i.shape[0] // patch) - 1 for i in self.images)

    @property
    def num_trained_tokens(self) -> int:
        return sum(self.loss_mask)


class _Builder:
    """Appends segments in the RL layout: a prompt, then assistant turns and observations."""

    def __init__(self, tokenizer, prompt_ids: list[int], images: list[Image.Image]):
        self.tokenizer = tokenizer
        self.im_end = tokenizer.convert_tokens_to_ids(IM_END)
        self.token_ids, self.loss_mask = list(prompt_ids), [0] * len(prompt_ids)
        self.images = [_as_array(i) for i in images]
        self.turns: list[str] = []
        self.open_turn = False  # an assistant turn whose <|im_end|> is still to come

    def assistant(self, text: str) -> None:
        if self.open_turn:
            raise ValueError("two assistant turns in a row")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.token_ids += ids
        self.loss_mask += [1] * len(ids)
        self.turns.append(text)
        self.open_turn = True

    def observation(self, ids: list[int], images: Sequence[Image.Image]) -> None:
        """A user turn from `observation_token_ids`-style ids: "<|im_end|>" (closing the assistant
        turn: trained) then the user turn and the next assistant header (masked)."""
        if not self.open_turn or not ids or ids[0] != self.im_end:
            raise ValueError("an observation must follow an assistant turn and start with <|im_end|>")
        self.token_ids += ids
        self.loss_mask += [1] + [0] * (len(ids) - 1)
        self.images += [_as_array(i) for i in images]
        self.open_turn = False

    def finish(self, **fields) -> SFTExample:
        if not self.open_turn:
            raise ValueError("a conversation must end with an assistant turn")
        self.token_ids.append(self.im_end)
        self.loss_mask.append(1)
        self.open_turn = False
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if self.token_ids.count(pad) != len(self.images):
            raise ValueError(f"{self.token_ids.count(pad)} image pads but {len(self.images)} images")
        return SFTExample(self.token_ids, self.loss_mask, self.images, assistant_text="\n".join(self.turns), **fields)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else np.asarray(image.convert("RGB"))


# --------------------------------------------------------------------------------------------
# The Pixel Reasoner SFT format
# --------------------------------------------------------------------------------------------

class SFTFormatError(ValueError):
    """A record that does not fit the Pixel Reasoner SFT format (the message names the problem)."""


def load_sft_records(path: str | Path) -> list[dict]:
    """The records of a Pixel Reasoner SFT file: a JSON list (or JSON lines) of objects with `message_list`."""
    path = Path(path)
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    elif stripped.startswith("{") and "\n" in stripped.strip():
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    if not all(isinstance(r, dict) for r in records):
        raise SFTFormatError(f"{path}: expected a list of objects")
    return records


def read_sft_json(
    path: str | Path,
    tokenizer,
    budgets: PixelBudgets,
    image_root: str | Path | None = None,
    system_prompt: str | None = TOOL_SYSTEM_PROMPT,
    strict: bool = True,
) -> list[SFTExample]:
    """Examples from a Pixel Reasoner SFT file (`message_list` records).

    Media paths are resolved against `image_root` (default: the file's folder); absolute paths and
    `file://` URIs are used as they are. `system_prompt` replaces the data's system message (by
    default our tool protocol, so SFT and RL share a prompt; None keeps the data's). With
    `strict=False` a bad record is skipped with a warning instead of raising.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    examples = []
    for index, record in enumerate(load_sft_records(path)):
        qid = str(record.get("qid") or record.get("id") or f"{path.stem}-{index}")
        try:
            messages = record.get("message_list")
            if messages is None:
                raise SFTFormatError("no message_list")
            examples.append(convert_messages(messages, tokenizer, budgets, root, system_prompt, qid=qid))
        except (SFTFormatError, OSError, ValueError) as error:
            if strict:
                raise SFTFormatError(f"{path} record {index} ({qid}): {error}") from error
            logger.warning("skipping SFT record %d (%s): %s", index, qid, error)
    return examples


def convert_messages(
    messages: list[dict],
    tokenizer,
    budgets: PixelBudgets,
    media_root: str | Path = ".",
    system_prompt: str | None = TOOL_SYSTEM_PROMPT,
    qid: str = "",
) -> SFTExample:
    """One Qwen message list -> an SFTExample in the RL layout.

    The conversation is: optional system; a user turn (images / a video / text, in any order);
    then assistant and user turns alternating, ending with an assistant turn. Images of the first
    user turn get the original budget; images of later user turns (tool observations) the crop
    budget, or the frame budget after a select_frames call. A video (a list of frame files, or a
    video file) is shown as its frames, each an image at the frame budget (at most
    `budgets.num_video_frames`, sampled evenly), the way select_frames returns frames.
    """
    if not isinstance(messages, list) or not messages:
        raise SFTFormatError("message_list must be a non-empty list")
    messages = list(messages)
    system = None
    if messages[0].get("role") == "system":
        system = _text_of(messages.pop(0), "system")
    if system_prompt is not None:
        system = system_prompt
    if not messages or messages[0].get("role") != "user":
        raise SFTFormatError("the first non-system message must be the user's")
    while messages and messages[-1].get("role") == "user":  # nothing to learn after the last assistant turn
        messages.pop()
    if len(messages) < 2:
        raise SFTFormatError("no assistant turn")
    root = Path(media_root)

    first_items, first_images = _user_items(messages[0], root, budgets, "original")
    chat = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": [{"type": "image"} if kind == "image" else {"type": "text", "text": value}
                                     for kind, value in first_items]}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    builder = _Builder(tokenizer, tokenizer.encode(text, add_special_tokens=False), first_images)

    previous_role = "user"
    last_assistant = ""
    for message in messages[1:]:
        role = message.get("role")
        if role == "assistant":
            if previous_role == "assistant":
                raise SFTFormatError("two assistant messages in a row")
            last_assistant = _text_of(message, "assistant")
            builder.assistant(last_assistant)
        elif role == "user":
            if previous_role == "user":
                raise SFTFormatError("two user messages in a row")
            call = parse_tool_call(last_assistant)
            role_of_images: ImageRole = "frame" if isinstance(call, SelectFramesCall) else "crop"
            items, images = _user_items(message, root, budgets, role_of_images)
            rendered = "".join(IMAGE_PLACEHOLDER if kind == "image" else value for kind, value in items)
            ids = tokenizer.encode(IM_END + "\n<|im_start|>user\n" + rendered + IM_END + "\n<|im_start|>assistant\n",
                                   add_special_tokens=False)
            builder.observation(ids, images)
        else:
            raise SFTFormatError(f"unexpected role {role!r}")
        previous_role = role
    return builder.finish(qid=qid, kind="pixel_reasoner")


def _text_of(message: dict, role: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SFTFormatError(f"{role} content must be a string or a list")
    texts = []
    for item in content:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and "text" in item:
            texts.append(str(item["text"]))
        else:
            raise SFTFormatError(f"{role} content may only hold text, got {sorted(item) if isinstance(item, dict) else item!r}")
    return "".join(texts)


def _user_items(message: dict, root: Path, budgets: PixelBudgets,
                role: ImageRole) -> tuple[list[tuple[str, str]], list[Image.Image]]:
    """The user turn as ("text", str) / ("image", "") items in order, and its images resized."""
    content = message.get("content")
    if isinstance(content, str):
        return [("text", content)], []
    if not isinstance(content, list):
        raise SFTFormatError("user content must be a string or a list")
    items: list[tuple[str, str]] = []
    images: list[Image.Image] = []
    for item in content:
        if isinstance(item, str):
            items.append(("text", item))
            continue
        if not isinstance(item, dict):
            raise SFTFormatError(f"bad content item {item!r}")
        if "image" in item or "image_url" in item:
            paths = item.get("image", item.get("image_url"))
            for entry in (paths if isinstance(paths, list) else [paths]):
                images.append(_resized(_open_image(entry, root), budgets, role))
                items.append(("image", ""))
        elif "video" in item:
            for frame in _video_frames(item["video"], root, budgets):
                images.append(_resized(frame, budgets, "frame"))
                items.append(("image", ""))
        elif "text" in item:
            items.append(("text", str(item["text"])))
        else:
            raise SFTFormatError(f"content item with keys {sorted(item)}")
    return items, images


def _resolve(entry: Any, root: Path) -> Path:
    if isinstance(entry, dict):  # {"url": ...} forms
        entry = entry.get("url") or entry.get("path")
    if not isinstance(entry, str) or not entry:
        raise SFTFormatError(f"media reference {entry!r} is not a path")
    if entry.startswith("file://"):
        entry = entry[len("file://"):]
    path = Path(entry)
    return path if path.is_absolute() else root / path


def _open_image(entry: Any, root: Path) -> Image.Image:
    with Image.open(_resolve(entry, root)) as image:
        return image.convert("RGB")


def _video_frames(video: Any, root: Path, budgets: PixelBudgets) -> list[Image.Image]:
    count = budgets.num_video_frames
    if isinstance(video, list):
        if not video:
            raise SFTFormatError("a video with no frames")
        picks = np.linspace(0, len(video) - 1, min(count, len(video))).round().astype(int)
        return [_open_image(video[i], root) for i in picks]
    from policies.visual_ops import VideoSource, load_video_frames

    source = VideoSource.sampled(_resolve(video, root), count)
    return load_video_frames(source.video, source.frame_indices)


def _resized(image: Image.Image, budgets: PixelBudgets, role: ImageRole) -> Image.Image:
    return resize_to_budget(image, budgets.min_pixels, budgets.max_pixels_for(role), budgets.patch_factor)


# --------------------------------------------------------------------------------------------
# Generated traces for the built-in synthetic zoom task
# --------------------------------------------------------------------------------------------

OPENERS = (
    "The square is too small to see, so I will zoom into it.",
    "Let me crop the region around the square to see its colour.",
)
MISS_TEXT = "The square is not in this crop, let me look elsewhere."
MISS_TEXT_DISTRACTORS = "This crop is not the part the question names, let me look there."  # it holds another square
ERROR_TEXT = "The tool call failed, let me fix it."
ERROR_VARIANTS = ("reversed_box", "missing_image", "pixels_of_full_image")


def answer_text(colour: str) -> str:
    return f"The square is {colour}. \\boxed{{{colour}}}"


def crop_call(box: Sequence[float], target_image: int = 1) -> str:
    arguments = {"bbox_2d": [_coordinate(v) for v in box], "target_image": target_image}
    return "<tool_call>\n" + json.dumps({"name": CROP_TOOL, "arguments": arguments}) + "\n</tool_call>"


def _coordinate(value: float) -> float | int:
    return int(value) if float(value).is_integer() and value > 1 else round(float(value), 2)


def synthetic_zoom_traces(
    tokenizer,
    spec: SyntheticZoomSpec,
    count: int,
    budgets: PixelBudgets,
    self_correction_fraction: float = 0.3,
    seed: int = 0,
    direct_fraction: float = 0.0,
    closeup_fraction: float = 0.0,
    closeup_answers: Literal["uniform", "task"] = "uniform",
    misdirected_fraction: float = 0.0,
    misdirected_crops: Literal["cell", "random"] = "random",
    direct_answers: Literal["task", "likeliest"] = "task",
) -> list[SFTExample]:
    """`count` tool-use traces on freshly drawn images of the synthetic task (same spec as the RL
    data, a different random stream, so the held-out split stays unseen).

    Plain trace: reasoning + a crop (normalized) -> the real crop (`run_turn`, as in RL) -> "The
    square is <colour>. \\boxed{<colour>}". The crop is the gold box with a random margin, or, when
    the question names a region (`spec.region_hint`), that region's cell. A
    `self_correction_fraction` of the traces first err, half of them by cropping a region that
    misses the square ("zoom_miss": another cell under region_hint), half by a malformed call that
    returns an "Execution error" ("zoom_error"); then the text of the fix, the right crop, its
    observation, the answer. A `direct_fraction` of the traces answer at once without any tool call
    ("direct"), like the text-only reasoning of the paper's warm-start data. Their answers
    (`direct_answers`): "task", the example's own answer, which the model cannot see, so it learns
    to guess as the task's answers fall (sampled, a guess is right sum(p^2) of the time: 37% under
    a 55% prior over four options); "likeliest", the answer the prior favours, as a model leaning
    on a language prior answers (right as often as the prior, 55%). A `closeup_fraction`
    are perception examples ("closeup"): the prompt's only image is the crop of the square's region,
    at the crop budget, and the answer follows at once. They stand in for the perception pretraining
    a real VLM brings: a random tiny model learns to read the pattern from them in a few hundred
    steps, while the single answer token of a tool-use trace teaches it far more slowly. Their
    answers are uniform over the options by default (`closeup_answers`): perception pretraining
    does not carry the task's answer prior (`spec.prior_fraction`), and under it the minority
    patterns got too few close-ups to be read. "task" draws them from the task's distribution.
    A `misdirected_fraction` of the plain zoom traces crop a region that misses the square and
    answer anyway, without a fix ("zoom_misdirected"): the crop shows nothing, so what the model
    learns there is the task's prior, a guess. It sets how often the warm start's sampled zooms look
    in the wrong place by the data, not by how well one SFT draw happens to learn the box: the
    learning trap needs zooms that pay little when RL starts. `misdirected_crops`: "random", a small
    box anywhere clear of the square (spread over many boxes, so the right box can stay the single
    likeliest one while most sampled zooms miss); "cell", another cell under region_hint (a random
    miss where every cell's padding reaches the square, or without region_hint).

    The random stream depends on the spec's task parameters and `seed`, not on its split sizes, so
    changing `num_eval` leaves the traces as they were.
    """
    for name, value in (("self_correction_fraction", self_correction_fraction), ("direct_fraction", direct_fraction),
                        ("closeup_fraction", closeup_fraction), ("misdirected_fraction", misdirected_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]")
    if closeup_answers not in ("uniform", "task"):
        raise ValueError(f"closeup_answers must be 'uniform' or 'task', not {closeup_answers!r}")
    if misdirected_crops not in ("cell", "random"):
        raise ValueError(f"misdirected_crops must be 'cell' or 'random', not {misdirected_crops!r}")
    if direct_answers not in ("task", "likeliest"):
        raise ValueError(f"direct_answers must be 'task' or 'likeliest', not {direct_answers!r}")
    guess = likeliest_answer(spec) if direct_answers == "likeliest" and direct_fraction else None
    closeup_spec = spec.model_copy(update={"prior_fraction": None}) if closeup_answers == "uniform" else spec
    rng = random.Random(derive_seed("sft-traces", spec.stream_key(), seed))
    examples = []
    for index in range(count):
        kind = "zoom"
        if rng.random() < self_correction_fraction:
            kind = rng.choice(("zoom_miss", "zoom_error"))
        elif misdirected_fraction and rng.random() < misdirected_fraction:
            kind = "zoom_misdirected"
        if direct_fraction and rng.random() < direct_fraction:
            kind = "direct"
        if closeup_fraction and rng.random() < closeup_fraction:
            kind = "closeup"
        example = draw_example(closeup_spec if kind == "closeup" else spec, rng)
        examples.append(_zoom_trace(tokenizer, example, spec, budgets, kind, rng, qid=f"sft-zoom-{seed}-{index:05d}",
                                    misdirected_crops=misdirected_crops, guess=guess))
    return examples


def _zoom_trace(tokenizer, example: ZoomExample, spec: SyntheticZoomSpec, budgets: PixelBudgets,
                kind: str, rng: random.Random, qid: str, misdirected_crops: str = "random",
                guess: str | None = None) -> SFTExample:
    original, colour, gold = example.image, example.answer, example.gold_box
    gold_pixels = _pixel_box(gold, original.size)
    metadata: dict[str, Any] = {"colour": colour, "gold_box": list(gold)}
    if kind == "closeup":
        closeup = run_turn(crop_call(example.region_box or _box_around(gold, rng)), [original], budgets)
        if not closeup.ok or not _contains(closeup.box_pixels, gold_pixels):
            raise AssertionError(f"the close-up of {qid} does not contain the square: {closeup}")
        builder = _Builder(tokenizer, prompt_token_ids(tokenizer, closeup_question(spec)), closeup.view_images)
        builder.assistant(answer_text(colour))
        return builder.finish(qid=qid, kind=kind, metadata=metadata)
    view = resize_to_budget(original, budgets.min_pixels, budgets.original_max_pixels, budgets.patch_factor)
    builder = _Builder(tokenizer, prompt_token_ids(tokenizer, example.question), [view])
    sources: list = [original]

    def act(text: str) -> Observation:
        builder.assistant(text)
        observation = run_turn(text, sources, budgets)  # the tool exactly as RL runs it
        if observation is None:
            raise AssertionError("a generated turn without a tool call")
        builder.observation(observation_token_ids(tokenizer, observation.text, len(observation.view_images)),
                            observation.view_images)
        sources.extend(observation.full_images)
        return observation

    if kind == "direct":  # `guess`: the answer a model that does not look gives, else the example's own
        builder.assistant(answer_text(guess or colour))
        return builder.finish(qid=qid, kind=kind, metadata=metadata)
    opener = rng.choice(OPENERS)
    miss = None
    if kind == "zoom_miss":
        miss = _other_region(spec, gold, rng) if example.region_box else _missing_box(gold, rng)
    elif kind == "zoom_misdirected":
        other_cell = _other_region(spec, gold, rng) if misdirected_crops == "cell" and example.region_box else None
        miss = other_cell or _missing_box(gold, rng)
    if miss is not None:  # a zoom_miss no cell can give (square by the centre cell's edge): an error trace instead
        first = act(opener + "\n" + crop_call(miss))
        if not first.ok or _overlaps(first.box_pixels, gold_pixels):
            raise AssertionError(f"the miss crop of {qid} saw the square or failed: {first}")
        metadata["first_box_pixels"] = first.box_pixels
        if kind == "zoom_misdirected":  # no fix: a guess from a crop that shows nothing
            builder.assistant(answer_text(colour))
            return builder.finish(qid=qid, kind=kind, metadata=metadata)
        fix = MISS_TEXT_DISTRACTORS if spec.distractors else MISS_TEXT
    elif kind in ("zoom_error", "zoom_miss"):
        kind = "zoom_error"
        variant = rng.choice(ERROR_VARIANTS)
        first = act(opener + "\n" + _erroneous_call(gold, variant, original.size, budgets, rng))
        if first.ok:  # e.g. full-res pixels that happen to fit the view: not an error, so use another
            raise AssertionError(f"the erroneous call of {qid} ({variant}) succeeded")
        metadata["error_kind"] = first.error_kind
        fix = ERROR_TEXT
    else:
        fix = opener
    final = act(fix + "\n" + crop_call(example.region_box or _box_around(gold, rng)))
    if not final.ok or not _contains(final.box_pixels, gold_pixels):
        raise AssertionError(f"the crop of {qid} does not contain the square: {final}")
    builder.assistant(answer_text(colour))
    return builder.finish(qid=qid, kind=kind, metadata=metadata)


def _other_region(spec: SyntheticZoomSpec, gold: Sequence[float], rng: random.Random,
                  padding: float = 0.1) -> list[float] | None:
    """Another region's cell whose padded crop stays clear of the square; None if every one reaches it."""
    def clear(box):
        return (box[2] + padding < gold[0] or box[0] - padding > gold[2]
                or box[3] + padding < gold[1] or box[1] - padding > gold[3])

    cells = [region_box(spec, cell) for cell in range(len(REGIONS[spec.grid]))]
    misses = [box for box in cells if clear(box)]
    return rng.choice(misses) if misses else None


def _box_around(gold: Sequence[float], rng: random.Random) -> list[float]:
    """A normalized box holding the gold box with a random margin on each side, 2 decimals."""
    import math

    x1, y1, x2, y2 = gold
    left = max(0.0, math.floor((x1 - rng.uniform(0.01, 0.08)) * 100) / 100)
    top = max(0.0, math.floor((y1 - rng.uniform(0.01, 0.08)) * 100) / 100)
    right = min(1.0, math.ceil((x2 + rng.uniform(0.01, 0.08)) * 100) / 100)
    bottom = min(1.0, math.ceil((y2 + rng.uniform(0.01, 0.08)) * 100) / 100)
    return [left, top, right, bottom]


def _missing_box(gold: Sequence[float], rng: random.Random, padding: float = 0.1) -> list[float]:
    """A box of the usual size whose padded crop stays clear of the gold box."""
    x1, y1, x2, y2 = gold
    for _ in range(1000):
        width, height = rng.uniform(0.05, 0.15), rng.uniform(0.05, 0.15)
        left, top = round(rng.uniform(0.0, 1.0 - width), 2), round(rng.uniform(0.0, 1.0 - height), 2)
        right, bottom = round(left + width, 2), round(top + height, 2)
        clear_x = right + padding + 0.02 < x1 or left - padding - 0.02 > x2
        clear_y = bottom + padding + 0.02 < y1 or top - padding - 0.02 > y2
        if clear_x or clear_y:
            return [left, top, right, bottom]
    raise AssertionError("no region of the canvas misses the square")


def _erroneous_call(gold: Sequence[float], variant: str, size: tuple[int, int], budgets: PixelBudgets,
                    rng: random.Random) -> str:
    box = _box_around(gold, rng)
    if variant == "reversed_box":  # x1 > x2: a parse-time error (bad_box)
        return crop_call([box[2], box[1], box[0], box[3]])
    if variant == "missing_image":  # only image 1 exists: an execution error (target_out_of_range)
        return crop_call(box, target_image=2)
    # Pixel coordinates of the full-resolution image, beyond the view the model saw (box_out_of_range);
    # pushed past the view's right edge when the square sits near the top-left corner.
    width, height = size
    pixels = [round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)]
    view_w, view_h = _view_size(size, budgets)
    if pixels[2] <= view_w and pixels[3] <= view_h:
        pixels[2] = view_w + rng.randint(20, 200)
    return crop_call(pixels)


def _view_size(size: tuple[int, int], budgets: PixelBudgets) -> tuple[int, int]:
    from policies.visual_ops import _smart_resize

    height, width = _smart_resize()(size[1], size[0], factor=budgets.patch_factor, min_pixels=budgets.min_pixels,
                                    max_pixels=budgets.original_max_pixels)
    return width, height


def _pixel_box(box: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    return (round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height))


def _contains(outer, inner) -> bool:
    return outer is not None and outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _overlaps(a, b) -> bool:
    return a is not None and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
