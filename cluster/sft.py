"""`python -m cluster.sft`: warm-start SFT, the checkpoint an RL run starts from.

With no arguments: the tiny-cpu preset — generated tool-use traces for the built-in synthetic zoom
task (incl. self-correction traces), a local Ray cluster with the DeepSpeed learner group, a cosine
lr schedule with warmup, loss per step in MLflow, and the model (weights, tokenizer, processor)
in <sft.output_dir>/hf. Then start RL from it:

    python -m cluster.sft [--config FILE_OR_PRESET] [key.path=value ...]
    python -m cluster.run model.path=<sft.output_dir>/hf

`sft.data_path=FILE` trains on the Pixel Reasoner SFT format (`message_list` records) instead.
`sft.skill_gate.*` (synthetic task) probes the warm start's skills every epoch (or part of one) and stops at the
first check it passes; it exits with 3 if the warm start misses the gate (config.SkillGateConfig).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from cluster.config import ConfigError, PixelRayConfig

logger = logging.getLogger(__name__)
GATE_FAILED = 3  # exit code: trained, but the warm start missed sft.skill_gate


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cluster.sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file or preset name (tiny-cpu, qwen2.5-vl-7b)")
    parser.add_argument("--summary-json", help="also write the summary (with the per-step loss) to this file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.epochs=3 sft.lr=1e-3")
    return parser.parse_args(argv)


def build_examples(config: PixelRayConfig, model_path: str):
    """The SFT examples: the Pixel Reasoner file of `sft.data_path`, else generated traces."""
    from transformers import AutoTokenizer

    from policies.protocol import TOOL_SYSTEM_PROMPT
    from policies.sft_data import read_sft_json, synthetic_zoom_traces

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sft, budgets = config.sft, config.tools.budgets
    if sft.data_path:
        return read_sft_json(sft.data_path, tokenizer, budgets, image_root=sft.image_root,
                             system_prompt=None if sft.keep_data_system_prompt else TOOL_SYSTEM_PROMPT, strict=False)
    return synthetic_zoom_traces(tokenizer, config.sft_trace_spec(), sft.num_traces, budgets,
                                 sft.self_correction_fraction, seed=sft_seed(config), direct_fraction=sft.direct_fraction,
                                 closeup_fraction=sft.closeup_fraction, closeup_answers=sft.closeup_answers,
                                 misdirected_fraction=sft.misdirected_fraction, misdirected_crops=sft.misdirected_crops,
                                 direct_answers=sft.direct_answers)


def sft_seed(config: PixelRayConfig) -> int:
    """The seed of the SFT draw (generated traces and their order): sft.seed, else the run's seed."""
    return config.seed if config.sft.seed is None else config.sft.seed


