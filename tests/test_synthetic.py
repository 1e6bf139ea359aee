"""The learnable form of the synthetic zoom task (region hint, fine patterns) and its SFT traces."""
import json
import random

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from policies.sft_data import MISS_TEXT, MISS_TEXT_DISTRACTORS, synthetic_zoom_traces
from policies.synthetic import PATTERNS, REGIONS, SyntheticZoomSpec, draw_example, pattern_tile, region_box
from policies.visual_ops import PixelBudgets, resize_to_budget, run_turn

SPEC = SyntheticZoomSpec(canvas_size=448, square_size=36, region_hint=True, grid=2, detail="pattern",
                         colour_noise=20, pixel_noise=16)
BUDGETS = PixelBudgets(original_max_pixels=16 * 784, crop_max_pixels=100 * 784)


def crop_call(box):
    return '<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": %s, "target_image": 1}}</tool_call>' % json.dumps(box)


def test_a_pattern_vanishes_in_the_view_and_is_plain_in_the_crop():
    canvas = Image.new("RGB", (448, 448), (128, 128, 128))
    views, crops = {}, {}
    for pattern in PATTERNS:
        image = canvas.copy()
        image.paste(pattern_tile(pattern, 96, 4), (40, 260))
        views[pattern] = np.asarray(resize_to_budget(image, BUDGETS.min_pixels, BUDGETS.original_max_pixels), dtype=int)
        observation = run_turn(crop_call(region_box(SPEC, 2)), [image], BUDGETS)  # bottom-left quadrant
        assert observation.ok
        crops[pattern] = np.asarray(observation.view_images[0], dtype=int)
    pairs = [(a, b) for i, a in enumerate(PATTERNS) for b in PATTERNS[i + 1:]]
    assert max(np.abs(views[a] - views[b]).max() for a, b in pairs) <= 3  # below the pixel noise
    assert min(np.abs(crops[a] - crops[b]).max() for a, b in pairs) >= 60


@pytest.mark.parametrize("grid", [2, 3])
def test_the_question_names_the_cell_that_holds_the_square(grid):
    spec = SPEC.model_copy(update={"grid": grid})
    rng = random.Random(0)
    seen = set()
    for _ in range(60):
        example = draw_example(spec, rng)
        region = next(name for name in REGIONS[grid] if f"in the {name} part" in example.question)
        seen.add(region)
        cell = region_box(spec, REGIONS[grid].index(region))
        assert example.region_box == cell and example.answer in PATTERNS
        x1, y1, x2, y2 = example.gold_box
        assert cell[0] - 0.01 <= x1 < x2 <= cell[2] + 0.01 and cell[1] - 0.01 <= y1 < y2 <= cell[3] + 0.01
    assert seen == set(REGIONS[grid])


def test_defaults_keep_the_original_task():
    example = draw_example(SyntheticZoomSpec(), random.Random(3))
    assert example.region_box is None and "colour" in example.question
    assert np.asarray(example.image)[..., 0].std() > 0


