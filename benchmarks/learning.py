"""The learning demonstration: does RL with the curiosity bonus teach the tiny model to zoom, and
does RL without it fall into the paper's learning trap?

    .venv/bin/python -m benchmarks.learning [--json FILE] [--plot FILE] [--workdir DIR]
        [--config PRESET_OR_FILE] [key.path=value ...]

One command runs the recipe of `cluster/configs/zoom-curiosity.yaml` (each stage is the project's
own entry point, in its own process, so each starts and stops its own local Ray):
1. warm-start SFT (`python -m cluster.sft`) on generated traces, incl. self-correction, direct
   (no-zoom) traces and close-up perception examples;
2. RL with curiosity (`python -m cluster.run`, the preset's reward: alpha 2, H 0.6) from the SFT
   checkpoint;
3. the same RL with `reward.curiosity.alpha=0`, same seed, same data.
With `sft.skill_gate` set, SFT stops at the first epoch whose warm start passes the gate, and
`--draws N` tries up to N SFT draws (`sft.seed` + 1000 each) until one does.
Between 1 and 2, `python -m cluster.skill_probe` measures the warm start's two skills teacher-forced
(reading a close-up, choosing the named cell to crop): the lift needs both.
Both RL runs evaluate the held-out split greedily before the first step and every
`eval_every_steps` steps. The table reports held-out accuracy after warm start, after RL with and
without curiosity, RaPR at the end of each, and the issue's goals; the plot (PNG, also logged to
MLflow with the JSON in a "learning-summary" run) shows held-out accuracy and RaPR per step for
both runs, plus the training batches' accuracy and RaPR. Extra `key.path=value` overrides go to every stage.
`--rl-seeds 0,1,2,3` runs the RL pair once per RL seed (`seed=S`) from the one warm start and
reports how many seeds met each goal (benchmarks/learning_rates.py): one draw decides little here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import fmean

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.learning_rates import across_seeds, format_rates_table, plot_seeds  # noqa: E402

PRESET = "zoom-curiosity"
RUNS = (("curiosity", []), ("no-curiosity", ["reward.curiosity.alpha=0"]))
GOAL_LIFT = 0.15  # RL with curiosity over warm start alone, held-out accuracy
GOAL_RAPR = 0.3
# A trapped run answers every question without zooming; one that stops answering (every response
# cut off at the token limit) has collapsed, and its RaPR of 0 is not the trap.
MIN_ANSWERED_RATE = 0.9


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
    return seeds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=PRESET, help="preset name or YAML file (default: %(default)s)")
    parser.add_argument("--workdir", default="runs/learning", help="checkpoints, summaries, mlflow.db (default: %(default)s)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="the PNG (default: <workdir>/learning.png)")
    parser.add_argument("--skip-sft", action="store_true", help="reuse <workdir>/sft/hf from an earlier run")
    parser.add_argument("--draws", type=int, default=1,
                        help="SFT draws to try until one passes sft.skill_gate (default: %(default)s)")
    parser.add_argument("--rl-seeds", type=seed_list, metavar="S,S,...",
                        help="run the RL pair once per RL seed from the same warm start and report goal rates")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every stage, e.g. steps=20")
    return parser.parse_args(argv)


class StageFailed(RuntimeError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def run_stage(name: str, module: str, arguments: list[str], workdir: Path) -> float:
    """Run `python -m module arguments` in `workdir`; the stage's output goes to <workdir>/<name>.log."""
    started = time.perf_counter()
    log = workdir / f"{name}.log"
    print(f"[{name}] python -m {module} {' '.join(arguments)}  (log: {log})", file=sys.stderr, flush=True)
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, "-m", module, *arguments], cwd=workdir, stdout=handle,
                               stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise StageFailed(f"stage {name} exited with {code}; the end of {log}:\n{tail}", code)
    return time.perf_counter() - started