def plan_steps(num_examples: int, batch_size: int, epochs: int, max_steps: int | None) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps); a last partial batch of an epoch is a step too."""
    per_epoch = math.ceil(num_examples / batch_size)
    total = per_epoch * epochs
    return per_epoch, min(total, max_steps) if max_steps else total


def write_model(learners, model_path: str, output_dir: Path) -> Path:
    """<output_dir>/hf: weights + tokenizer + processor, written to a staging folder and renamed."""
    from cluster.checkpoint import copy_processor_files

    output_dir.mkdir(parents=True, exist_ok=True)
    staging, final = output_dir / ".staging-hf", output_dir / "hf"
    shutil.rmtree(staging, ignore_errors=True)
    learners.save_hf(str(staging.resolve()))
    copy_processor_files(model_path, staging)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(staging, final)
    return final


def weights_digest(hf_dir: Path) -> str:
    """sha256 of the written weights: names the warm start a draw produced. The same seed, data and
    machine give the same digest (tests/test_sft.py); another CPU's float kernels round differently
    and, over hundreds of steps, give another warm start."""
    digest = hashlib.sha256()
    for path in sorted(hf_dir.glob("*.safetensors")):
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    from cluster.run import prepare, resolve_model, start_ray
    from cluster.runtime import machine_info

    args = parse_args(argv)
    config = prepare(args.config, args.overrides)
    if config is None:
        return 2

    from actors.learner import LearnerGroup, cosine_schedule
    from cluster.tracking import Tracker

    started = time.perf_counter()
    sft = config.sft
    model_path = resolve_model(config)
    examples = build_examples(config, model_path)
    limit = config.rollout.max_model_len  # what RL can hold is what SFT teaches
    too_long = [e for e in examples if e.engine_length(config.tools.budgets.patch_factor) > limit]
    examples = [e for e in examples if e.engine_length(config.tools.budgets.patch_factor) <= limit]
    if too_long:
        print(f"skipping {len(too_long)} examples longer than rollout.max_model_len={limit}", file=sys.stderr)
    if not examples:
        print("error: no SFT examples", file=sys.stderr)
        return 2
    data_s = time.perf_counter() - started
    per_epoch, total_steps = plan_steps(len(examples), sft.batch_size, sft.epochs, sft.max_steps)

    freeze = config.trainer.freeze_vision_tower if sft.freeze_vision_tower is None else sft.freeze_vision_tower
    trainer = config.trainer.model_copy(update={"lr": sft.lr, "freeze_vision_tower": freeze, "kl_coef": 0.0})
    required = {"CPU": trainer.num_learners * trainer.num_cpus_per_learner,
                "GPU": trainer.num_learners * trainer.num_gpus_per_learner}
    try:
        ray = start_ray(config, required)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    timings = {"data_s": data_s, "ray_s": time.perf_counter() - started - data_s}
    tracker = Tracker(config.tracking, config)
    status, learners = "FAILED", None
    gate, checks = sft.skill_gate, []
    history: list[dict[str, float]] = []
    kinds: dict[str, int] = {}
    for example in examples:
        kinds[example.kind] = kinds.get(example.kind, 0) + 1
    try:
        import mlflow

        mlflow.set_tag("pixelray.mode", "sft")
        tracker.log_metrics({"sft/examples": len(examples), "sft/total_steps": total_steps}, 0)
        mark = time.perf_counter()
        learners = LearnerGroup(model_path, trainer, 1.0, config.device, samples_per_step=sft.batch_size,
                                scheduler=cosine_schedule(total_steps, sft.warmup_ratio, sft.min_lr_ratio))
        timings["learner_setup_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        progress = tqdm(total=total_steps, desc="SFT steps", unit="step", file=sys.stderr)
        step, written_at, hf_dir = 0, None, None
        for epoch, done_in_epoch, indices in epoch_batches(len(examples), sft.batch_size, sft.epochs, sft_seed(config)):
            if step == total_steps:
                break
            metrics = learners.sft([examples[i].train_sample() for i in indices])
            metrics["epoch"] = epoch
            history.append({"step": step, **metrics})
            tracker.log_metrics({f"sft/{k}": v for k, v in metrics.items()}, step)
            progress.update()
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            step += 1
            epochs_done = epoch + done_in_epoch / per_epoch
            if gate and gate_due(gate.first_check_epoch, gate.checks_per_epoch, epochs_done, done_in_epoch, per_epoch):
                mark_check = time.perf_counter()
                hf_dir, written_at = write_model(learners, model_path, Path(sft.output_dir)), step
                checks.append(check_skills(hf_dir, config, round(epochs_done, 2), step))
                tracker.log_metrics({f"sft/skill_{k}": v for k, v in checks[-1].items() if isinstance(v, float)}, step)
                timings["skill_checks_s"] = timings.get("skill_checks_s", 0.0) + time.perf_counter() - mark_check
                progress.write(f"epoch {epochs_done:.2f}: skill gate {checks[-1]['verdict']} ({checks[-1]['why']})")
                if checks[-1]["verdict"] != "short":
                    break
        progress.close()
        timings["loop_s"] = time.perf_counter() - mark - timings.get("skill_checks_s", 0.0)
        mark = time.perf_counter()
        if written_at != step:
            hf_dir = write_model(learners, model_path, Path(sft.output_dir))
        timings["save_s"] = time.perf_counter() - mark
        if gate:
            mlflow.set_tag("pixelray.skill_gate", checks[-1]["verdict"] if checks else "unchecked")
        status = "FINISHED"
    finally:
        tracker.finish(status)
        if learners is not None:
            learners.shutdown()
        ray.shutdown()

    summary = {
        "run_id": tracker.run_id, "tracking_uri": config.tracking.tracking_uri, "base_model": model_path,
        "model": str(hf_dir.resolve()), "weights_sha256": weights_digest(hf_dir), "machine": machine_info(),
        "examples": len(examples), "kinds": kinds, "skipped_too_long": len(too_long),
        "steps": len(history), "steps_per_epoch": per_epoch, "epochs": sft.epochs,
        "epochs_trained": history[-1]["epoch"] + 1, "lr": sft.lr,
        "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
        "last_token_accuracy": history[-1]["token_accuracy"],
        "trained_tokens": sum(h["trained_tokens"] for h in history),
        "train_s": round(sum(h["train_s"] for h in history), 1), **{k: round(v, 1) for k, v in timings.items()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if gate:
        summary["skill_gate"] = {"passed": checks[-1]["verdict"] == "passed" if checks else False,
                                 **gate.model_dump(mode="json"), "checks": checks}
    (Path(sft.output_dir) / "sft_summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({**summary, "history": history}, indent=2))
    print(f"SFT: {summary['examples']} examples {kinds}, {summary['steps']} steps over {summary['epochs_trained']} epochs "
          f"in {summary['wall_s']} s (training {summary['train_s']} s)")
    every = max(1, len(history) // 10)
    print("step  epoch      loss  token_acc        lr")
    for h in history[::every] + ([history[-1]] if (len(history) - 1) % every else []):
        print(f"{h['step']:>4}  {h['epoch']:>5}  {h['loss']:>8.4f}  {h['token_accuracy']:>9.3f}  {h['lr']:>8.2e}")
    print(f"MLflow run {tracker.run_id} in {config.tracking.tracking_uri}")
    print(f"model: {summary['model']}\nstart RL from it: python -m cluster.run model.path={summary['model']}")
    if gate and not summary["skill_gate"]["passed"]:
        last = checks[-1] if checks else {"epoch": summary["epochs"], "why": "no check ran"}
        print(f"error: the warm start failed sft.skill_gate at epoch {last['epoch']:g}: {last['why']} "
              f"(the model is written; another seed draws another warm start)", file=sys.stderr)
        return GATE_FAILED
    return 0


def epoch_batches(num_examples: int, batch_size: int, epochs: int, seed: int):
    """(epoch, batches done in it, example indices) per optimizer step; each epoch in its own order."""
    for epoch in range(epochs):
        order = list(range(num_examples))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for done, start in enumerate(range(0, num_examples, batch_size), 1):
            yield epoch, done, order[start:start + batch_size]


def gate_due(first_check_epoch: int, checks_per_epoch: int, epochs_done: float, done_in_epoch: int,
             per_epoch: int) -> bool:
    """Whether a skill-gate check falls after this step: `checks_per_epoch` evenly spaced points
    of every epoch (the last at its end), from `first_check_epoch` epochs of training on."""
    points = {math.ceil(k * per_epoch / checks_per_epoch) for k in range(1, checks_per_epoch + 1)}
    return done_in_epoch in points and epochs_done >= first_check_epoch - 1e-9


def check_skills(hf_dir: Path, config: PixelRayConfig, epoch: float, step: int) -> dict:
    """One skill-gate check of the model just written: the probe's numbers and the verdict."""
    from cluster.skill_probe import gate_verdict, probe

    gate = config.sft.skill_gate
    result = probe(str(hf_dir), config, gate.probe_examples)
    verdict, why = gate_verdict(result, gate.min_reading, gate.box_range)
    localization = result["localization"] or {}
    return {"epoch": epoch, "step": step, "reading": float(result["reading"]["accuracy"]),
            "reading_after_zoom": float(result["reading_after_zoom"]["accuracy"]),  # probed anyway: kept
            **{name: float(localization[key]) for name, key in (("box", "accuracy"), ("holds_square", "holds_square"))
               if key in localization},
            "verdict": verdict, "why": why}


if __name__ == "__main__":
    sys.exit(main())
