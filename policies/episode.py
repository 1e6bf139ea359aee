"""The rollout workflow: one multi-turn episode, independent of the inference engine and of Ray.

generate -> (a tool call? run it, append the observation as a user turn) -> generate ... until a
final answer, the tool-call limit, or the token budget. The engine and the tool runner are passed
in as callables, so the same workflow drives vLLM, a simulated engine, or a test double. Two
drivers: `run_episodes` (turn-synchronous: one batched generate call per turn of all episodes)
and `run_episodes_continuously` (an engine step loop: each episode's next turn joins the running
batch as soon as its tool call is answered).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from policies.protocol import TOOL_SYSTEM_PROMPT
from policies.trajectory import Trajectory, VisualOperation, token_array
from policies.visual_ops import Observation, PixelBudgets, resize_to_budget

TOOL_CALL_END = "</tool_call>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class GenerationRequest:
    token_ids: Sequence[int]  # a copy of the trajectory's (an int32 array); engines needing a list convert
    images: list  # PIL images, one per <|image_pad|> in token_ids
    max_tokens: int
    seed: int | None = None  # per-request sampling seed: rollouts reproducible whatever the batching


@dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    text: str
    stopped_at_tool_call: bool  # ended with </tool_call> (included in token_ids, not in text)
    finish_reason: str  # "tool_call", "stop" (end of turn), "length"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def apply_chat_template(self, messages, tokenize: bool = ..., add_generation_prompt: bool = ...): ...


GenerateFn = Callable[[list[GenerationRequest]], list[GenerationResult]]
ToolFn = Callable[[list[tuple[str, list]]], list[Observation | None]]
SubmitFn = Callable[[int, GenerationRequest], None]  # (episode index, its next turn's request)
StepFn = Callable[[], list[tuple[int, GenerationResult]]]  # one engine step: the turns it finished


@dataclass
class EpisodeSettings:
    max_tool_calls: int = 3
    max_new_tokens_per_turn: int = 96
    max_model_len: int = 2048
    budgets: PixelBudgets = field(default_factory=PixelBudgets)

    @classmethod
    def from_config(cls, rollout_config, budgets: PixelBudgets) -> "EpisodeSettings":
        """The limits of a run's `rollout` config section and the tools' pixel budgets."""
        return cls(max_tool_calls=rollout_config.max_tool_calls,
                   max_new_tokens_per_turn=rollout_config.max_new_tokens_per_turn,
                   max_model_len=rollout_config.max_model_len, budgets=budgets)


@dataclass
class Episode:
    trajectory: Trajectory
    sources: list  # full-resolution visual items the tools index (target_image is 1-based)
    view_images: list  # what the model was shown, one per image pad
    done: bool = False
    seed: int | None = None  # turn t samples with seed + t


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    import hashlib

    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def prompt_token_ids(tokenizer: Tokenizer, question: str, num_images: int = 1) -> list[int]:
    """System prompt with the tool protocol, then a user turn with the image(s) and the question."""
    template = _prompt_template(tokenizer, num_images, getattr(tokenizer, "chat_template", None))
    if template is None:
        return tokenizer.encode(_prompt_text(tokenizer, question, num_images), add_special_tokens=False)
    prefix_ids, suffix = template
    return prefix_ids + tokenizer.encode(question + suffix, add_special_tokens=False)


def _prompt_text(tokenizer: Tokenizer, question: str, num_images: int) -> str:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    messages = [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, {"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_QUESTION_SLOT = "\x00question\x00"
_PROBE_QUESTION = " What is\nthis? "


@functools.lru_cache(maxsize=8)
def _prompt_template(tokenizer: Tokenizer, num_images: int, chat_template: str | None) -> tuple[list[int], str] | None:
    """The token ids of a prompt's text before the question (system prompt, tool protocol, image
    pads: ~300 tokens, the same for every prompt) and the text after it, so a prompt encodes only
    its question. Valid only when the text before ends at a special token (<|vision_end|>), where
    the tokenizer splits anyway; checked once against encoding a whole prompt, else None.
    `chat_template` is only part of the cache key: a tokenizer given another template is re-read."""
    prefix, slot, suffix = _prompt_text(tokenizer, _QUESTION_SLOT, num_images).partition(_QUESTION_SLOT)
    if not slot or not prefix.endswith("<|vision_end|>"):
        return None
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    whole = tokenizer.encode(_prompt_text(tokenizer, _PROBE_QUESTION, num_images), add_special_tokens=False)
    if whole != prefix_ids + tokenizer.encode(_PROBE_QUESTION + suffix, add_special_tokens=False):
        return None
    return prefix_ids, suffix


def observation_token_ids(tokenizer: Tokenizer, observation_text: str, num_images: int) -> list[int]:
    """Close the assistant turn, a user turn with the observation, open the next assistant turn."""
    text = (
        "<|im_end|>\n<|im_start|>user\n" + observation_text + IMAGE_PLACEHOLDER * num_images
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    return tokenizer.encode(text, add_special_tokens=False)


def start_episodes(
    tokenizer: Tokenizer,
    qid: str,
    question: str,
    original,  # full-resolution PIL image, or a source object the tools understand
    answers: Sequence[str],
    group_size: int,
    settings: EpisodeSettings,
    policy_version: int,
    tool_source=None,
    seed: int | None = None,
) -> list[Episode]:
    """G episodes of one prompt, sharing the prompt tokens and the resized original.

    `tool_source` is what the tools receive for the original (e.g. an object-store reference to
    it, put once); by default the image itself. With `seed`, sample i of the group draws its turns
    from seeds derived from (seed, i), so a rerun (e.g. after resuming) samples the same tokens.
    """
    budgets = settings.budgets
    view = resize_to_budget(original, budgets.min_pixels, budgets.original_max_pixels)
    return _start_group(
        qid, prompt_token_ids(tokenizer, question), [view], original if tool_source is None else tool_source,
        answers, group_size, policy_version, seed, is_video=False, metadata={"original_size": original.size},
    )


def video_frame_views(frames: Sequence, budgets: PixelBudgets) -> list:
    """The shown frames as the model sees them: each resized to the frame budget (the budget a
    select_frames result gets too, so a frame looks the same in the prompt and when selected)."""
    return [resize_to_budget(frame.convert("RGB"), budgets.min_pixels, budgets.frame_max_pixels,
                             budgets.patch_factor) for frame in frames]


def start_video_episodes(
    tokenizer: Tokenizer,
    qid: str,
    question: str,
    frames: Sequence,  # the N frames shown, full resolution (PIL), in time order
    answers: Sequence[str],
    group_size: int,
    settings: EpisodeSettings,
    policy_version: int,
    tool_source,  # a visual_ops.VideoSource whose frame_indices are those N frames (or a reference to one)
    seed: int | None = None,
) -> list[Episode]:
    """G episodes of one video question: the prompt shows the video as its N sampled frames.

    Route (a decision): the frames go to the model as a SEQUENCE OF IMAGES, N image items before
    the question, each at the frame budget; not as Qwen's video input. Every frame is then one
    <|image_pad|> like any image, so the engine's image input, the pad expansion of
    policies.batching, the token budget and the frame observations of select_frames (also images
    at the frame budget) need no second path, and the layout is the one the SFT data converter
    uses for `{"video": ...}` items. Frame k of the prompt (1-based) is `tool_source.frame_indices
    [k - 1]`, the numbering select_frames uses. The video itself is not an image for crop_image:
    `target_image` counts the images tools return (visual_ops skips video sources).
    """
    if not frames:
        raise ValueError(f"{qid}: a video prompt needs at least one frame")
    views = video_frame_views(frames, settings.budgets)
    metadata = {"num_frames": len(frames), "frame_size": frames[0].size}
    return _start_group(qid, prompt_token_ids(tokenizer, question, num_images=len(views)), views, tool_source,
                        answers, group_size, policy_version, seed, is_video=True, metadata=metadata)


def _start_group(qid: str, prompt: Sequence[int], views: list, source, answers: Sequence[str], group_size: int,
                 policy_version: int, seed: int | None, is_video: bool, metadata: dict) -> list[Episode]:
    arrays = [np.asarray(view.convert("RGB")) for view in views]
    prompt = token_array(prompt)  # converted once, copied as bytes into each sample
    episodes = []
    for sample_index in range(group_size):
        trajectory = Trajectory(qid=qid, sample_index=sample_index, answers=tuple(answers), is_video=is_video,
                                policy_version=policy_version, metadata=dict(metadata))
        trajectory.extend(prompt, trainable=False)
        trajectory.images.extend(arrays)
        episodes.append(Episode(
            trajectory=trajectory, sources=[source], view_images=list(views),
            seed=None if seed is None else derive_seed(seed, qid, sample_index),
        ))
    return episodes


def run_episodes(
    episodes: list[Episode],
    generate: GenerateFn,
    run_tools: ToolFn,
    tokenizer: Tokenizer,
    settings: EpisodeSettings,
) -> list[Trajectory]:
    """Drive all episodes to completion, one batched generate call per turn (turn-synchronous;
    `next_request` / `apply_result` / `append_observation` drive one episode at a time instead)."""
    for turn in range(settings.max_tool_calls + 1):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        requests, requesting = [], []
        for episode in active:
            request = next_request(episode, turn, settings)
            if request is not None:
                requests.append(request)
                requesting.append(episode)
        results = generate(requests) if requests else []
        tool_requests, tool_episodes = [], []
        for episode, result in zip(requesting, results):
            tool_request = apply_result(episode, result, turn, settings)
            if tool_request is not None:
                tool_requests.append(tool_request)
                tool_episodes.append(episode)
        observations = run_tools(tool_requests) if tool_requests else []
        for episode, observation in zip(tool_episodes, observations):
            _append_observation(episode, observation, tokenizer)
    for episode in episodes:
        finish_unfinished(episode)
    return [e.trajectory for e in episodes]


def run_episodes_continuously(
    episodes: list[Episode],
    submit: SubmitFn,
    step: StepFn,
    run_tools: ToolFn,
    tokenizer: Tokenizer,
    settings: EpisodeSettings,
) -> list[Trajectory]:
    """Drive all episodes to completion through an engine that batches continuously.

    `submit(index, request)` adds the next turn of `episodes[index]` to the engine's running batch;
    `step()` runs ONE engine step and returns (index, result) for each turn that finished in it.
    After every step, the tool calls of the turns it finished run as one batched `run_tools` call
    and each answered episode submits its next turn at once, before the next step: a long turn
    holds only its own trajectory. Tools run between steps, not beside them, so which step a turn
    joins depends on the step sequence alone (not on tool latency): with per-request seeds the
    same episodes give the same schedule and the same tokens run to run.

    Each trajectory's `metadata["engine_steps"]` lists, per turn, (engine steps run before it was
    submitted, the step it finished in, counted from 1).
    """
    turns = [0] * len(episodes)
    submitted_at: dict[int, int] = {}  # index -> steps run when its current turn was submitted
    steps = 0

    def submit_next(index: int) -> None:
        episode = episodes[index]
        request = next_request(episode, turns[index], settings)
        if request is None:  # no room left: finished with "length"
            return
        submitted_at[index] = steps
        submit(index, request)

    for index, episode in enumerate(episodes):
        episode.trajectory.metadata["engine_steps"] = []
        submit_next(index)
    while submitted_at:
        finished = step()
        steps += 1
        tool_requests, calling = [], []
        for index, result in sorted(finished, key=lambda pair: pair[0]):  # engine order is not part of the contract
            if index not in submitted_at:
                raise RuntimeError(f"the engine finished a turn of episode {index}, which has none in flight")
            episode = episodes[index]
            episode.trajectory.metadata["engine_steps"].append((submitted_at.pop(index), steps))
            tool_request = apply_result(episode, result, turns[index], settings)
            if tool_request is not None:
                tool_requests.append(tool_request)
                calling.append(index)
        observations = run_tools(tool_requests) if tool_requests else []
        for index, observation in zip(calling, observations, strict=True):
            _append_observation(episodes[index], observation, tokenizer)
            turns[index] += 1
            submit_next(index)
    for episode in episodes:
        finish_unfinished(episode)
    return [e.trajectory for e in episodes]


def next_request(episode: Episode, turn: int, settings: EpisodeSettings) -> GenerationRequest | None:
    """The request of `episode`'s turn `turn` (0-based); None (and the episode finished with
    "length") when its token budget is used up."""
    room = settings.max_model_len - _engine_length(episode, settings.budgets.patch_factor)
    if room <= 0:
        _finish(episode, "length")
        return None
    return GenerationRequest(
        token_ids=episode.trajectory.token_ids[:], images=list(episode.view_images),
        max_tokens=min(settings.max_new_tokens_per_turn, room),
        seed=None if episode.seed is None else derive_seed(episode.seed, turn),
    )


def apply_result(episode: Episode, result: GenerationResult, turn: int,
                 settings: EpisodeSettings) -> tuple[str, list] | None:
    """Append generated turn `turn`; the tool request (turn text, sources) when the episode goes
    on with a tool call, else None (the episode is finished)."""
    trajectory = episode.trajectory
    trajectory.extend(result.token_ids, trainable=True, logprobs=result.logprobs)
    turn_text = result.text + (TOOL_CALL_END if result.stopped_at_tool_call else "")
    trajectory.response_text += turn_text
    if not result.stopped_at_tool_call:
        _finish(episode, result.finish_reason)
    elif turn == settings.max_tool_calls:
        _finish(episode, "tool_limit")
    else:
        return turn_text, list(episode.sources)
    return None


def append_observation(episode: Episode, observation: Observation | None, tokenizer: Tokenizer) -> None:
    """Append a tool call's observation (None: no parsable call) as a user turn."""
    _append_observation(episode, observation, tokenizer)


