"""The built-in synthetic zoom task: a small coloured square on a large textured canvas.

At the original image's pixel budget the square shrinks to a fraction of one 28x28 visual token
and its colour blurs into the background; a crop around it brings it back to many tokens. So the
answer needs a zoom, which is what the method trains. The gold box is kept for diagnostics.

Two options make the task learnable by a model small enough to train on a laptop CPU (the
`zoom-curiosity` recipe, benchmarks/learning.py):
- `region_hint`: the question names the cell of a `grid` x `grid` partition that holds the square
  ("in the top-left part"). A square too small to see in the view cannot be localised from it, and
  reading an absolute position out of visual tokens is beyond a two-layer model (Qwen2.5-VL's
  positions are rotary, i.e. relative); with the hint the zoom target is text, the colour is pixels.
- `detail="pattern"`: the square is filled with fine black-and-white stripes or checks (period
  `pattern_period` px) and the answer is the pattern; antialiased downscaling erases it from the
  view entirely, while a colour stays partly visible to a ViT even at a few pixels.
- `colour_noise`: each background block gets its own per-channel jitter, so the few per cent of a
  view token the square covers cannot be told apart from background by its chroma.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.data import write_rl_parquet

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 215, 30),
    "purple": (140, 40, 170), "orange": (240, 130, 20), "white": (250, 250, 250), "black": (10, 10, 10),
}
QUESTION = "What is the colour of the small square in the image? Answer with one word in \\boxed{}."
# Fine black-and-white patterns of equal mean: a downscaled view (antialiased) turns all of them
# into the same grey, so unlike a colour, which survives averaging, the pattern needs the pixels.
# Four stripe orientations: each puts its energy in one distinct spatial-frequency direction, so a
# small ViT tells them apart from a few patches (a checkerboard, which is two diagonals at once,
# stayed confused with one diagonal in a direct probe of the tiny model).
PATTERNS = ("horizontal", "vertical", "rising", "falling")
PATTERN_QUESTION = ("The small square is in the {region} part of the image. Which pattern fills it: "
                    "horizontal, vertical, rising or falling stripes? Answer with one word in \\boxed{{}}.")
HINTED_QUESTION = ("The small square is in the {region} part of the image. What is its colour? "
                   "Answer with one word in \\boxed{{}}.")
# Perception examples of the warm start (policies/sft_data.py "closeup"): the close-up is the image.
CLOSEUP_QUESTIONS = {
    "colour": "What is the colour of the square in this close-up? Answer with one word in \\boxed{}.",
    "pattern": ("Which pattern fills the square in this close-up: horizontal, vertical, rising or falling "
                "stripes? Answer with one word in \\boxed{}."),
}
# Cell names, row by row, per grid size.
REGIONS = {
    2: ("top-left", "top-right", "bottom-left", "bottom-right"),
    3: ("top-left", "top", "top-right", "left", "centre", "right", "bottom-left", "bottom", "bottom-right"),
}


class ZoomExample(NamedTuple):
    image: Any  # PIL image at full resolution
    answer: str  # the colour name, or the pattern name (detail="pattern")
    gold_box: list[float]  # normalized [x1, y1, x2, y2] of the square
    question: str
    region_box: list[float] | None  # normalized cell named by the question (region_hint), else None


ADDED_LATER = {"distractors": False}  # fields added to the spec later, and their defaults


class SyntheticZoomSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_train: int = Field(default=64, ge=1)
    num_eval: int = Field(default=32, ge=0)
    canvas_size: int = Field(default=896, ge=64)
    square_size: int = Field(default=20, ge=2)
    region_hint: bool = False  # the question names the grid cell holding the square
    grid: Literal[2, 3] = 3
    colour_noise: int = Field(default=0, ge=0, le=100)  # per-channel jitter of background blocks
    detail: Literal["colour", "pattern"] = "colour"  # what the question asks about the square
    pattern_period: int = Field(default=4, ge=3)  # px at full resolution, one dark + one light half (2 px would make rising and falling the same checkerboard)
    pixel_noise: int = Field(default=0, ge=0, le=100)  # per-pixel uniform jitter (a sensor's noise)
    # Share of examples whose answer is the first option (PATTERNS[0], or the first colour), the
    # rest uniform over the others: a prior a model can exploit without looking, like the language
    # priors of real VQA data. None: uniform.
    prior_fraction: float | None = Field(default=None, ge=0, le=1)
    # Every other grid cell holds a square too, of a pattern (colour) drawn uniformly: a crop of the
    # wrong cell shows a plain, misleading square instead of nothing, as a zoom into the wrong part
    # of a real image shows something else. Needs region_hint (the question names the cell).
    distractors: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _square_fits(self) -> "SyntheticZoomSpec":
        # A hinted square keeps half its side clear of its cell's edges; an unhinted one a side.
        room = self.canvas_size // self.grid if self.region_hint else self.canvas_size
        if room < (2 if self.region_hint else 3) * self.square_size:
            raise ValueError(f"square_size {self.square_size} does not fit {'a grid cell' if self.region_hint else 'the canvas'} "
                             f"of {room} px with a margin")
        if self.distractors and not self.region_hint:
            raise ValueError("distractors need region_hint: without a named cell the question has no one square")
        return self

    def stream_key(self) -> str:
        """The task's parameters as a random stream's seed sees them: without the split sizes (a
        trace does not depend on them), and without fields added after streams were first drawn
        while those sit at their default, so adding a field redraws no existing task's traces."""
        later = {name for name, default in ADDED_LATER.items() if getattr(self, name) == default}
        return self.model_dump_json(exclude={"num_train", "num_eval", *later})

    def cache_key(self) -> str:
        import hashlib

        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


