"""The crop-hit diagnostic: does a successful crop of the prompt image contain the asked-about box?"""
from __future__ import annotations

import pytest
from cluster.pipeline import _crop_hit_metrics
from policies.data import PromptRecord
from policies.trajectory import Trajectory, VisualOperation, crop_hits, rewarded_operations

GOLD = [0.5, 0.5, 0.75, 0.75]  # centre (0.625, 0.625): pixel (250, 125) of a 400x200 image


def _trajectory(qid: str, *operations: VisualOperation) -> Trajectory:
    trajectory = Trajectory(qid=qid, sample_index=0, answers=("x",))
    trajectory.visual_operations.extend(operations)
    return trajectory


def test_a_crop_hits_when_its_box_holds_the_gold_centre_in_pixels():
    on = VisualOperation("crop_image", True, target_image=1, box_pixels=(200, 100, 300, 150))
    off = VisualOperation("crop_image", True, target_image=1, box_pixels=(0, 0, 200, 100))
    assert crop_hits(_trajectory("q", on, off), GOLD, (400, 200)) == [True, False]


def test_failed_calls_frames_and_crops_of_later_images_are_not_counted():
    failed = VisualOperation("crop_image", False, error_kind="bad_box")
    of_a_crop = VisualOperation("crop_image", True, target_image=2, box_pixels=(0, 0, 400, 200))
    frames = VisualOperation("select_frames", True, frames=[1, 2])
    assert crop_hits(_trajectory("q", failed, of_a_crop, frames), GOLD, (400, 200)) == []


def test_step_metric_reads_the_record_gold_box_and_image_size():
    sizes = {"/data/image.png": (400, 200)}
    with_gold = PromptRecord("a", "q", ("/data/image.png",), False, ("x",), {"gold_box": GOLD})
    without = PromptRecord("b", "q", ("/data/image.png",), False, ("x",))
    hit = VisualOperation("crop_image", True, target_image=1, box_pixels=(240, 120, 260, 130))
    miss = VisualOperation("crop_image", True, target_image=1, box_pixels=(0, 0, 10, 10))
    trajectories = [_trajectory("a", hit), _trajectory("a", miss), _trajectory("a", hit), _trajectory("b", miss)]
    assert _crop_hit_metrics(trajectories, [with_gold, without], sizes) == {
        "rollout/crop_hit_rate": pytest.approx(2 / 3)}
    assert _crop_hit_metrics(trajectories[3:], [without], sizes) == {}


def test_a_crop_covering_too_much_of_its_image_is_not_rewarded_as_a_visual_operation():
    whole = VisualOperation("crop_image", True, target_image=1, box_pixels=(0, 0, 400, 200), source_size=(400, 200))
    half = VisualOperation("crop_image", True, target_image=1, box_pixels=(0, 0, 200, 200), source_size=(400, 200))
    cell = VisualOperation("crop_image", True, target_image=1, box_pixels=(200, 100, 400, 200), source_size=(400, 200))
    failed = VisualOperation("crop_image", False, error_kind="bad_box")  # no box: counted, as the paper does
    frames = VisualOperation("select_frames", True, frames=[1, 2])
    assert (whole.area_fraction, half.area_fraction, cell.area_fraction) == (1.0, 0.5, 0.25)
    assert failed.area_fraction is None and frames.area_fraction is None
    trajectory = _trajectory("q", whole, half, cell, failed, frames)
    assert rewarded_operations(trajectory) == 5  # default 1.0: all count
    assert rewarded_operations(trajectory, 0.5) == 4  # up to half the image is still a zoom
    assert rewarded_operations(trajectory, 0.3) == 3
    assert rewarded_operations(_trajectory("q", whole), 0.5) == 0  # its curiosity bonus is that of no operation
    assert rewarded_operations(trajectory, 0.5, count_failed=False) == 3  # half, cell, frames
    assert rewarded_operations(_trajectory("q", failed, failed), count_failed=False) == 0


def test_the_step_reports_how_much_of_the_image_its_crops_cover():
    from cluster.pipeline import _group_by_prompt, _rollout_metrics

    def scored(*operations):
        trajectory = _trajectory("q", *operations)
        trajectory.rewards = {"accuracy": 0.0, "curiosity": 0.0, "penalty": 0.0, "total": 0.0}
        return trajectory

    whole = VisualOperation("crop_image", True, target_image=1, box_pixels=(0, 0, 400, 200), source_size=(400, 200))
    cell = VisualOperation("crop_image", True, target_image=1, box_pixels=(200, 100, 400, 200), source_size=(400, 200))
    failed = VisualOperation("crop_image", False, error_kind="bad_box")
    trajectories = [scored(whole, failed), scored(cell), scored()]
    metrics = _rollout_metrics(trajectories, _group_by_prompt(trajectories), [{"generated_tokens": 1, "generation_s": 1.0}])
    assert metrics["rollout/crop_area_mean"] == pytest.approx((1.0 + 0.25) / 2)
    assert "rollout/crop_area_mean" not in _rollout_metrics(trajectories[2:], [trajectories[2:]], [])
