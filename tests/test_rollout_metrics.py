"""Per-step rollout metrics: accuracy split by whether the answer used a visual operation."""
from __future__ import annotations

import pytest
from cluster.pipeline import _group_by_prompt, _rollout_metrics
from policies.trajectory import Trajectory, VisualOperation


def _scored(qid: str, index: int, accuracy: float, operations: int) -> Trajectory:
    trajectory = Trajectory(qid=qid, sample_index=index, answers=("x",))
    trajectory.visual_operations.extend(VisualOperation("crop_image", True) for _ in range(operations))
    trajectory.rewards = {"accuracy": accuracy, "curiosity": 0.0, "penalty": 0.0, "total": accuracy}
    return trajectory


def _metrics(trajectories: list[Trajectory]) -> dict:
    generation = [{"generated_tokens": 10, "generation_s": 1.0}]
    return _rollout_metrics(trajectories, _group_by_prompt(trajectories), generation)


def test_accuracy_is_split_between_pixel_reasoning_and_text_only_answers():
    trajectories = [_scored("a", 0, 1.0, 1), _scored("a", 1, 0.0, 2), _scored("a", 2, 1.0, 1),
                    _scored("b", 0, 1.0, 0), _scored("b", 1, 0.0, 0)]
    metrics = _metrics(trajectories)
    assert metrics["reward/accuracy_pixel_reasoning"] == pytest.approx(2 / 3)
    assert metrics["reward/accuracy_text_only"] == pytest.approx(1 / 2)
    assert metrics["reward/accuracy"] == pytest.approx(3 / 5)
    assert metrics["rollout/rapr"] == pytest.approx((1.0 + 0.0) / 2)  # per prompt, then averaged


def test_a_kind_of_answer_no_trajectory_gave_has_no_metric():
    metrics = _metrics([_scored("a", 0, 1.0, 0), _scored("a", 1, 0.0, 0)])
    assert "reward/accuracy_pixel_reasoning" not in metrics
    assert metrics["reward/accuracy_text_only"] == pytest.approx(0.5)