def finish_unfinished(episode: Episode) -> None:
    """An episode that ran out of turns without finishing ends with "length"."""
    if not episode.done:
        _finish(episode, "length")


def rollout_stats(trajectories: list[Trajectory], generation_s: float, rollout_s: float, policy_version: int) -> dict:
    """What a rollout worker reports of one rollout call, whatever its engine."""
    generated = sum(t.num_response_tokens for t in trajectories)
    return {
        "generated_tokens": generated,
        "generation_s": generation_s,
        "rollout_s": rollout_s,
        "tokens_per_s": generated / generation_s if generation_s else 0.0,
        "policy_version": policy_version,
    }


def _append_observation(episode: Episode, observation: Observation | None, tokenizer: Tokenizer) -> None:
    trajectory = episode.trajectory
    if observation is None:  # stopped at </tool_call> yet no parsable block: report it to the model
        text, views, fulls = "Execution error: no tool call found before </tool_call>.", [], []
        trajectory.visual_operations.append(VisualOperation(name=None, ok=False, error_kind="no_tool_call"))
    else:
        text, views, fulls = observation.text, observation.view_images, observation.full_images
        trajectory.visual_operations.append(VisualOperation(
            name=observation.tool_name, ok=observation.ok, error_kind=observation.error_kind,
            target_image=observation.target_image, box_pixels=observation.box_pixels, frames=observation.frames,
            source_size=observation.source_size,
        ))
    trajectory.extend(observation_token_ids(tokenizer, text, len(views)), trainable=False)
    episode.view_images.extend(views)
    episode.sources.extend(fulls)
    trajectory.images.extend(np.asarray(v.convert("RGB")) for v in views)


def _engine_length(episode: Episode, patch: int) -> int:
    """Length as the engine counts it: each image pad expands to one token per patch x patch block."""
    expansion = sum((v.width // patch) * (v.height // patch) - 1 for v in episode.view_images)
    return len(episode.trajectory.token_ids) + expansion


def _finish(episode: Episode, reason: str) -> None:
    episode.done = True
    episode.trajectory.finish_reason = reason
