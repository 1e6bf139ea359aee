"""Time models for simulated engines and learners (pure: no Ray, no torch).

`actors/simulated.py` puts these behind the RolloutWorker / LearnerGroup interfaces so the real
pipeline (`cluster/pipeline.py`: submit / complete / run, the reward actor, the real multi-turn
workflow `policies/episode.run_episodes`, the real Trajectory records) runs at many engines on a
machine without GPUs. Selected by `rollout.engine: simulated`; the `simulation` config section
holds the parameters below. Every time is in seconds; 0 everywhere = zero-cost engines.

Engine (`batching: turn`: one `generate` call = one batched turn of one engine, as
`VLLMEngine.generate` is today; `batching: continuous` (default): each turn joins the engine's
running batch on its own, see actors/simulated.ContinuousBatchClock; same draws either way):
- each request draws its turn length from `length_distribution` (lognormal with median
  `median_tokens_per_turn` and shape `sigma`; Pareto with minimum `median_tokens_per_turn / 2^(1/alpha)`
  (the same median) and tail index `pareto_alpha`; or constant), at least `min_tokens_per_turn`,
  cut at the request's `max_tokens` (a cut turn finishes with "length");
- a turn that is not cut calls a tool with probability `tool_call_probability` (a crop with a
  random box: the real parser, and the real tools when `tools` is "pool" or "inline"), else
  answers `\\boxed{...}`, right with probability `answer_correct_probability`;
- the call lasts `prefill_s_per_request * len(requests) + decode_s_per_token * max(lengths)`:
  prefill is paid per request, then the batch decodes in lockstep until its longest request is
  done (a long response holds the whole batch: the long tail that asynchrony hides);
- every draw comes from the request's seed (the pipeline derives one per run, step, prompt,
  sample and turn), so a rollout is reproducible whatever the batching or the engine count.

Learner: a rank's step lasts `train_s_per_step + train_s_per_token * tokens` (all tokens of its
share, prompt included: forward and backward run over them; prompts and observations counted at
`prompt_tokens` / `observation_tokens` each when set); ranks run in parallel.
Weight sync: `export_s` on the learner, `weight_load_s` in each engine.
"""
from __future__ import annotations

import functools
import math
import random
import re
import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class SimulationConfig(BaseModel):
    """Parameters of the simulated engines (`rollout.engine: simulated`) and learners."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # response length per turn
    length_distribution: Literal["lognormal", "pareto", "constant"] = "lognormal"
    median_tokens_per_turn: float = Field(default=24.0, gt=0)
    sigma: float = Field(default=1.0, ge=0)  # lognormal shape (1.0: mean = 1.65 x median, p99 = 10 x median)
    pareto_alpha: float = Field(default=1.5, gt=0)  # Pareto tail index (smaller: heavier tail)
    min_tokens_per_turn: int = Field(default=1, ge=1)
    # behaviour
    tool_call_probability: float = Field(default=0.5, ge=0, le=1)  # per turn, while calls remain
    answer_correct_probability: float = Field(default=0.5, ge=0, le=1)
    # engine time model (seconds)
    prefill_s_per_request: float = Field(default=0.0, ge=0)
    decode_s_per_token: float = Field(default=0.0, ge=0)  # one decode step of the whole batch
    tool_s: float = Field(default=0.0, ge=0)  # one turn's tool calls (in parallel); stub/inline tools
    weight_load_s: float = Field(default=0.0, ge=0)  # an engine loading a weight update
    # "continuous": every trajectory's turns run independently through the engine's running batch
    # (actors/simulated.ContinuousBatchClock: a long turn holds no one); "turn": one lockstep
    # batch per turn of a rollout call (generation_seconds), calls one after the other
    batching: Literal["continuous", "turn"] = "continuous"
    # learner time model (seconds)
    train_s_per_step: float = Field(default=0.0, ge=0)
    train_s_per_token: float = Field(default=0.0, ge=0)
    export_s: float = Field(default=0.0, ge=0)  # learner rank 0 publishing the weights
    # The learner's token count for a sample's context. None: the sample's own tokens (what the
    # stand-in tokenizer made of the prompt and the observations). Set: the time model's sizes
    # (e.g. a 7B prompt with its image, ~600; a crop's view, ~80) whatever the stand-ins made of
    # them, so the learner's time follows the same model as a benchmark's reference schedule.
    prompt_tokens: int | None = Field(default=None, ge=0)
    observation_tokens: int | None = Field(default=None, ge=0)
    # stand-ins
    # "stub": the real parser, then a canned observation (no pixels cropped, zero cost unless
    # tool_s); "inline": the real crop code in the worker; "pool": the real ToolPool (executors).
    tools: Literal["stub", "inline", "pool"] = "stub"
    # "fast": a regex tokenizer with the Qwen2.5-VL chat format and special-token ids (no
    # transformers); "model": the model's own tokenizer (imports transformers in every worker).
    tokenizer: Literal["fast", "model"] = "fast"


# --- time model (pure) ------------------------------------------------------------------------

def sample_turn_tokens(rng: random.Random, config: SimulationConfig) -> int:
    """One turn's response length, before the request's max_tokens cut."""
    median = config.median_tokens_per_turn
    if config.length_distribution == "lognormal":
        tokens = rng.lognormvariate(math.log(median), config.sigma)
    elif config.length_distribution == "pareto":
        alpha = config.pareto_alpha
        tokens = median / 2 ** (1 / alpha) * rng.paretovariate(alpha)  # x_m * Pareto(alpha): median = x_m 2^(1/a)
    else:
        tokens = median
    return max(config.min_tokens_per_turn, int(round(min(tokens, 1e9))))


def generation_seconds(config: SimulationConfig, lengths: Sequence[int]) -> float:
    """How long one engine takes for one batched turn: prefill per request, lockstep decode."""
    if not lengths:
        return 0.0
    return config.prefill_s_per_request * len(lengths) + config.decode_s_per_token * max(lengths)


def train_seconds(config: SimulationConfig, tokens: int) -> float:
    """One learner rank's optimizer step over `tokens` tokens."""
    return config.train_s_per_step + config.train_s_per_token * tokens


