"""The tiny model is a real Qwen2.5-VL checkpoint; the synthetic task really needs a zoom."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from policies.data import read_rl_parquet
from policies.model import SPECIAL_TOKENS, TOOL_TOKENS, TinyModelSpec, ensure_tiny_model
from policies.synthetic import COLOURS, SyntheticZoomSpec, draw_example, ensure_synthetic_zoom
from policies.visual_ops import PixelBudgets, resize_to_budget, run_turn


def test_tiny_model_has_qwen_tokens_template_and_processor(tiny_model_dir):
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS + TOOL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1, token
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 1 and text.endswith("<|im_start|>assistant\n")
    assert processor.image_processor.size.longest_edge == TinyModelSpec().max_pixels  # the pixel budget


def test_tiny_model_cache_is_reused(tiny_model_dir, tmp_path):
    first = ensure_tiny_model(TinyModelSpec(num_layers=1, vision_depth=1), cache_dir=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model(TinyModelSpec(num_layers=1, vision_depth=1), cache_dir=tmp_path)
    assert again == first and (again / "model.safetensors").stat().st_mtime_ns == stamp


def test_synthetic_data_is_in_the_pixel_reasoner_rl_format(tmp_path):
    paths = ensure_synthetic_zoom(SyntheticZoomSpec(num_train=3, num_eval=2), tmp_path)
    table = pq.read_table(paths["train"])
    assert {"question", "image", "is_video", "answer", "qid", "gold_box"} <= set(table.column_names)
    records = read_rl_parquet(paths["train"])
    assert len(records) == 3 and len(read_rl_parquet(paths["eval"])) == 2
    for record in records:
        assert record.answers[0] in COLOURS and not record.is_video
        assert Image.open(record.media_paths[0]).size == (896, 896)


def test_square_is_lost_at_the_original_budget_and_recovered_by_a_crop():
    import random

    spec, budgets = SyntheticZoomSpec(), PixelBudgets()
    image, colour, box = draw_example(spec, random.Random(3))[:3]
    target = np.array(COLOURS[colour], dtype=float)
    view = np.asarray(resize_to_budget(image, budgets.min_pixels, budgets.original_max_pixels), dtype=float)
    # In the view, the square covers under one 28x28 visual token.
    square_side_in_view = (box[2] - box[0]) * view.shape[1]
    assert square_side_in_view < 28 / 4
    call = ('<tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [%f, %f, %f, %f], "target_image": 1}}'
            "</tool_call>" % tuple(box))
    observation = run_turn(call, [image], budgets)
    assert observation.ok
    crop = np.asarray(observation.view_images[0], dtype=float)
    close = np.linalg.norm(crop - target, axis=-1) < 30
    in_view = (np.linalg.norm(view - target, axis=-1) < 30).sum()
    # After the crop the square keeps its full-resolution 20x20 pixels in its true colour (about half a
    # visual token), where the view had at most a few blurred ones.
    assert close.sum() >= 0.9 * spec.square_size**2
    assert in_view < close.sum() / 10


def test_missing_columns_are_a_clear_error(tmp_path):
    import pyarrow as pa

    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"], "image": [["a.png"]]}), path)
    with pytest.raises(ValueError, match="is_video"):
        read_rl_parquet(path)
