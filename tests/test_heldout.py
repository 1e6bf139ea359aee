"""Held-out scoring inside an RL run (cluster/heldout.py) and the learning benchmark's report."""
from pathlib import Path

import pytest

from benchmarks.learning import early_split, format_table, hit_rate_trend, results_of
from cluster.eval_metrics import EvalOutcome, summarize
from cluster.heldout import as_eval_record
from policies.data import PromptRecord


def record(qid, answer, **metadata):
    return PromptRecord(qid, "Which pattern? \\boxed{}", ("/x.png",), False, (answer,), metadata)


def test_heldout_records_are_scored_by_their_verifier_with_rapr():
    records = [as_eval_record(record("a", "vertical"), "text"), as_eval_record(record("b", "diagonal"), "text"),
               as_eval_record(record("c", "3", answer_type="count"), "text"), as_eval_record(record("d", "checkered"), "text")]
    assert records[2].answer_type == "count" and "answer_type" not in records[2].metadata
    outcomes = [EvalOutcome(records[0], "\\boxed{Vertical}", 1), EvalOutcome(records[1], "\\boxed{vertical}", 2),
                EvalOutcome(records[2], "\\boxed{three}", 0), EvalOutcome(records[3], "no answer", 0)]
    metrics = summarize("heldout", outcomes)["metrics"]
    assert metrics["accuracy"] == pytest.approx(0.5)  # a (case-insensitive) and c (number word) right
    assert metrics["rapr"] == pytest.approx(0.5)
    assert metrics["score_with_tools"] == pytest.approx(0.5) and metrics["score_without_tools"] == pytest.approx(0.5)
    assert not any(name.startswith("accuracy/") for name in metrics)


def curve(accuracy, rapr):
    steps = list(range(0, 5 * len(accuracy), 5))
    return {"eval_steps": steps, "eval_accuracy": accuracy, "eval_rapr": rapr,
            "train_steps": steps[1:], "train_rapr": rapr[1:], "train_accuracy": accuracy[1:]}


def test_learning_report_checks_each_goal_against_the_curves():
    met = results_of({"curiosity": curve([0.30, 0.40, 0.50], [0.6, 0.5, 0.45]),
                      "no-curiosity": curve([0.30, 0.35, 0.40], [0.6, 0.3, 0.10])}, {"sft": 10.0})
    assert met["lift"] == pytest.approx(0.20) and all(met["goals"].values())
    missed = results_of({"curiosity": curve([0.30, 0.35], [0.6, 0.25]),
                         "no-curiosity": curve([0.30, 0.50], [0.6, 0.40])}, {})
    assert not any(missed["goals"].values())
    table = format_table(missed)
    assert table.count("NOT met") == 3 and "+5.0 points" in table


def test_a_collapsed_alpha0_run_is_not_the_trap():
    """Every response cut off at the token limit scores RaPR 0 too; the goal asks for a run that
    still answers without zooming."""
    collapsed = {**curve([0.5, 0.9, 0.0], [0.0, 1.0, 0.0]), "eval_answered_rate": [1.0, 1.0, 0.0]}
    results = results_of({"curiosity": curve([0.5, 0.9, 0.9], [0.0, 1.0, 1.0]), "no-curiosity": collapsed}, {})
    assert results["collapsed"] == ["no-curiosity"]
    assert not results["goals"]["alpha=0 run's RaPR ends below the curiosity run's"]
    assert "no-curiosity COLLAPSED: its last evaluation answered 0% of the held-out questions" in format_table(results)
    trapped = {**curve([0.5, 0.5, 0.5], [0.0, 0.0, 0.0]), "eval_answered_rate": [1.0, 1.0, 0.98]}
    results = results_of({"curiosity": curve([0.5, 0.9, 0.9], [0.0, 1.0, 1.0]), "no-curiosity": trapped}, {})
    assert results["collapsed"] == [] and all(results["goals"].values())