def modelled_tokens(config: SimulationConfig, loss_mask: Sequence[int]) -> int:
    """A sample's tokens for the learner's time: the trained (generated) ones, plus its prompt
    (the tokens before the first trained one) and its observations (untrained runs between trained
    ones) at their own length, or at `prompt_tokens` / `observation_tokens` each when set."""
    if config.prompt_tokens is None and config.observation_tokens is None:
        return len(loss_mask)  # nothing re-sized: no pass over the tokens (zero-cost runs)
    trained_at = np.flatnonzero(np.asarray(loss_mask))
    if not len(trained_at):
        return len(loss_mask) if config.prompt_tokens is None else config.prompt_tokens
    first, last = int(trained_at[0]), int(trained_at[-1])
    prompt = first if config.prompt_tokens is None else config.prompt_tokens
    gaps = np.diff(trained_at) - 1  # untrained tokens between consecutive trained ones
    gaps = gaps[gaps > 0]  # one entry per observation
    observations = int(gaps.sum()) if config.observation_tokens is None else len(gaps) * config.observation_tokens
    trailing = len(loss_mask) - 1 - last  # an untrained run at the end, at its own length
    return prompt + len(trained_at) + observations + trailing


@dataclass(frozen=True)
class TurnPlan:
    tokens: int  # tokens generated (the last one is </tool_call> or <|im_end|> unless cut)
    kind: Literal["tool_call", "answer", "length"]
    correct: bool  # for an answer
    box: tuple[float, float, float, float]  # normalized crop box, for a tool call


def plan_turn(seed: int, config: SimulationConfig, max_tokens: int, may_call_tool: bool = True) -> TurnPlan:
    """Everything one simulated turn does, drawn from its seed."""
    rng = random.Random(seed)
    tokens = sample_turn_tokens(rng, config)
    wants_tool = rng.random() < config.tool_call_probability
    correct = rng.random() < config.answer_correct_probability
    x, y = rng.uniform(0.0, 0.6), rng.uniform(0.0, 0.6)
    side = rng.uniform(0.3, 0.4)
    box = (round(x, 3), round(y, 3), round(x + side, 3), round(y + side, 3))
    if tokens >= max_tokens:
        return TurnPlan(max_tokens, "length", False, box)
    return TurnPlan(tokens, "tool_call" if wants_tool and may_call_tool else "answer", correct, box)


# --- tokenizer stand-in -------------------------------------------------------------------------