def region_box(spec: SyntheticZoomSpec, cell: int) -> list[float]:
    """Normalized box of grid cell `cell` (row by row), two decimals, as a model would write it."""
    row, column = divmod(cell, spec.grid)
    return [round(column / spec.grid, 2), round(row / spec.grid, 2),
            round((column + 1) / spec.grid, 2), round((row + 1) / spec.grid, 2)]


def answer_options(spec: SyntheticZoomSpec) -> tuple[str, ...]:
    """The answers the task's questions can have (the first is the one `prior_fraction` favours)."""
    return PATTERNS if spec.detail == "pattern" else tuple(sorted(COLOURS))


def likeliest_answer(spec: SyntheticZoomSpec) -> str:
    """The answer a model that does not look should give: the one `prior_fraction` favours (when the
    favoured one is rarer than the rest, each of the rest; the first of them)."""
    options = answer_options(spec)
    if spec.prior_fraction is None:
        raise ValueError("the likeliest answer needs data.synthetic.prior_fraction: uniform answers have none")
    return options[0] if spec.prior_fraction >= 1 / len(options) else options[1]


def draw_example(spec: SyntheticZoomSpec, rng: random.Random) -> ZoomExample:
    """One example: image, answer, normalized gold box, question (and the hinted cell)."""
    from PIL import Image, ImageDraw

    size, side = spec.canvas_size, spec.square_size
    # Textured background: blocks of slightly different greys (plus per-channel jitter if asked),
    # so the canvas isn't trivially uniform.
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    block = max(size // 16, 4)
    for y in range(0, size, block):
        for x in range(0, size, block):
            grey = rng.randint(100, 156)
            fill = (grey, grey, grey)
            if spec.colour_noise:
                fill = tuple(min(255, max(0, grey + rng.randint(-spec.colour_noise, spec.colour_noise))) for _ in range(3))
            draw.rectangle([x, y, x + block - 1, y + block - 1], fill=fill)
    options = answer_options(spec)
    if spec.prior_fraction is None:
        answer = rng.choice(options)
    else:
        answer = options[0] if rng.random() < spec.prior_fraction else rng.choice(options[1:])
    x_range = y_range = (side, size - side - side)  # where the square's top-left corner may go
    cell, question, hinted = None, QUESTION, None
    if spec.region_hint:
        cell = rng.randrange(spec.grid * spec.grid)
        x_range, y_range = _cell_corner_ranges(spec, cell)
        question = (PATTERN_QUESTION if spec.detail == "pattern" else HINTED_QUESTION).format(region=REGIONS[spec.grid][cell])
        hinted = region_box(spec, cell)
    x0 = rng.randint(*x_range)
    y0 = rng.randint(*y_range)
    _paint_square(spec, image, draw, answer, x0, y0)
    if spec.distractors:
        for other in range(spec.grid * spec.grid):
            if other != cell:
                other_x, other_y = _cell_corner_ranges(spec, other)
                _paint_square(spec, image, draw, rng.choice(options), rng.randint(*other_x), rng.randint(*other_y))
    if spec.pixel_noise:  # masks the faint residue of a pattern that the view's resize leaves behind
        import numpy as np

        noise = np.random.default_rng(rng.getrandbits(64)).integers(-spec.pixel_noise, spec.pixel_noise + 1, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    box = [x0 / size, y0 / size, (x0 + side) / size, (y0 + side) / size]
    return ZoomExample(image, answer, box, question, hinted)


def _cell_corner_ranges(spec: SyntheticZoomSpec, cell: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a square's top-left corner may go in grid cell `cell`: half a side clear of its edges."""
    row, column = divmod(cell, spec.grid)
    edges = [round(i * spec.canvas_size / spec.grid) for i in range(spec.grid + 1)]
    margin = spec.square_size // 2
    return ((edges[column] + margin, edges[column + 1] - margin - spec.square_size),
            (edges[row] + margin, edges[row + 1] - margin - spec.square_size))


def _paint_square(spec: SyntheticZoomSpec, image, draw, answer: str, x0: int, y0: int) -> None:
    side = spec.square_size
    if spec.detail == "pattern":
        image.paste(pattern_tile(answer, side, spec.pattern_period), (x0, y0))
    else:
        draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=COLOURS[answer])


def pattern_tile(pattern: str, side: int, period: int, taper: int = 8):
    """A side x side tile of `pattern`: dark and light halves around mid grey, the contrast fading
    to nothing over `taper` px at the border. Without the fade, the stripes' cut ends along the
    edges leave a pattern-specific rim in a downscaled view."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side]
    half = period // 2
    light = {"horizontal": (y % period) < half, "vertical": (x % period) < half,
             "rising": ((x + y) % period) < half,  # lines x + y = c run up to the right: /
             "falling": ((x - y) % period) < half}[pattern]
    ramp = np.clip((np.minimum(np.arange(side), np.arange(side)[::-1]) + 0.5) / taper, 0.0, 1.0)
    contrast = 127.5 * np.outer(ramp, ramp)
    tile = np.rint(127.5 + np.where(light, contrast, -contrast)).astype(np.uint8)
    return Image.fromarray(tile).convert("RGB")


def make_synthetic_zoom(spec: SyntheticZoomSpec, output_dir: Path) -> dict[str, Path]:
    """Write train.parquet / eval.parquet and their images under `output_dir`."""
    rng = random.Random(spec.seed)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", spec.num_train), ("eval", spec.num_eval)):
        rows = []
        for index in range(count):
            example = draw_example(spec, rng)
            relative = f"images/{split}-{index:05d}.png"
            example.image.save(output_dir / relative)
            rows.append({
                "qid": f"zoom-{split}-{index:05d}", "question": example.question, "image": [relative],
                "is_video": False, "answer": [example.answer], "gold_box": example.gold_box,
                **({"region_box": example.region_box} if example.region_box else {}),
            })
        paths[split] = output_dir / f"{split}.parquet"
        if rows:
            write_rl_parquet(rows, paths[split])
    return paths


def ensure_synthetic_zoom(spec: SyntheticZoomSpec, cache_dir: Path) -> dict[str, Path]:
    """Return the cached data set for `spec`, writing it first if missing."""
    import os
    import shutil
    import tempfile

    target = cache_dir / f"synthetic-zoom-{spec.cache_key()}"
    if (target / "train.parquet").exists():
        return {s: target / f"{s}.parquet" for s in ("train", "eval") if (target / f"{s}.parquet").exists()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        make_synthetic_zoom(spec, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "train.parquet").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ensure_synthetic_zoom(spec, cache_dir)


def closeup_question(spec: SyntheticZoomSpec) -> str:
    return CLOSEUP_QUESTIONS[spec.detail]


def corpus_sentences() -> list[str]:
    """Sentences in the task's vocabulary, for training the tiny tokenizer."""
    rng = random.Random(0)
    reasoning = [
        "The square is too small to see, so I will zoom into it.",
        "Let me crop the region around the square to see its colour.",
        "Now the square is clearly visible.",
        "The colour of the small square is",
        "The crop missed the square, let me try another region.",
        "Here is the cropped image (Image Size: 224x224):",
        "Execution error: the box is outside the image.",
        "Here are the selected frames (Frame Numbers: 1, 2, 3):",
    ]
    hinted = [q.format(region=name) for name in REGIONS[3] for q in (HINTED_QUESTION, PATTERN_QUESTION)]
    sentences = [QUESTION] * 50 + hinted * 10 + reasoning * 30 + list(CLOSEUP_QUESTIONS.values()) * 20
    for _ in range(2000):
        colour = rng.choice(sorted(COLOURS))
        sentences.append(f"{rng.choice(reasoning)} The answer is \\boxed{{{colour}}}.")
    for pattern in PATTERNS:
        sentences += [f"The square is {pattern}. \\boxed{{{pattern}}}"] * 20
    return sentences