def warm_start(config: str, overrides: list[str], workdir: Path, max_draws: int, timings: dict) -> list[dict]:
    """Stage 1: SFT into <workdir>/sft. With `sft.skill_gate` set, a draw that misses the gate
    (exit code GATE_FAILED) is followed by another SFT draw (`sft.seed` + 1000), up to `max_draws`;
    one entry per draw: its seed, the digest of its weights and the CPU kernels that made them
    (together they name the warm start), gate verdict and checks (none without a gate)."""
    from cluster.config import load_config
    from cluster.sft import GATE_FAILED, sft_seed

    first_seed = sft_seed(load_config(config, overrides))
    draws = []
    for draw in range(max_draws):
        seed = first_seed + 1000 * draw
        summary_path = workdir / "sft.json"
        try:
            timings[f"sft-{draw}" if draw else "sft"] = run_stage(
                "sft", "cluster.sft", ["--config", config, "--summary-json", str(summary_path),
                                       f"sft.output_dir={workdir / 'sft'}", *overrides, f"sft.seed={seed}"], workdir)
        except StageFailed as failure:
            if failure.code != GATE_FAILED:
                raise
        summary = json.loads(summary_path.read_text())
        gate = summary.get("skill_gate")
        checks = gate["checks"] if gate else []
        verdict = {"passed": gate["passed"], "why": checks[-1]["why"] if checks else "no check ran"} if gate else {}
        draws.append({"sft_seed": seed, "weights_sha256": summary["weights_sha256"],
                      "torch_cpu_capability": summary["machine"]["torch_cpu_capability"], "checks": checks, **verdict})
        if not gate or gate["passed"]:
            break
        print(f"[sft] draw {draw + 1} (sft.seed={seed}) missed the skill gate: {draws[-1]['why']}", file=sys.stderr)
    return draws


def rl_pair(config: str, overrides: list[str], warm_start_dir: Path, workdir: Path, suffix: str,
            timings: dict) -> dict[str, dict]:
    """Stages 2 and 3: RL with curiosity and with alpha = 0 from the warm start; their curves.
    `suffix` keeps the files (and MLflow run names) of several RL seeds apart."""
    curves = {}
    for name, extra in RUNS:
        summary_path = workdir / f"rl-{name}{suffix}.json"
        timings[name] = run_stage(f"{name}{suffix}", "cluster.run", [
            "--config", config, "--summary-json", str(summary_path), f"model.path={warm_start_dir}",
            f"tracking.run_name={name}{suffix}", f"checkpoint.directory={workdir / 'checkpoints' / (name + suffix)}",
            *overrides, *extra], workdir)
        curves[name] = curve(json.loads(summary_path.read_text()))
    return curves


def curve(summary: dict) -> dict[str, list[float]]:
    """Per-evaluation and per-step series of one RL run's summary JSON."""
    evaluations = summary["evaluations"]
    if not evaluations:
        raise RuntimeError("the RL run made no held-out evaluation (eval_every_steps = 0, or no eval split)")
    return {
        "eval_steps": [e["steps_done"] for e in evaluations],
        "eval_accuracy": [e["eval/accuracy"] for e in evaluations],
        "eval_rapr": [e["eval/rapr"] for e in evaluations],
        "eval_answered_rate": [e.get("eval/answered_rate") for e in evaluations],
        "train_steps": [h["step"] + 1 for h in summary["history"]],
        "train_rapr": [h["metrics"]["rollout/rapr"] for h in summary["history"]],
        "train_accuracy": [h["metrics"]["reward/accuracy"] for h in summary["history"]],
        # sampled answers with / without a visual operation (None: the batch had none of that kind)
        "train_accuracy_pixel_reasoning": [h["metrics"].get("reward/accuracy_pixel_reasoning")
                                           for h in summary["history"]],
        "train_accuracy_text_only": [h["metrics"].get("reward/accuracy_text_only") for h in summary["history"]],
        # share of the batch's crops holding the named square's centre (None: no crop that step)
        "train_crop_hit_rate": [h["metrics"].get("rollout/crop_hit_rate") for h in summary["history"]],
        # mean share of the image a crop covers (1.0: whole-image "zooms"; None: no crop that step)
        "train_crop_area": [h["metrics"].get("rollout/crop_area_mean") for h in summary["history"]],
    }


