"""`python -m cluster.evaluate` as users run it: argument and data errors fail fast (no Ray), and real
greedy evaluations of the tiny model on the V* and MVBench (video) fixtures through Ray, vLLM and the
tool pool."""
from __future__ import annotations

import json
import subprocess
import sys

from types import SimpleNamespace

import numpy as np
import pytest
from eval_fixtures import MVBENCH_TASKS, VSTAR_ROWS, make_mvbench, make_tallyqa, make_vstar, write_image

from cluster.eval_data import EvalRecord, load_eval_set, video_source
from cluster.evaluate import load_video_source, outcome_of, prompt_task
from policies.trajectory import Trajectory, VisualOperation
from policies.visual_ops import PixelBudgets, run_turn
from rewards.accuracy import score_answer


def _evaluate(*args: str, cwd, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_video_sources_travel_as_bytes_with_the_sampled_frames(tmp_path):
    from policies.visual_ops import load_video_frames

    records = load_eval_set("mvbench", make_mvbench(tmp_path / "MVBench"))
    clip = records[0]  # action_sequence: start 1 s, end 2 s at 8 fps -> frames 8..16
    source = load_video_source(clip, 5)
    assert isinstance(source.video, bytes) and source.frame_indices == (8, 10, 12, 14, 16)
    assert [round(float(np.asarray(f.convert("L")).mean()) / 10) for f in
            load_video_frames(source.video, source.frame_indices)] == [8, 10, 12, 14, 16]
    task = prompt_task(SimpleNamespace(put=lambda value: value), clip, 16)  # a stand-in for ray.put
    assert task.is_video and task.image_ref is None and task.answers == clip.golds
    assert len(task.video.frame_indices) == 16 and task.video.frame_indices[0] == 8


def test_a_video_given_as_frame_files_ships_only_the_sampled_frames(tmp_path):
    from policies.visual_ops import load_video_frames

    folder = tmp_path / "frames"
    for k in range(1, 31):  # MVBench's episodic_reasoning layout: 00001.jpg ... at 3 fps
        write_image(folder / f"{k:05d}.jpg", size=(56, 56), colour=(8 * k,) * 3)
    record = EvalRecord(qid="mvbench-episodic_reasoning-0", benchmark="mvbench", question="q",
                        media_paths=(str(folder),), is_video=True, golds=("A",), answer_type="multiple_choice",
                        task="episodic_reasoning", metadata={"media_kind": "frame", "fps": 3.0, "bound": (2.0, 5.0)})
    assert video_source(record, 4).frame_indices == (6, 9, 12, 15)  # frames at 2 s .. 5 s
    source = load_video_source(record, 4)
    assert len(source.video) == 4 and source.frame_indices == (0, 1, 2, 3)
    levels = [round(float(np.asarray(f.convert("L")).mean()) / 8) for f in load_video_frames(source.video, [1, 3])]
    assert levels == [10, 16]  # files 00010.jpg and 00016.jpg (indices 9 and 15)
    observation = run_turn('<tool_call>{"name": "select_frames", "arguments": {"target_frames": [4, 1]}}',
                           [source], PixelBudgets())
    assert observation.ok and observation.frames == [4, 1]
    assert [round(float(np.asarray(v.convert("L")).mean()) / 8) for v in observation.view_images] == [16, 7]


def test_data_errors_exit_2_naming_the_problem(tmp_path):
    result = _evaluate("--benchmark", "tallyqa", "--data", str(tmp_path / "missing.json"), "--model", "m", cwd=tmp_path)
    assert result.returncode == 2 and "not found" in result.stderr
    path = make_tallyqa(tmp_path / "tally")
    result = _evaluate("--benchmark", "tallyqa", "--data", str(path), "--model", "m", "--media-root",
                       str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "4 media file(s) not found" in result.stderr
    result = _evaluate("--benchmark", "tallyqa", "--data", str(path), "--model", "m", "rollout.max_tool_calls=-1",
                       cwd=tmp_path)
    assert result.returncode == 2 and "rollout.max_tool_calls" in result.stderr


def test_outcome_of_a_trajectory(tmp_path):
    [record] = load_eval_set("vstar", make_vstar(tmp_path), limit=1)
    trajectory = Trajectory(qid=record.qid, sample_index=0, answers=record.golds, response_text="... \\boxed{B}",
                            finish_reason="stop")
    trajectory.extend([1, 2, 3], trainable=True, logprobs=[0.0] * 3)
    trajectory.visual_operations += [VisualOperation("crop_image", ok=False, error_kind="crop_too_small"),
                                     VisualOperation("select_frames", ok=True, frames=[2, 9])]
    outcome = outcome_of(record, trajectory)
    assert (outcome.num_visual_operations, outcome.num_failed_operations, outcome.error_kinds) == (
        2, 1, ("crop_too_small",))
    assert [(op["name"], op["ok"], op["frames"]) for op in outcome.operations] == [
        ("crop_image", False, None), ("select_frames", True, [2, 9])]
    assert (outcome.response_tokens, outcome.finish_reason, outcome.response_text) == (3, "stop", "... \\boxed{B}")


@pytest.mark.integration
def test_evaluate_vstar_with_the_tiny_model(tmp_path, tiny_model_dir):
    data = make_vstar(tmp_path / "vstar_bench")
    output = tmp_path / "results.json"
    result = _evaluate("--benchmark", "vstar", "--data", str(data), "--model", tiny_model_dir,
                       "--output", str(output), "rollout.max_new_tokens_per_turn=32", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy/direct_attributes" in result.stdout and "MLflow run" in result.stdout
    results = json.loads(output.read_text())
    assert {"benchmark", "n", "primary_metric", "metrics", "samples", "model", "data", "run_id", "tracking_uri",
            "generation", "tool_pools", "config"} <= set(results)
    assert results["benchmark"] == "vstar" and results["n"] == len(VSTAR_ROWS) == len(results["samples"])
    metrics = results["metrics"]
    assert {"accuracy", "accuracy/direct_attributes", "accuracy/relative_position", "rapr",
            "tool_calls_per_sample", "tool_error_rate", "answered_rate"} <= set(metrics)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["rapr"] <= 1.0
    assert [s["qid"] for s in results["samples"]] == [f"vstar-{row['question_id']}" for row in VSTAR_ROWS]
    assert results["config"]["rollout"]["temperature"] == 0.0 and results["config"]["rollout"]["group_size"] == 1

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(results["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["eval.benchmark"] == "vstar" and run.data.params["eval.n"] == "4"
    assert run.data.metrics["vstar/n"] == 4 and "vstar/accuracy" in run.data.metrics
    assert "eval_results.json" in [a.path for a in client.list_artifacts(results["run_id"])]


@pytest.mark.integration
def test_evaluate_mvbench_videos_with_the_tiny_model(tmp_path, tiny_model_dir):
    data = make_mvbench(tmp_path / "MVBench")
    output = tmp_path / "results.json"
    result = _evaluate("--benchmark", "mvbench", "--data", str(data), "--model", tiny_model_dir,
                       "--output", str(output), "rollout.max_new_tokens_per_turn=32", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy/moving_direction" in result.stdout and "MLflow run" in result.stdout
    results = json.loads(output.read_text())
    samples, metrics = results["samples"], results["metrics"]
    expected_qids = [f"mvbench-{task}-{i}" for task in sorted(MVBENCH_TASKS) for i in range(len(MVBENCH_TASKS[task]))]
    assert [s["qid"] for s in samples] == expected_qids and results["n"] == metrics["n"] == 3
    assert results["config"]["tools"]["budgets"]["num_video_frames"] == 16

    # every score is the verdict on the extracted prediction; the accuracies are recomputed from them
    records = {r.qid: r for r in load_eval_set("mvbench", data)}
    for sample in samples:
        record = records[sample["qid"]]
        assert sample["task"] == record.task and sample["golds"] == list(record.golds)
        assert sample["score"] == score_answer(sample["prediction"], record.golds, "multiple_choice", record.choices)
    by_task = {task: [s["score"] for s in samples if s["task"] == task] for task in MVBENCH_TASKS}
    for task, scores in by_task.items():
        assert metrics[f"n/{task}"] == len(scores) == len(MVBENCH_TASKS[task])
        assert metrics[f"accuracy/{task}"] == pytest.approx(sum(scores) / len(scores))
    assert metrics["accuracy"] == pytest.approx(sum(s["score"] for s in samples) / len(samples))
    assert metrics["accuracy_task_mean"] == pytest.approx(sum(sum(v) / len(v) for v in by_task.values()) / 2)
    assert metrics["rapr"] == pytest.approx(sum(s["num_visual_operations"] > 0 for s in samples) / 3)
    assert {"tool_calls_per_sample", "tool_error_rate", "answered_rate", "truncated_rate"} <= set(metrics)

    # the traces: one record per operation; select_frames numbers lie among the 16 frames shown
    for sample in samples:
        assert len(sample["operations"]) == sample["num_visual_operations"]
        for op in sample["operations"]:
            if op["name"] == "select_frames" and op["ok"]:
                assert all(1 <= f <= 16 for f in op["frames"])
    assert sum(metrics.get(k, 0) for k in metrics if k.startswith("tool_calls/")) == sum(
        s["num_visual_operations"] for s in samples)
    assert results["generation"]["generated_tokens"] > 0
