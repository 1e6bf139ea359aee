"""`python -m cluster.run`: run Pixel Reasoner RL end to end.

With no arguments: the tiny-cpu preset — a local Ray cluster, the tiny Qwen2.5-VL model and the
synthetic zoom data (both built into the cache if missing), a few RL steps, MLflow in
./mlflow.db. Under `ray job submit` it joins the job's cluster instead.

    python -m cluster.run [--config FILE_OR_PRESET] [key.path=value ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from cluster.checkpoint import CheckpointManager
from cluster.config import ConfigError, PixelRayConfig, load_config
from cluster.runtime import apply_env, cache_root, run_env_vars

SUMMARY_METRICS = (
    "reward/total", "reward/accuracy", "reward/curiosity", "reward/penalty", "rollout/rapr",
    "rollout/tool_calls_per_trajectory", "train/loss", "rollout/tokens_per_s", "time/step_s",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file or preset name (tiny-cpu, qwen2.5-vl-7b)")
    parser.add_argument("--summary-json", help="also write the final summary to this file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-6 steps=10")
    return parser.parse_args(argv)


def resolve_model(config: PixelRayConfig) -> str:
    if config.model.path:
        return config.model.path
    from policies.model import ensure_tiny_model

    return str(ensure_tiny_model(config.model.tiny))


def resolve_data(config: PixelRayConfig):
    from policies.data import read_rl_parquet
    from policies.synthetic import ensure_synthetic_zoom

    if config.data.train_path:
        return read_rl_parquet(config.data.train_path)
    paths = ensure_synthetic_zoom(config.data.synthetic, cache_root() / "data")
    return read_rl_parquet(paths["train"])


def start_ray(config: PixelRayConfig, required: dict[str, float] | None = None):
    """Join the configured cluster, or start a local one that must fit `required` (default: the
    RL run's actors, `config.required_resources()`)."""
    import ray

    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:  # under `ray job submit`, or a cluster named in the config (it may autoscale)
        ray.init(address=address, log_to_driver=False)
        return ray
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="pixelray-", dir="/tmp"))
    # A local cluster cannot grow: a plan that does not fit would wait forever for its actors.
    available = ray.cluster_resources()
    for resource, needed in (required or config.required_resources()).items():
        if needed > available.get(resource, 0) + 1e-9:
            ray.shutdown()
            raise ConfigError(
                f"the actors need {needed:g} {resource} but this machine has {available.get(resource, 0):g}: "
                "lower rollout.num_cpus, trainer.num_cpus_per_learner, tools.num_cpus_per_executor or "
                "reward.num_cpus (or the GPU counts)"
            )
    return ray


def resume(config: PixelRayConfig, checkpoints: CheckpointManager, pipeline) -> int:
    """Restore the checkpoint named by `config.resume`; returns the first step still to run."""
    if not config.resume:
        return 0
    path = checkpoints.latest() if config.resume == "auto" else Path(config.resume)
    if path is None:
        raise FileNotFoundError(f"resume=auto but no checkpoint in {checkpoints.root}")
    state = CheckpointManager.driver_state(path)
    pipeline.restore(path, state)
    return state["step"] + 1


def format_summary(history: list[tuple[int, dict[str, float]]]) -> str:
    names = [n for n in SUMMARY_METRICS if any(n in m for _, m in history)]
    header = "step  " + "  ".join(f"{n.split('/')[-1][:14]:>14}" for n in names)
    lines = [header]
    for step, metrics in history:
        lines.append(f"{step:>4}  " + "  ".join(f"{metrics.get(n, float('nan')):>14.4f}" for n in names))
    return "\n".join(lines)


