"""Qwen2.5-VL models in Hugging Face format: the tiny builder, and loading any checkpoint by path.

The tiny model has Qwen2.5-VL's architecture, special tokens, chat template and image processor,
so every code path (vLLM engine, DeepSpeed learner, weight sync, tool loop) is the one a real
Qwen2.5-VL-7B-Instruct checkpoint takes; only the sizes differ. Everything is made locally: a
byte-level BPE tokenizer trained on the project's own prompts, seeded random weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# Qwen2-VL's special tokens, in Qwen's order; the tool-call tags are plain added tokens as in Qwen2.5.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
TOOL_TOKENS = ("<tool_call>", "</tool_call>")

# Qwen2-VL's chat template: one <|image_pad|> per image item (the processor expands it later).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (digits one by one, words with a leading space).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TinyModelSpec(BaseModel):
    """Sizes of the tiny model; the cache folder is keyed by a hash of this spec."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    vocab_size: int = Field(default=1024, ge=512)  # an upper bound: the corpus yields ~700
    hidden_size: int = Field(default=128, ge=16)
    intermediate_size: int = 256
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_heads: int = 2
    # Processor bounds (pixels); each image is also pre-resized to its own budget by the tools.
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    max_position_embeddings: int = 8192

    def cache_key(self) -> str:
        """Hash of the sizes and of the tokenizer's training text (a new task sentence, a new model)."""
        digest = hashlib.sha256(self.model_dump_json().encode())
        digest.update("\n".join(_tokenizer_corpus()).encode())
        return digest.hexdigest()[:12]


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the project's prompts, tool calls and answers."""
    from policies.protocol import TOOL_SYSTEM_PROMPT
    from policies.synthetic import corpus_sentences

    calls = [
        '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.%d, 0.%d, 0.%d, 0.%d], "target_image": 1}}\n</tool_call>'
        % (a, b, a + 2, b + 2)
        for a in range(8) for b in range(8)
    ]
    frames = ['<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [%d, %d]}}\n</tool_call>' % (i, i + 3)
              for i in range(1, 14)]
    return [TOOL_SYSTEM_PROMPT] * 20 + calls + frames + corpus_sentences()


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=False, unk_token=None))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(SPECIAL_TOKENS) - len(TOOL_TOKENS),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.add_tokens(list(TOOL_TOKENS))
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    return hf_tokenizer


def build_tiny_model(spec: TinyModelSpec, output_dir: Path) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (weights, tokenizer, processor) to `output_dir`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = _train_tokenizer(spec)
    token_id = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + TOOL_TOKENS}
    vocab_rows = 64 * ((len(tokenizer) + 63) // 64)  # embedding rows padded like Qwen's
    head_dim = spec.hidden_size // spec.num_heads
    # mrope sections (temporal, height, width) add up to half the head dim, in Qwen's 2:3:3 ratio.
    spatial = (head_dim // 2) * 3 // 8
    mrope_section = [head_dim // 2 - 2 * spatial, spatial, spatial]
    ids = dict(
        bos_token_id=token_id["<|endoftext|>"], eos_token_id=token_id["<|im_end|>"], pad_token_id=token_id["<|endoftext|>"],
    )
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_rows, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=spec.max_position_embeddings,
            rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": mrope_section, "rope_theta": 1000000.0},
            **ids,
        ),
        vision_config=dict(
            depth=spec.vision_depth, hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
            num_heads=spec.vision_heads, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            out_hidden_size=spec.hidden_size, window_size=112, fullatt_block_indexes=[spec.vision_depth - 1],
            hidden_act="silu", tokens_per_second=2,
        ),
        image_token_id=token_id["<|image_pad|>"], video_token_id=token_id["<|video_pad|>"],
        vision_start_token_id=token_id["<|vision_start|>"], vision_end_token_id=token_id["<|vision_end|>"],
        tie_word_embeddings=False, **ids,
    )
    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    model.generation_config.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    processor = Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    processor.save_pretrained(output_dir)
    # The classic processor file layout, which both transformers and vLLM read.
    preprocessor_path = output_dir / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_path.read_text())
    preprocessor.update(
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )
    preprocessor_path.write_text(json.dumps(preprocessor, indent=2))
    (output_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (output_dir / "pixelray_spec.json").write_text(spec.model_dump_json(indent=2))
    return output_dir


def ensure_tiny_model(spec: TinyModelSpec, cache_dir: Path | None = None) -> Path:
    """Return the cached tiny model for `spec`, building it first if missing.

    Built into a temporary sibling and renamed, so concurrent builders (tests, Ray actors) never see
    a half-written folder.
    """
    from cluster.runtime import cache_root

    target = (cache_dir or cache_root() / "models") / f"tiny-qwen2.5-vl-{spec.cache_key()}"
    if (target / "pixelray_spec.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny_model(spec, staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process won the race: its copy is as good as ours
            if not (target / "pixelray_spec.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
