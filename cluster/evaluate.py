"""`python -m cluster.evaluate`: score a model on V*, TallyQA, InfoVQA or MVBench with the training
tool loop.

    python -m cluster.evaluate --benchmark vstar --data PATH --model PATH [--output results.json]
        [--limit N] [--media-root DIR] [--config FILE_OR_PRESET] [key.path=value ...]

`--data` is a Pixel Reasoner eval parquet or the benchmark's original file / folder
(`cluster.eval_data`). A local Ray cluster is started (or the one of `ray job submit` /
`ray_address` joined), RolloutWorkers (`rollout.num_workers`, 1 in the tiny-cpu preset) roll every
question out ONCE with greedy decoding (temperature 0), through the same multi-turn loop and tool
pool as training, with the config's `rollout.*` limits and `tools.budgets` pixel budgets (the
paper's evaluation budgets are larger than its training ones: set `tools.budgets.*`). The official
metrics, RaPR and tool statistics (`cluster.eval_metrics`) are printed as a table, written as JSON
(`--output`, with every sample's response) and logged as one MLflow run (`tracking.*`).

Video questions (MVBench) go through the same workers and tools: the prompt shows the video as
N = `tools.budgets.num_video_frames` (16) frames sampled uniformly over the clip (MVBench's
`start`/`end` when given), each an image at the frame budget, and `select_frames` picks frames of
those N (`policies.episode.start_video_episodes`). The driver opens each video only to sample the
frame indices; the encoded file travels through the object store like an image (so workers on
other nodes need no shared file system) and only the chosen frames are ever decoded.

Exit codes: 0 done; 2 bad arguments, config or data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from cluster.config import ConfigError, PixelRayConfig, load_config
from cluster.eval_data import (BENCHMARKS, EvalDataError, EvalRecord, load_eval_set, load_image_array,
                               load_video_source)
from cluster.eval_metrics import EvalOutcome, format_table, summarize
from cluster.runtime import apply_env, run_env_vars

_SHOWN_MISSING = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--data", required=True, help="eval parquet, or the benchmark's original file/folder")
    parser.add_argument("--model", required=True, help="Hugging Face Qwen2.5-VL model folder or hub id")
    parser.add_argument("--output", help="write the results (metrics and every sample) to this JSON file")
    parser.add_argument("--limit", type=int, help="evaluate only the first N questions")
    parser.add_argument("--media-root", help="folder relative media paths start from (default: beside the data)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per rollout call (default 16)")
    parser.add_argument("--config", help="YAML file or preset name (default tiny-cpu)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_tool_calls=3")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    return args


def missing_media(records: list[EvalRecord]) -> list[str]:
    return sorted({path for record in records for path in record.media_paths if not os.path.exists(path)})


def required_resources(config: PixelRayConfig) -> dict[str, float]:
    """What the evaluation's actors reserve: rollout workers and their tool pools (no learner)."""
    rollout, tools = config.rollout, config.tools
    return {
        "CPU": rollout.num_workers * (rollout.num_cpus + tools.pool_size * tools.num_cpus_per_executor),
        "GPU": rollout.num_workers * rollout.num_gpus,
    }


def start_ray(config: PixelRayConfig):
    """Join the cluster of `ray job submit` / `ray_address`, else start a private local one (own
    temp dir, no dashboard) and check that the rollout workers fit on it."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return ray
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="pixelray-eval-", dir="/tmp"))
    available = ray.cluster_resources()
    for resource, needed in required_resources(config).items():
        if needed > available.get(resource, 0) + 1e-9:
            ray.shutdown()
            raise ConfigError(
                f"the rollout workers need {needed:g} {resource} but this machine has "
                f"{available.get(resource, 0):g}: lower rollout.num_workers, rollout.num_cpus, "
                "tools.pool_size or tools.num_cpus_per_executor (or rollout.num_gpus)"
            )
    return ray


def prompt_task(ray, record: EvalRecord, num_frames: int):
    """The rollout worker's PromptTask of a record: its image, or its video, in the object store."""
    from actors.rollout import PromptTask

    if record.is_video:
        return PromptTask(record.qid, record.question, None, record.golds, is_video=True,
                          video=ray.put(load_video_source(record, num_frames)))
    return PromptTask(record.qid, record.question, ray.put(load_image_array(record.media_paths[0])), record.golds)


def operation_record(op) -> dict:
    """A visual operation of a trace as JSON: what was called and on what (its box or frames)."""
    return {"name": op.name, "ok": op.ok, "error_kind": op.error_kind, "target_image": op.target_image,
            "box_pixels": list(op.box_pixels) if op.box_pixels else None,
            "frames": list(op.frames) if op.frames is not None else None}