def prepare(config_file: str | None, overrides: list[str]) -> PixelRayConfig | None:
    """The validated config with this process's environment set from it; None after printing why
    the config is invalid (the entry point then exits with 2, before anything starts)."""
    try:
        config = load_config(config_file, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    logging.basicConfig(level=logging.WARNING)
    apply_env(run_env_vars(config))
    return config


def heldout_evaluator(config: PixelRayConfig, ray, pipeline, tracker, evaluations: list[dict]):
    """`evaluate(steps_done)`: held-out metrics after that many RL steps, logged at that step and
    appended to `evaluations`; does nothing when `eval_every_steps` is 0 or there is no eval split."""
    from cluster.heldout import evaluate_heldout, heldout_records

    records = heldout_records(config, cache_root() / "data") if config.eval_every_steps else []
    batch_size = config.prompts_per_step * config.rollout.group_size

    def evaluate(steps_done: int) -> None:
        if not records:
            return
        metrics = evaluate_heldout(ray, pipeline.workers, records, batch_size, config.tools.budgets.num_video_frames)
        metrics["eval/policy_version"] = float(pipeline.policy_version)
        tracker.log_metrics(metrics, steps_done)
        evaluations.append({"steps_done": steps_done, **metrics})
        print(f"held-out after {steps_done} steps: accuracy {metrics['eval/accuracy']:.3f}, "
              f"RaPR {metrics['eval/rapr']:.3f} ({len(records)} questions)", file=sys.stderr)

    return evaluate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = prepare(args.config, args.overrides)
    if config is None:
        return 2

    from cluster.pipeline import RLPipeline
    from cluster.tracking import Tracker

    started = time.perf_counter()
    model_path = resolve_model(config)
    records = resolve_data(config)
    try:
        ray = start_ray(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tracker = Tracker(config.tracking, config)
    checkpoints = CheckpointManager(config.checkpoint)
    history: list[tuple[int, dict[str, float]]] = []
    step_details: list[dict] = []
    evaluations: list[dict] = []
    status = "FAILED"
    pipeline = None
    try:
        pipeline = RLPipeline(config, model_path, records)
        first_step = resume(config, checkpoints, pipeline)
        evaluate = heldout_evaluator(config, ray, pipeline, tracker, evaluations)
        evaluate(first_step)
        progress = tqdm(total=config.steps - first_step, desc="RL steps", unit="step", file=sys.stderr)
        for result in pipeline.run(first_step, config.steps):
            step = result.step
            progress.update()
            history.append((step, result.metrics))
            step_details.append({"step": step, "qids": sorted({t.qid for t in result.trajectories}),
                                 "metrics": result.metrics})
            tracker.log_metrics(result.metrics, step)
            if config.eval_every_steps and ((step + 1) % config.eval_every_steps == 0 or step == config.steps - 1):
                evaluate(step + 1)
            if config.tracking.pictures_every_steps and step % config.tracking.pictures_every_steps == 0:
                tracker.log_trajectory_picture(result.trajectories, step)
            every = config.checkpoint.every_steps
            if step == config.steps - 1 or (every and (step + 1) % every == 0):
                checkpoints.save(step, pipeline.learners, model_path, pipeline.state(result.next_stream_state),
                                 pipeline.save_extra_state)
        progress.close()
        status = "FINISHED"
    finally:
        tracker.finish(status)
        if pipeline is not None:
            pipeline.shutdown()
        ray.shutdown()
    if not history:
        print(f"nothing to do: the checkpoint already covers all {config.steps} steps")
        return 0
    summary = {
        "run_id": tracker.run_id, "first_step": first_step, "tracking_uri": config.tracking.tracking_uri, "model": model_path,
        "steps": len(history), "wall_s": round(time.perf_counter() - started, 1), "final": history[-1][1],
    }
    print(format_summary(history))
    print(f"MLflow run {tracker.run_id} in {config.tracking.tracking_uri}; {len(history)} steps in {summary['wall_s']} s")
    if args.summary_json:
        with open(args.summary_json, "w") as handle:
            json.dump({**summary, "history": step_details, "evaluations": evaluations}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