def results_of(curves: dict[str, dict], timings: dict[str, float]) -> dict:
    with_curiosity, without = curves["curiosity"], curves["no-curiosity"]
    warm_start = with_curiosity["eval_accuracy"][0]
    final = {name: {"accuracy": c["eval_accuracy"][-1], "rapr": c["eval_rapr"][-1]} for name, c in curves.items()}
    lift = final["curiosity"]["accuracy"] - warm_start
    collapsed = [name for name, c in curves.items() if final_answered_rate(c) < MIN_ANSWERED_RATE]
    goals = {
        f"curiosity lifts held-out accuracy by >= {GOAL_LIFT:.2f}": lift >= GOAL_LIFT,
        f"curiosity run keeps RaPR >= {GOAL_RAPR}": final["curiosity"]["rapr"] >= GOAL_RAPR,
        "alpha=0 run's RaPR ends below the curiosity run's": (final["no-curiosity"]["rapr"] < final["curiosity"]["rapr"]
                                                              and "no-curiosity" not in collapsed),
    }
    return {
        "warm_start": {"accuracy": warm_start, "rapr": with_curiosity["eval_rapr"][0],
                       "accuracy_seen_by_alpha0_run": without["eval_accuracy"][0]},
        "final": final, "lift": lift, "goals": goals, "curves": curves, "wall_s": timings,
        "collapsed": collapsed,  # runs that ended answering < MIN_ANSWERED_RATE of the held-out questions
        # whether zooming paid when RL started: what decides the alpha = 0 run (README)
        "early_split": {name: early_split(c) for name, c in curves.items()},
    }


def final_answered_rate(c: dict) -> float:
    """The share of held-out questions the run's last evaluation answered (1.0 for results kept
    before the rate was)."""
    rate = (c.get("eval_answered_rate") or [None])[-1]
    return 1.0 if rate is None else rate


EARLY_STEPS = 5
SMOOTHING = 5  # steps averaged in the plot of accuracy with / without a visual operation


def early_split(c: dict) -> dict[str, float] | None:
    """Mean accuracy of the sampled answers with and without a visual operation over the first
    EARLY_STEPS RL steps (steps lacking either kind skipped): whether zooming pays when RL starts,
    which decides whether RL without the bonus drops it. None for curves without the split."""
    early = zip(c.get("train_accuracy_pixel_reasoning", [])[:EARLY_STEPS], c.get("train_accuracy_text_only", []))
    pairs = [(p, t) for p, t in early if p is not None and t is not None]
    if not pairs:
        return None
    return {"pixel_reasoning": fmean(p for p, _ in pairs), "text_only": fmean(t for _, t in pairs)}


def hit_rate_trend(c: dict, key: str = "train_crop_hit_rate") -> tuple[float, float] | None:
    """Mean crop hit rate (or another per-step crop series) of the first and of the last
    EARLY_STEPS RL steps (steps without a crop skipped): whether RL made the zooms better. None
    unless most steps at both ends cropped (a run that stopped zooming leaves a handful of crops)."""
    rates = c.get(key, [])
    first = [r for r in rates[:EARLY_STEPS] if r is not None]
    last = [r for r in rates[-EARLY_STEPS:] if r is not None] if len(rates) > EARLY_STEPS else []
    enough = EARLY_STEPS // 2 + 1
    return (fmean(first), fmean(last)) if len(first) >= enough and len(last) >= enough else None