def test_learning_report_shows_the_warm_starts_skills():
    results = results_of({"curiosity": curve([0.30, 0.50], [0.0, 1.0]), "no-curiosity": curve([0.30, 0.30], [0.0, 0.0])}, {})
    results["warm_start"]["skills"] = {"reading": {"accuracy": 0.75, "count": 4, "confusion": {}},
                                       "localization": {"accuracy": 0.5, "holds_square": 0.875, "count": 8, "cells": 4}}
    assert ("reads 75% of 4 close-ups, writes the named cell's box for 50% of 8 crops (boxes holding the square: 88%)"
            in format_table(results))
    results["warm_start"]["skills"]["localization"] = None
    assert "reads 75% of 4 close-ups\n" in format_table(results)


def test_learning_report_shows_whether_zooming_paid_when_rl_started():
    with_split = curve([0.3] * 8, [0.5] * 8)
    with_split["train_accuracy_pixel_reasoning"] = [0.2, None, 0.4, 0.6, 0.2, 0.2, 1.0]  # steps 6-7: past the window
    with_split["train_accuracy_text_only"] = [0.5, 0.5, 0.6, None, 0.4, 0.4, 0.0]
    assert early_split(with_split) == {"pixel_reasoning": pytest.approx(0.8 / 3), "text_only": pytest.approx(1.5 / 3)}
    assert early_split(curve([0.3, 0.4], [0.5, 0.5])) is None  # results from before the split was logged
    table = format_table(results_of({"curiosity": with_split, "no-curiosity": curve([0.3] * 8, [0.5] * 8)}, {}))
    assert "curiosity, first 5 steps (sampled): answers with a visual operation 27% right, without 50%" in table
    assert "no-curiosity, first" not in table


def test_the_report_says_whether_the_zooms_got_better():
    improving = curve([0.3] * 8, [0.5] * 8)
    improving["train_crop_hit_rate"] = [0.5, None, 0.3, 0.4, 0.4] + [0.6] * 20 + [0.9, 0.7, None, 0.8, 0.8]
    assert hit_rate_trend(improving) == (pytest.approx(0.4), pytest.approx(0.8))
    assert hit_rate_trend(curve([0.3] * 8, [0.5] * 8)) is None  # results from before the rate was kept
    assert hit_rate_trend({"train_crop_hit_rate": [0.5, 0.6]}) is None  # too short to have two ends
    collapsed = {**curve([0.3] * 8, [0.5] * 8), "train_crop_hit_rate": [0.5] * 10 + [None, 0.6, None, None, 1.0]}
    assert hit_rate_trend(collapsed) is None  # the run nearly stopped cropping: 2 of the last 5 steps did
    table = format_table(results_of({"curiosity": improving, "no-curiosity": collapsed}, {}))
    assert "curiosity, crops holding the named square (sampled): first 5 steps 40%, last 5 80%" in table
    assert "no-curiosity, crops" not in table
    assert "covers" not in table  # no crop areas kept

    improving["train_crop_area"] = [0.25] * 5 + [0.5] * 20 + [1.0] * 5  # zooms turning into whole-image crops
    table = format_table(results_of({"curiosity": improving, "no-curiosity": collapsed}, {}))
    assert "curiosity, share of the image a crop covers: first 5 steps 25%, last 5 100%" in table


def test_the_report_tells_a_lasting_trap_from_a_slow_one_by_the_sampled_rapr():
    lasting = {**curve([0.5] * 3, [0.0] * 3), "train_rapr": [0.4] * 5 + [0.2] * 10 + [0.0] * 4 + [0.05]}
    slow = {**curve([0.5] * 3, [0.0] * 3), "train_rapr": [0.3] * 5 + [0.4] * 10 + [0.5, 0.6, 0.7, 0.6, 0.6]}
    table = format_table(results_of({"curiosity": slow, "no-curiosity": lasting}, {}))
    assert "no-curiosity, RaPR of the training batches (sampled): first 5 steps 0.40, last 5 0.01" in table
    assert "curiosity, RaPR of the training batches (sampled): first 5 steps 0.30, last 5 0.60" in table