def _cells_with_a_square(spec, image) -> list[int]:
    """Grid cells whose pixels reach black: only a square's stripes do (the background and its noise stay grey)."""
    pixels, step = np.asarray(image, dtype=int), spec.canvas_size // spec.grid
    return [cell for cell in range(spec.grid * spec.grid)
            if pixels[(cell // spec.grid) * step:(cell // spec.grid + 1) * step,
                      (cell % spec.grid) * step:(cell % spec.grid + 1) * step].min() < 10]


def test_distractors_put_a_square_in_every_other_cell_and_leave_the_question_as_it_was():
    with_them = SPEC.model_copy(update={"distractors": True})
    for seed in range(12):
        plain, distracted = draw_example(SPEC, random.Random(seed)), draw_example(with_them, random.Random(seed))
        named = REGIONS[2].index(next(name for name in REGIONS[2] if f"in the {name} part" in plain.question))
        assert _cells_with_a_square(SPEC, plain.image) == [named]
        assert _cells_with_a_square(with_them, distracted.image) == [0, 1, 2, 3]
        # the named square, its answer and the question are drawn before the distractors
        assert (distracted.question, distracted.answer, distracted.gold_box) == (plain.question, plain.answer, plain.gold_box)


def test_a_miss_crop_that_shows_a_distractor_is_called_the_wrong_part_not_empty(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = SPEC.model_copy(update={"distractors": True})
    misses = [e for e in synthetic_zoom_traces(tokenizer, spec, 12, BUDGETS, self_correction_fraction=1.0, seed=2)
              if e.kind == "zoom_miss"]
    assert misses
    for example in misses:
        assert MISS_TEXT_DISTRACTORS in example.assistant_text and MISS_TEXT not in example.assistant_text


def test_a_field_added_later_leaves_the_presets_trace_stream_alone():
    from cluster.config import load_config
    from policies.episode import derive_seed

    spec = load_config("zoom-curiosity").data.synthetic
    # the seed of the preset's SFT traces before `distractors` existed: its warm start stays the same draw
    assert derive_seed("sft-traces", spec.stream_key(), 0) == 4389657229017378581
    assert spec.model_copy(update={"distractors": True}).stream_key() != spec.stream_key()


def test_distractors_need_a_named_cell():
    with pytest.raises(ValidationError, match="distractors"):
        SyntheticZoomSpec(distractors=True)


def test_a_square_too_large_for_its_cell_is_refused():
    with pytest.raises(ValidationError, match="square_size"):
        SyntheticZoomSpec(canvas_size=448, square_size=80, region_hint=True, grid=3)


def test_hinted_traces_crop_the_named_cell_and_direct_traces_answer_at_once(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = synthetic_zoom_traces(tokenizer, SPEC, 40, BUDGETS, self_correction_fraction=0.5, seed=1,
                                     direct_fraction=0.3)
    kinds = {e.kind for e in examples}
    assert {"direct", "zoom", "zoom_miss"} <= kinds
    for example in examples:
        calls = [json.loads(part.split("</tool_call>")[0]) for part in example.assistant_text.split("<tool_call>")[1:]]
        assert example.assistant_text.endswith("\\boxed{%s}" % example.metadata["colour"])
        if example.kind == "direct":
            assert calls == [] and len(example.images) == 1
            continue
        final_box = calls[-1]["arguments"]["bbox_2d"]
        x1, y1, x2, y2 = example.metadata["gold_box"]
        assert final_box in [region_box(SPEC, cell) for cell in range(4)]
        assert final_box[0] <= x1 and final_box[1] <= y1 and final_box[2] >= x2 and final_box[3] >= y2
        if example.kind == "zoom_miss":
            assert calls[0]["arguments"]["bbox_2d"] != final_box


def test_misdirected_traces_crop_a_miss_and_answer_without_a_fix(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = synthetic_zoom_traces(tokenizer, SPEC, 40, BUDGETS, self_correction_fraction=0.0, seed=5)
    examples = synthetic_zoom_traces(tokenizer, SPEC, 40, BUDGETS, self_correction_fraction=0.0, seed=5,
                                     misdirected_fraction=0.5)
    misdirected = [e for e in examples if e.kind == "zoom_misdirected"]
    assert 10 <= len(misdirected) <= 30 and {e.kind for e in plain} == {"zoom"}
    boxes = set()
    for example in misdirected:
        calls = [json.loads(part.split("</tool_call>")[0]) for part in example.assistant_text.split("<tool_call>")[1:]]
        assert len(calls) == 1 and len(example.images) == 2  # one crop, no second try
        # the padded crop (full-resolution pixels) misses the square, and is no cell's box
        left, top, right, bottom = example.metadata["first_box_pixels"]
        x1, y1, x2, y2 = (round(v * SPEC.canvas_size) for v in example.metadata["gold_box"])
        assert right <= x1 or left >= x2 or bottom <= y1 or top >= y2
        assert calls[0]["arguments"]["bbox_2d"] not in [region_box(SPEC, cell) for cell in range(4)]
        boxes.add(tuple(calls[0]["arguments"]["bbox_2d"]))
        assert MISS_TEXT not in example.assistant_text
        assert example.assistant_text.endswith("\\boxed{%s}" % example.metadata["colour"])
    assert len(boxes) == len(misdirected)  # spread out: no wrong box is a likely one
    cells = synthetic_zoom_traces(tokenizer, SPEC, 40, BUDGETS, self_correction_fraction=0.0, seed=5,
                                  misdirected_fraction=0.5, misdirected_crops="cell")
    cell_boxes = [json.loads(e.assistant_text.split("<tool_call>")[1].split("</tool_call>")[0])["arguments"]["bbox_2d"]
                  for e in cells if e.kind == "zoom_misdirected"]
    assert len(cell_boxes) >= 10
    assert sum(box in [region_box(SPEC, cell) for cell in range(4)] for box in cell_boxes) >= len(cell_boxes) / 2


def test_closeup_examples_show_a_crop_as_the_only_image_and_answer_at_once(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = synthetic_zoom_traces(tokenizer, SPEC, 30, BUDGETS, self_correction_fraction=0.0, seed=2,
                                     closeup_fraction=0.5)
    closeups = [e for e in examples if e.kind == "closeup"]
    assert 5 <= len(closeups) < len(examples)
    for example in closeups:
        # a padded quadrant of the 448 px canvas (269 px) at the 100-token crop budget: 280 x 280
        assert len(example.images) == 1 and example.images[0].shape == (280, 280, 3)
        assert "<tool_call>" not in example.assistant_text
        assert example.assistant_text.endswith("\\boxed{%s}" % example.metadata["colour"])
        assert tokenizer.decode(example.token_ids).count("close-up") == 1


def test_direct_traces_guess_the_likeliest_answer_when_asked_and_nothing_else_changes(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = SPEC.model_copy(update={"prior_fraction": 0.55})
    traces = {answers: synthetic_zoom_traces(tokenizer, spec, 60, BUDGETS, self_correction_fraction=0.2, seed=2,
                                             direct_fraction=0.5, direct_answers=answers)
              for answers in ("task", "likeliest")}
    direct = [e for e in traces["likeliest"] if e.kind == "direct"]
    assert len(direct) > 15 and any(e.metadata["colour"] != PATTERNS[0] for e in direct)  # their images vary
    assert all(e.assistant_text.endswith("\\boxed{%s}" % PATTERNS[0]) for e in direct)
    for task, likeliest in zip(traces["task"], traces["likeliest"]):  # the same draw: only the guesses differ
        assert task.kind == likeliest.kind and task.metadata == likeliest.metadata
        assert task.assistant_text.endswith("\\boxed{%s}" % task.metadata["colour"])
        if task.kind != "direct":
            assert task.token_ids == likeliest.token_ids
    with pytest.raises(ValueError, match="prior_fraction"):
        synthetic_zoom_traces(tokenizer, SPEC, 4, BUDGETS, direct_fraction=0.5, direct_answers="likeliest")


def test_closeups_answer_uniformly_by_default_and_as_the_task_when_asked(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    spec = SPEC.model_copy(update={"prior_fraction": 0.85})
    counts = {}
    for answers in ("uniform", "task"):
        examples = synthetic_zoom_traces(tokenizer, spec, 120, BUDGETS, self_correction_fraction=0.0, seed=3,
                                         closeup_fraction=1.0, closeup_answers=answers)
        assert {e.kind for e in examples} == {"closeup"}
        counts[answers] = [sum(e.metadata["colour"] == p for e in examples) for p in PATTERNS]
    assert max(counts["uniform"]) < 50  # 30 expected per pattern; the prior would give ~102 horizontal
    assert counts["task"][0] > 85


def test_traces_do_not_depend_on_the_split_sizes(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    first, second = (synthetic_zoom_traces(tokenizer, SPEC.model_copy(update={"num_eval": n}), 6, BUDGETS, seed=4)
                     for n in (32, 256))
    assert [e.token_ids for e in first] == [e.token_ids for e in second]
    other_task = synthetic_zoom_traces(tokenizer, SPEC.model_copy(update={"pixel_noise": 17}), 6, BUDGETS, seed=4)
    assert [e.token_ids for e in other_task] != [e.token_ids for e in first] or any(
        not np.array_equal(a, b) for x, y in zip(first, other_task) for a, b in zip(x.images, y.images))


def test_prior_fraction_skews_answers_towards_the_first_option():
    spec = SPEC.model_copy(update={"prior_fraction": 0.6})
    rng = random.Random(5)
    answers = [draw_example(spec, rng).answer for _ in range(400)]
    assert 0.52 < answers.count(PATTERNS[0]) / 400 < 0.68
    assert all(0.08 < answers.count(p) / 400 < 0.2 for p in PATTERNS[1:])