def format_warm_start(warm_start: dict) -> str:
    """The warm start's skills (teacher-forced probe) and its SFT draws' skill-gate verdicts."""
    lines = []
    skills = warm_start.get("skills")
    if skills:
        reading, localization = skills["reading"], skills["localization"]
        lines.append(f"warm start, teacher-forced: reads {reading['accuracy']:.0%} of {reading['count']} close-ups"
                     + (f", writes the named cell's box for {localization['accuracy']:.0%} of {localization['count']} "
                        f"crops (boxes holding the square: {localization['holds_square']:.0%})" if localization else "")
                     + (f"; after its own zoom reads {skills['reading_after_zoom']['accuracy']:.0%}"
                        if "reading_after_zoom" in skills else ""))
    for draw in warm_start.get("draws", []):
        if draw["checks"]:
            last = draw["checks"][-1]
            lines.append(f"skill gate, sft.seed={draw['sft_seed']}: {last['verdict']} at epoch {last['epoch']:g} ({last['why']}; "
                         f"checked epochs {', '.join(format(c['epoch'], 'g') for c in draw['checks'])})")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    rows = [("warm start (SFT)", results["warm_start"]["accuracy"], results["warm_start"]["rapr"]),
            ("RL with curiosity", results["final"]["curiosity"]["accuracy"], results["final"]["curiosity"]["rapr"]),
            ("RL, alpha = 0", results["final"]["no-curiosity"]["accuracy"], results["final"]["no-curiosity"]["rapr"])]
    lines = [f"{'held-out (greedy)':<22}{'accuracy':>10}{'RaPR':>8}"]
    lines += [f"{name:<22}{accuracy:>10.3f}{rapr:>8.3f}" for name, accuracy, rapr in rows]
    warm_start = format_warm_start(results["warm_start"])
    lines += [warm_start] if warm_start else []
    for name, split in results["early_split"].items():
        if split:
            lines.append(f"{name}, first {EARLY_STEPS} steps (sampled): answers with a visual operation "
                         f"{split['pixel_reasoning']:.0%} right, without {split['text_only']:.0%}")
    for name, c in results["curves"].items():
        sampled = hit_rate_trend(c, "train_rapr")
        if sampled:  # greedy RaPR is all or nothing here; the sampled share tells a lasting trap from a slow one
            lines.append(f"{name}, RaPR of the training batches (sampled): first {EARLY_STEPS} steps "
                         f"{sampled[0]:.2f}, last {EARLY_STEPS} {sampled[1]:.2f}")
        trend = hit_rate_trend(c)
        if trend:
            lines.append(f"{name}, crops holding the named square (sampled): first {EARLY_STEPS} steps "
                         f"{trend[0]:.0%}, last {EARLY_STEPS} {trend[1]:.0%}")
        area = hit_rate_trend(c, "train_crop_area")
        if area:  # a crop holding the square can be the whole image: no zoom at all
            lines.append(f"{name}, share of the image a crop covers: first {EARLY_STEPS} steps {area[0]:.0%}, "
                         f"last {EARLY_STEPS} {area[1]:.0%}")
    for name in results.get("collapsed", []):
        lines.append(f"{name} COLLAPSED: its last evaluation answered {final_answered_rate(results['curves'][name]):.0%} "
                     f"of the held-out questions (a trap answers them all without zooming)")
    lines.append(f"lift with curiosity: {results['lift'] * 100:+.1f} points")
    lines += [f"[{'met' if met else 'NOT met'}] {goal}" for goal, met in results["goals"].items()]
    lines.append("wall: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in results["wall_s"].items()))
    return "\n".join(lines)


def plot(curves: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right, split) = plt.subplots(1, 3, figsize=(16, 4), constrained_layout=True)
    for (name, c), colour in zip(curves.items(), ("tab:blue", "tab:red")):
        left.plot(c["eval_steps"], c["eval_accuracy"], "o-", color=colour, label=f"{name}, held-out")
        left.plot(c["train_steps"], c["train_accuracy"], ":", color=colour, alpha=0.7, label=f"{name}, training batches")
        right.plot(c["eval_steps"], c["eval_rapr"], "o-", color=colour, label=f"{name}, held-out")
        right.plot(c["train_steps"], c["train_rapr"], ":", color=colour, alpha=0.7, label=f"{name}, training batches")
        for key, style, kind in (("train_accuracy_pixel_reasoning", "-", "with"),
                                 ("train_accuracy_text_only", "--", "without")):
            points = [(step, value) for step, value in zip(c["train_steps"], c.get(key, [])) if value is not None]
            if points:  # one batch is 8 prompts: a trailing mean over 5 steps makes the trend readable
                steps, values = zip(*points)
                smoothed = [fmean(values[max(0, i - SMOOTHING + 1):i + 1]) for i in range(len(values))]
                split.plot(steps, smoothed, style, color=colour, alpha=0.8, label=f"{name}, {kind} a visual operation")
    left.set(title="accuracy: held-out (greedy), training batches (sampled)", xlabel="RL step", ylabel="accuracy", ylim=(-0.02, 1.02))
    right.axhline(GOAL_RAPR, color="grey", lw=0.8, ls="--")
    right.set(title="RaPR: share of answers that used a visual operation", xlabel="RL step", ylabel="RaPR", ylim=(-0.02, 1.02))
    split.set(title=f"training batches ({SMOOTHING}-step mean): accuracy\nof answers with / without a visual operation",
              xlabel="RL step", ylabel="accuracy", ylim=(-0.02, 1.02))
    split.legend(fontsize=8)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_to_mlflow(workdir: Path, config_name: str, results: dict, plot_path: Path, json_path: Path) -> str:
    import mlflow

    from cluster.config import load_config

    tracking = load_config(config_name, []).tracking
    uri = tracking.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to the stages' folder
        uri = "sqlite:///" + str(workdir / uri[len("sqlite:///"):])
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(tracking.experiment)
    with mlflow.start_run(run_name="learning-summary") as run:
        if "rates" in results:  # several RL seeds: how many met each goal
            rates = results["rates"]
            mlflow.log_metrics({"seeds": rates["seeds"], "all_goals_met": rates["all_goals_met"],
                                **{f"lift/{k}": v for k, v in rates["lift"].items()},
                                **{f"final_rapr/{k}": v for k, v in rates["final_rapr"].items() if v is not None},
                                **{f"seed{seed}/lift": r["lift"] for seed, r in results["per_seed"].items()}})
        else:
            mlflow.log_metrics({"warm_start/accuracy": results["warm_start"]["accuracy"], "lift": results["lift"],
                                **{f"{name}/{k}": v for name, final in results["final"].items() for k, v in final.items()}})
        mlflow.log_artifact(str(plot_path))
        for seed_results in results.get("per_seed", {}).values():
            mlflow.log_artifact(seed_results["plot"])
        mlflow.log_artifact(str(json_path))
        return run.info.run_id


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = args.config if not Path(args.config).exists() else str(Path(args.config).resolve())
    timings: dict[str, float] = {}
    sft_dir = workdir / "sft"
    draws: list[dict] = []
    if not args.skip_sft:
        draws = warm_start(config, args.overrides, workdir, args.draws, timings)
        if not draws[-1].get("passed", True):
            results = {"warm_start": {"draws": draws}, "config": {"preset": args.config, "overrides": args.overrides},
                       "wall_s": timings}
            (Path(args.json).resolve() if args.json else workdir / "learning.json").write_text(json.dumps(results, indent=2))
            raise SystemExit(f"no warm start passed sft.skill_gate in {len(draws)} draw(s): "
                             + "; ".join(f"sft.seed={d['sft_seed']}: {d['why']}" for d in draws))
    # the warm start's two skills, teacher-forced (cluster/skill_probe.py): what the lift depends on
    timings["probe"] = run_stage("probe", "cluster.skill_probe", [
        str(sft_dir / "hf"), "--config", config, "--json", str(workdir / "probe.json"), *args.overrides], workdir)
    if args.rl_seeds is None:
        curves = rl_pair(config, args.overrides, sft_dir / "hf", workdir, "", timings)
        results = results_of(curves, timings)
    else:
        per_seed = {}
        for seed in args.rl_seeds:
            seed_timings: dict[str, float] = {}
            per_seed[str(seed)] = results_of(
                rl_pair(config, [*args.overrides, f"seed={seed}"], sft_dir / "hf", workdir, f"-seed{seed}", seed_timings),
                seed_timings)  # each seed's RL timings stay in its own "wall_s"
        results = {"warm_start": {}, "per_seed": per_seed, "rates": across_seeds(per_seed), "wall_s": timings}
    results["warm_start"]["skills"] = json.loads((workdir / "probe.json").read_text())
    from cluster.runtime import machine_info
    from cluster.sft import weights_digest

    results["warm_start"]["draws"] = draws
    # the SFT stage digested its weights; a warm start reused with --skip-sft is digested here
    results["warm_start"]["weights_sha256"] = draws[-1]["weights_sha256"] if draws else weights_digest(sft_dir / "hf")
    results["config"] = {"preset": args.config, "overrides": args.overrides}
    results["machine"] = machine_info()
    plot_path = Path(args.plot).resolve() if args.plot else workdir / "learning.png"
    if args.rl_seeds is None:
        plot(curves, plot_path)
    else:
        plot_seeds(results["per_seed"], plot_path)
        for seed, seed_results in results["per_seed"].items():  # each pair in full, beside the overview
            seed_results["plot"] = str(plot(seed_results["curves"], plot_path.with_name(f"{plot_path.stem}-seed{seed}.png")))
    results["plot"] = str(plot_path)
    json_path = Path(args.json).resolve() if args.json else workdir / "learning.json"
    json_path.write_text(json.dumps(results, indent=2))
    results["mlflow_run_id"] = log_to_mlflow(workdir, config, results, plot_path, json_path)
    json_path.write_text(json.dumps(results, indent=2))
    if args.rl_seeds is None:
        print(format_table(results))
    else:  # each seed's pair in full (whether zooming paid early, how the boxes moved), then the rates
        for seed, seed_results in results["per_seed"].items():
            print(f"--- RL seed {seed} ---\n{format_table(seed_results)}")
        print(f"--- {len(args.rl_seeds)} RL seeds ---\n{format_warm_start(results['warm_start'])}\n"
              + format_rates_table(results["per_seed"], results["rates"]))
    print(f"plot: {plot_path}\njson: {json_path}")
    return results


if __name__ == "__main__":
    main()