def test_the_benchmark_redraws_a_warm_start_that_missed_the_skill_gate(tmp_path, monkeypatch):
    import json

    import benchmarks.learning as learning
    from cluster.sft import GATE_FAILED

    seeds = []

    def fake_sft(name, module, arguments, workdir):  # SFT's summary: draw 1 misses the gate, draw 2 passes
        seeds.append(int(arguments[-1].removeprefix("sft.seed=")))
        verdict = "short" if len(seeds) == 1 else "passed"
        check = {"epoch": 4, "step": 512, "reading": 0.8, "verdict": verdict, "why": f"{verdict} why"}
        (workdir / "sft.json").write_text(json.dumps({
            "skill_gate": {"passed": verdict == "passed", "checks": [check]},
            "weights_sha256": f"digest-{len(seeds)}", "machine": {"torch_cpu_capability": "AVX2"}}))
        if verdict != "passed":
            raise learning.StageFailed("gate", GATE_FAILED)
        return 1.0

    monkeypatch.setattr(learning, "run_stage", fake_sft)
    draws = learning.warm_start("zoom-curiosity", ["seed=3", "sft.skill_gate.min_reading=0.9"], tmp_path, 3, {})
    assert seeds == [3, 1003] and [d["passed"] for d in draws] == [False, True]
    assert draws[0]["why"] == "short why" and draws[1]["sft_seed"] == 1003
    assert [d["weights_sha256"] for d in draws] == ["digest-1", "digest-2"]  # which weights each draw made
    assert draws[1]["torch_cpu_capability"] == "AVX2"

    seeds.clear()  # any other failure is not a draw to retry
    monkeypatch.setattr(learning, "run_stage", lambda *a: (_ for _ in ()).throw(learning.StageFailed("crash", 1)))
    with pytest.raises(learning.StageFailed, match="crash"):
        learning.warm_start("zoom-curiosity", [], tmp_path, 3, {})


def test_learning_over_rl_seeds_reports_how_many_seeds_met_each_goal(tmp_path, monkeypatch):
    import json

    import benchmarks.learning as learning

    stages = []

    def fake_stage(name, module, arguments, workdir):  # seed 1 traps and lifts; seed 2 keeps zooming without the bonus
        stages.append((name, arguments))
        if module == "cluster.sft":
            (workdir / "sft.json").write_text(json.dumps({"weights_sha256": "digest", "machine": {"torch_cpu_capability": "AVX2"}}))
        elif module == "cluster.skill_probe":
            (workdir / "probe.json").write_text(json.dumps({"reading": {"accuracy": 1.0, "count": 4}, "localization": None}))
        else:
            seed = int(next(a for a in arguments if a.startswith("seed=")).removeprefix("seed="))
            alpha0 = arguments[-1] == "reward.curiosity.alpha=0"
            final = {(1, False): (0.8, 1.0), (1, True): (0.5, 0.0), (2, False): (0.6, 1.0), (2, True): (0.6, 1.0)}[seed, alpha0]
            summary_path = Path(arguments[arguments.index("--summary-json") + 1])
            summary_path.write_text(json.dumps({
                "evaluations": [{"steps_done": 0, "eval/accuracy": 0.5, "eval/rapr": 0.0},
                                {"steps_done": 5, "eval/accuracy": final[0], "eval/rapr": final[1]}],
                "history": [{"step": 4, "metrics": {"rollout/rapr": final[1], "reward/accuracy": final[0]}}]}))
        return 2.0

    monkeypatch.setattr(learning, "run_stage", fake_stage)
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under the current folder
    results = learning.main(["--workdir", str(tmp_path), "--rl-seeds", "1,2", "steps=5"])

    sft_arguments = stages[0][1]
    assert stages[0][0] == "sft" and not any(a.startswith("seed=") for a in sft_arguments)  # one warm start for all
    rl_names = [name for name, _ in stages[2:]]
    assert rl_names == ["curiosity-seed1", "no-curiosity-seed1", "curiosity-seed2", "no-curiosity-seed2"]
    assert results["rates"]["seeds"] == 2 and results["rates"]["all_goals_met"] == 1
    assert results["rates"]["lift"] == {"mean": pytest.approx(0.2), "min": pytest.approx(0.1), "max": pytest.approx(0.3)}
    assert list(results["rates"]["goals_met"].values()) == [1, 2, 1]  # lift >= 15, RaPR kept, alpha 0 below
    assert results["warm_start"]["weights_sha256"] == "digest"
    written = json.loads((tmp_path / "learning.json").read_text())
    assert written["per_seed"]["2"]["final"]["no-curiosity"]["rapr"] == 1.0
    # the warm start's timings at the top, each seed's RL timings under that seed only
    assert set(written["wall_s"]) == {"sft", "probe"}
    assert set(written["per_seed"]["1"]["wall_s"]) == {"curiosity", "no-curiosity"}
    assert (tmp_path / "learning.png").exists() and (tmp_path / "learning-seed1.png").exists()

    import mlflow  # the summary run in the stages' own store: the rates, and every plot

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(results["mlflow_run_id"])
    assert run.data.metrics["all_goals_met"] == 1 and run.data.metrics["seed2/lift"] == pytest.approx(0.1)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning.png", "learning-seed1.png", "learning-seed2.png", "learning.json"} <= artifacts