# Qwen2.5-VL's ids for the special tokens the workflow and the learner look for.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
}
_PIECES = re.compile(r"<\|[a-z_]+\|>|</?tool_call>|\s?[A-Za-z]{1,6}|\s?\d{1,3}|\s+|[^\sA-Za-z\d]")
_ORDINARY_VOCAB = 151643


class FastTokenizer:
    """Cheap stand-in for the Qwen2.5-VL tokenizer: special tokens get their real ids, other text
    splits into word-ish pieces (~4 characters a token, like BPE on English) with stable ids.
    Only what the rollout workflow calls: `encode`, `apply_chat_template`, `convert_tokens_to_ids`."""

    eos_token_id = SPECIAL_TOKENS["<|im_end|>"]
    pad_token_id = SPECIAL_TOKENS["<|endoftext|>"]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(_encode(text))

    def convert_tokens_to_ids(self, token: str) -> int:
        return SPECIAL_TOKENS.get(token) or _piece_id(token)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False):
        """Qwen2.5-VL's chat format (images as vision_start, one image_pad, vision_end)."""
        parts = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(
                    "<|vision_start|><|image_pad|><|vision_end|>" if item["type"] == "image"
                    else "<|vision_start|><|video_pad|><|vision_end|>" if item["type"] == "video"
                    else item["text"]
                    for item in content
                )
            parts.append(f"<|im_start|>{message['role']}\n{content}<|im_end|>\n")
        text = "".join(parts) + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


@functools.lru_cache(maxsize=8192)
def _piece_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) % _ORDINARY_VOCAB


@functools.lru_cache(maxsize=4096)  # prompts and observation texts repeat
def _encode(text: str) -> tuple[int, ...]:
    return tuple(SPECIAL_TOKENS.get(piece) or _piece_id(piece) for piece in _PIECES.findall(text))


# --- the Qwen2-VL resize rule without transformers ------------------------------------------------

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize`, line for line (importing
    it pulls in torch: ~0.5 GB and seconds per process, too much for 64 simulated engines)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# --- the engine stand-in (pure) ------------------------------------------------------------------

_DECOY_ANSWER = "unknown"


class SimulatedEngine:
    """Answers `GenerationRequest`s like `VLLMEngine.generate` (token ids, log-probs, text, stop
    reason) from `plan_turn`, and says how long a real engine would have taken (it does not wait).

    `golds(seed)` gives the gold answers of the trajectory a request seed belongs to (the worker
    knows them), so a "right" answer really is right for the reward; None: always the decoy."""

    def __init__(self, config: SimulationConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer or FastTokenizer()
        self.tool_call_end = self.tokenizer.convert_tokens_to_ids("</tool_call>")
        self.end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        filler_rng = random.Random(0)
        self._filler: list[int] = [filler_rng.randrange(1000, 100_000) for _ in range(4096)]
        self._fallback = random.Random(0)

    def filler(self, count: int) -> list[int]:
        if count <= len(self._filler):
            return self._filler[:count]
        return (self._filler * (count // len(self._filler) + 1))[:count]

    def generate(self, requests, golds=None) -> tuple[list, float]:
        from policies.episode import GenerationResult

        results, lengths = [], []
        for request in requests:
            seed = request.seed if request.seed is not None else self._fallback.getrandbits(63)
            plan = plan_turn(seed, self.config, request.max_tokens)
            if plan.kind == "tool_call":
                x1, y1, x2, y2 = plan.box
                text = ('Let me look closer.\n<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": '
                        f'[{x1}, {y1}, {x2}, {y2}], "target_image": 1}}}}\n')
                token_ids = self.filler(plan.tokens - 1) + [self.tool_call_end]
            elif plan.kind == "answer":
                answers = golds(seed) if golds is not None else None
                answer = answers[0] if plan.correct and answers else _DECOY_ANSWER
                text = f"The answer is \\boxed{{{answer}}}.<|im_end|>"
                token_ids = self.filler(plan.tokens - 1) + [self.end_of_turn]
            else:  # cut at max_tokens: no answer, no tool call
                text = "Let me think about the image step by step"
                token_ids = self.filler(plan.tokens)
            stopped = plan.kind == "tool_call"
            results.append(GenerationResult(token_ids, [-0.5] * len(token_ids), text, stopped,
                                            "tool_call" if stopped else "stop" if plan.kind == "answer" else "length"))
            lengths.append(len(token_ids))
        return results, generation_seconds(self.config, lengths)