def outcome_of(record: EvalRecord, trajectory) -> EvalOutcome:
    failed = [op for op in trajectory.visual_operations if not op.ok]
    return EvalOutcome(
        record=record,
        response_text=trajectory.response_text,
        num_visual_operations=trajectory.num_visual_operations,
        num_failed_operations=len(failed),
        error_kinds=tuple(op.error_kind or "unknown" for op in failed),
        finish_reason=trajectory.finish_reason,
        response_tokens=trajectory.num_response_tokens,
        operations=tuple(operation_record(op) for op in trajectory.visual_operations),
    )


def roll_out(ray, workers: list, records: list[EvalRecord], batch_size: int,
             num_frames: int = 16) -> tuple[list[EvalOutcome], dict]:
    """One greedy trajectory per record, batches spread over the workers (one call in flight per
    worker, so images and videos enter the object store only as fast as they are used; a video
    shows `num_frames` frames). Outcomes in record order."""
    from tqdm import tqdm

    batches = deque(records[start:start + batch_size] for start in range(0, len(records), batch_size))
    idle = list(workers)
    pending: dict = {}
    outcomes: dict[int, EvalOutcome] = {}
    totals = {"generated_tokens": 0, "generation_s": 0.0, "rollout_s": 0.0}
    position = {id(record): index for index, record in enumerate(records)}
    with tqdm(total=len(records), desc="evaluating", unit="question", file=sys.stderr) as progress:
        while batches or pending:
            while batches and idle:
                batch, worker = batches.popleft(), idle.pop()
                tasks = [prompt_task(ray, r, num_frames) for r in batch]
                reference = worker.rollout.remote(tasks, 1, temperature=0.0, top_p=1.0)
                pending[reference] = (worker, batch)
            done, _ = ray.wait(list(pending), num_returns=1)
            worker, batch = pending.pop(done[0])
            trajectories, stats = ray.get(done[0])
            if len(trajectories) != len(batch) or any(t.qid != r.qid for t, r in zip(trajectories, batch)):
                raise RuntimeError("the rollout worker returned trajectories that do not match the questions sent")
            for record, trajectory in zip(batch, trajectories):
                outcomes[position[id(record)]] = outcome_of(record, trajectory)
            for key in totals:
                totals[key] += stats[key]
            idle.append(worker)
            progress.update(len(batch))
    totals["tokens_per_s"] = totals["generated_tokens"] / totals["generation_s"] if totals["generation_s"] else 0.0
    return [outcomes[index] for index in range(len(records))], totals


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        config.model.path = args.model
        config.rollout.temperature = 0.0  # recorded as run params; every call also passes it
        config.rollout.group_size = 1
        if config.tracking.run_name is None:
            config.tracking.run_name = f"eval-{args.benchmark}"
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        records = load_eval_set(args.benchmark, args.data, args.media_root, args.limit)
    except (EvalDataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = missing_media(records)
    if missing:
        shown = ", ".join(missing[:_SHOWN_MISSING]) + (" ..." if len(missing) > _SHOWN_MISSING else "")
        print(f"error: {len(missing)} media file(s) not found (set --media-root?): {shown}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    apply_env(run_env_vars(config))
    started = time.perf_counter()
    try:
        ray = start_ray(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import mlflow

    from actors.rollout import RolloutWorker
    from cluster.tracking import Tracker

    tracker = Tracker(config.tracking, config)
    mlflow.log_params({"eval.benchmark": args.benchmark, "eval.data": str(Path(args.data).resolve()),
                       "eval.limit": str(args.limit), "eval.n": str(len(records)), "eval.decoding": "greedy"})
    status = "FAILED"
    try:
        rollout = config.rollout
        env = {"env_vars": run_env_vars(config)}
        workers = [
            RolloutWorker.options(num_cpus=rollout.num_cpus, num_gpus=rollout.num_gpus, runtime_env=env).remote(
                args.model, rollout, config.tools, config.model.dtype, config.seed + index,
            )
            for index in range(rollout.num_workers)
        ]
        ray.get([worker.ready.remote() for worker in workers])
        outcomes, generation = roll_out(ray, workers, records, args.batch_size,
                                           config.tools.budgets.num_video_frames)
        tool_pools = ray.get([worker.tool_stats.remote() for worker in workers])
        summary = summarize(args.benchmark, outcomes)
        tracker.log_metrics({f"{args.benchmark}/{name}": value for name, value in summary["metrics"].items()}, 0)
        results = {
            **summary,
            "model": args.model, "data": str(Path(args.data).resolve()), "limit": args.limit,
            "run_id": tracker.run_id, "tracking_uri": config.tracking.tracking_uri,
            "wall_s": round(time.perf_counter() - started, 1), "generation": generation, "tool_pools": tool_pools,
            "config": config.model_dump(mode="json"),
        }
        tracker.log_dict(results, "eval_results.json")
        status = "FINISHED"
    finally:
        tracker.finish(status)
        ray.shutdown()
    print(format_table(summary))
    print(f"MLflow run {tracker.run_id} in {config.tracking.tracking_uri}; {len(records)} questions "
          f"in {results['wall_s']} s")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