def test_rl_seeds_must_be_distinct_integers(capsys):
    from benchmarks.learning import parse_args

    assert parse_args(["--rl-seeds", "0,3"]).rl_seeds == [0, 3]
    for bad in ("0,x", "1,1"):
        with pytest.raises(SystemExit):
            parse_args(["--rl-seeds", bad])
        assert "--rl-seeds" in capsys.readouterr().err


def test_the_rates_table_counts_seeds_per_goal():
    from benchmarks.learning_rates import across_seeds, format_rates_table

    per_seed = {"0": results_of({"curiosity": curve([0.5, 0.8], [0.0, 1.0]), "no-curiosity": curve([0.5, 0.5], [0.0, 0.0])}, {}),
                "1": results_of({"curiosity": curve([0.5, 0.5], [0.0, 0.0]), "no-curiosity": curve([0.5, 0.5], [0.0, 0.0])}, {})}
    rates = across_seeds(per_seed)
    table = format_rates_table(per_seed, rates)
    assert "all goals met together: 1 of 2 seeds" in table
    assert "[1 of 2 seeds] curiosity run keeps RaPR >= 0.3" in table
    assert "mean +15.0 points (min +0.0, max +30.0)" in table
    assert table.splitlines()[1].split()[-6:-4] == ["-", "0.00"]  # no with / without split; late sampled RaPR
    early = {**curve([0.5, 0.5], [0.0, 0.0]), "train_accuracy_pixel_reasoning": [0.6, None],
             "train_accuracy_text_only": [0.4, 0.5]}
    per_seed["1"] = results_of({"curiosity": curve([0.5, 0.5], [0.0, 0.0]), "no-curiosity": early}, {})
    assert "60% / 40%" in format_rates_table(per_seed, across_seeds(per_seed)).splitlines()[2]
    with pytest.raises(ValueError):
        across_seeds({})


def test_the_rates_compare_final_rapr_seed_by_seed():
    from benchmarks.learning_rates import across_seeds, format_rates_table

    def pair(curiosity_rapr: float, alpha0_rapr: float) -> dict:
        return results_of({"curiosity": curve([0.5, 0.8], [0.0, curiosity_rapr]),
                           "no-curiosity": curve([0.5, 0.5], [0.0, alpha0_rapr])}, {})

    per_seed = {str(seed): pair(1.0, 0.0) for seed in range(6)} | {"6": pair(1.0, 1.0), "7": pair(0.5, 0.75)}
    rapr = across_seeds(per_seed)["final_rapr"]
    assert (rapr["alpha0_below"], rapr["level"], rapr["alpha0_above"]) == (6, 1, 1)
    assert rapr["curiosity_mean"] == pytest.approx(7.5 / 8) and rapr["no_curiosity_mean"] == pytest.approx(1.75 / 8)
    assert rapr["sign_test_p"] == pytest.approx(8 / 128)  # P(at least 6 of 7 fair coin flips below) = (7 + 1) / 2^7
    assert "alpha 0 below / level / above: 6 / 1 / 1 (one-sided sign test p = 0.062)" in \
        format_rates_table(per_seed, across_seeds(per_seed))
    all_level = across_seeds({"0": pair(1.0, 1.0)})["final_rapr"]
    assert all_level["sign_test_p"] is None and all_level["level"] == 1
