"""The real spine on one private Ray cluster: vLLM rollouts with tools, rewards, DeepSpeed, weight sync."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(ray_cluster, tiny_model_dir, tmp_path_factory):
    from cluster.config import load_config
    from cluster.pipeline import RLPipeline
    from policies.data import read_rl_parquet
    from policies.synthetic import SyntheticZoomSpec, ensure_synthetic_zoom

    config = load_config(None, [
        "prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens_per_turn=32",
        "trainer.lr=1e-3", "trainer.micro_batch_size=2",
        # ~50 KB buckets: the tiny model travels in dozens of buckets, and checkpoint tensors a vLLM
        # layer fuses (q/k/v -> qkv_proj, gate/up) land in different buckets
        "trainer.weight_sync_bucket_mb=0.05", "trainer.weight_sync_format=flat",
    ])
    data = ensure_synthetic_zoom(SyntheticZoomSpec(num_train=4, num_eval=0), tmp_path_factory.mktemp("data"))
    pipe = RLPipeline(config, tiny_model_dir, read_rl_parquet(data["train"]))
    yield pipe
    pipe.shutdown()


def test_step_scores_every_trajectory_and_reports_metrics(pipeline):
    result = pipeline.step(0)
    assert len(result.trajectories) == 4  # 2 prompts x G = 2
    for trajectory in result.trajectories:
        rewards = trajectory.rewards
        assert rewards["total"] == pytest.approx(rewards["accuracy"] + rewards["curiosity"] + rewards["penalty"])
        assert trajectory.policy_version == 0
        assert len(trajectory.token_ids) == len(trajectory.loss_mask) == len(trajectory.behaviour_logprobs)
        assert trajectory.num_response_tokens > 0
        assert all(lp <= 0.0 for lp in trajectory.behaviour_logprobs)
    metrics = result.metrics
    for name in ("reward/accuracy", "reward/curiosity", "reward/penalty", "reward/total", "rollout/rapr",
                 "rollout/tool_calls_per_trajectory", "rollout/tokens_per_s", "time/step_s"):
        assert math.isfinite(metrics[name]), name
    assert metrics["rollout/tokens_per_s"] > 0
    assert metrics["rollout/staleness_max"] == 0  # synchronous: only the current policy's samples
    # a version is published exactly when the learner trained on something
    assert metrics["policy_version"] == (1 if metrics["train/samples"] else 0)


def _hf_logprobs(model_dir, weights, token_ids, image, continuation, banned):
    """Teacher-forced log-probs of `continuation` under HF transformers with the pushed weights."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from policies.batching import TrainSample, collate

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    arrays = weights.state_dict()  # a WeightUpdate: every bucket fetched and unpacked
    missing, unexpected = model.load_state_dict(arrays, strict=False)
    assert not unexpected and not [m for m in missing if "lm_head" not in m or "lm_head.weight" in arrays]
    processor = AutoImageProcessor.from_pretrained(model_dir)
    full = list(token_ids) + list(continuation)
    sample = TrainSample(full, [0] * len(full), [0.0] * len(full), [image], 0.0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = collate([sample], processor, tokenizer.convert_tokens_to_ids("<|image_pad|>"), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(**batch.inputs).logits[0, :-1].float()
    logits[:, banned] = -float("inf")  # the engine bans vision tokens from sampling
    logprobs = torch.log_softmax(logits, dim=-1)
    steps = logprobs[-len(continuation):]
    chosen = steps.gather(-1, torch.tensor(continuation)[:, None]).squeeze(-1)
    return chosen, steps.max(dim=-1).values


def test_trained_weights_reach_the_running_engine(pipeline, tiny_model_dir):
    import ray
    from PIL import Image

    from actors.rollout import PromptTask
    from policies.batching import TrainSample

    worker = pipeline.workers[0]
    image = np.asarray(Image.open(pipeline.prompts.records[0].media_paths[0]).convert("RGB"))
    task = PromptTask("probe", "What is the colour of the small square?", ray.put(image), ("red",))
    trajectories, _ = ray.get(worker.rollout.remote([task], 2))
    # Plant opposite advantages so the step certainly changes the weights.
    samples = [TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, t.images, adv)
               for t, adv in zip(trajectories, (1.0, -1.0))]
    prompt = trajectories[0].token_ids[:trajectories[0].loss_mask.index(1)]  # system + user turn with the image
    before = ray.get(worker.greedy.remote(prompt, trajectories[0].images[0], 8))
    metrics = pipeline.learners.train(samples)
    assert math.isfinite(metrics["loss"]) and metrics["trained_tokens"] == sum(sum(s.loss_mask) for s in samples)

    version = pipeline.policy_version + 1
    weights = pipeline.learners.export_weights(version)
    assert weights.version == version and len(weights.buckets) > 10
    report = ray.get(worker.update_weights.remote(weights))
    assert report["policy_version"] == version and report["tensors"] == weights.num_tensors
    assert report["buckets"] == len(weights.buckets)
    pipeline.policy_version = version  # the pipeline's learners did train: keep the shared fixture consistent

    tokens, logprobs = ray.get(worker.greedy.remote(prompt, trajectories[0].images[0], 8))
    banned = list(ray.get(worker.banned_token_ids.remote()))
    chosen, best = _hf_logprobs(tiny_model_dir, weights, prompt, trajectories[0].images[0], tokens, banned)
    error_after = (chosen - torch.tensor(logprobs)).abs().max().item()
    chosen_before, _ = _hf_logprobs(tiny_model_dir, weights, prompt, trajectories[0].images[0],
                                    before[0], banned)
    error_before = (chosen_before - torch.tensor(before[1])).abs().max().item()
    print(f"engine vs HF on the pushed weights: after the push {error_after:.2e}, before {error_before:.2e}")
    # The engine's greedy tokens are HF's argmax (up to float ties) with HF's log-probs ...
    assert (best - chosen).max().item() < 1e-4
    assert error_after < 5e-3
    # ... and that check can fail: before the push the engine disagreed with these weights.
    assert error_before > 10 * error_after


def test_zero3_learner_pair_gathers_and_pushes_weights_the_engine_serves(pipeline, tiny_model_dir):
    """Two learners under ZeRO-3: parameters are sharded, gathered on rank 0, pushed, served exactly."""
    import ray
    from PIL import Image

    from actors.learner import LearnerGroup
    from actors.rollout import PromptTask
    from policies.batching import TrainSample

    trainer = pipeline.config.trainer.model_copy(update={"zero_stage": 3, "num_learners": 2, "num_cpus_per_learner": 0.5,
                                                         "weight_sync_format": "direct"})  # the default wire format (the fixture uses flat)
    deepspeed_shm = lambda: set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))  # noqa: E731
    shm_before = deepspeed_shm()
    group = LearnerGroup(tiny_model_dir, trainer, 1.0, "cpu", samples_per_step=4)
    try:
        assert [info["backend"] for info in group.setup_info] == ["gloo", "gloo"]
        # DeepSpeed's CPU allreduce workspaces (69 MB each) are unlinked once both ranks mapped them
        assert deepspeed_shm() <= shm_before
        sharded = ray.get([actor.local_parameter_count.remote() for actor in group.actors])
        full = group.export_weights(0).num_elements
        assert all(0 < n < full for n in sharded)  # each rank holds only its shard

        worker = pipeline.workers[0]
        image = np.asarray(Image.open(pipeline.prompts.records[1].media_paths[0]).convert("RGB"))
        task = PromptTask("zero3", "What is the colour of the small square?", ray.put(image), ("red",))
        trajectories, _ = ray.get(worker.rollout.remote([task], 2))
        samples = [TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, t.images, adv)
                   for t, adv in zip(trajectories, (1.0, -1.0))]
        group.train(samples)
        weights = group.export_weights(100)
        assert len(weights.buckets) > 10 and weights.wire == "direct"  # one ZeRO-3 gather per bucket
        assert ray.get(worker.update_weights.remote(weights))["policy_version"] == 100
        prompt = trajectories[0].token_ids[:trajectories[0].loss_mask.index(1)]
        tokens, logprobs = ray.get(worker.greedy.remote(prompt, trajectories[0].images[0], 8))
        banned = list(ray.get(worker.banned_token_ids.remote()))
        chosen, best = _hf_logprobs(tiny_model_dir, weights, prompt, trajectories[0].images[0], tokens, banned)
        assert (best - chosen).max().item() < 1e-4
        assert (chosen - torch.tensor(logprobs)).abs().max().item() < 5e-3
    finally:
        group.shutdown()
        pipeline._publish_weights()  # give the worker back the pipeline's own weights and version
        pipeline._wait_for_weight_updates()


def _two_samples(pipeline, record: int, qid: str) -> list:
    """Two trajectories of a training record from the pipeline's engine, as samples with
    advantages +1 and -1 (a step that moves the weights)."""
    import ray
    from PIL import Image

    from actors.rollout import PromptTask
    from policies.batching import TrainSample

    image = np.asarray(Image.open(pipeline.prompts.records[record].media_paths[0]).convert("RGB"))
    task = PromptTask(qid, "What is the colour of the small square?", ray.put(image), ("red",))
    trajectories, _ = ray.get(pipeline.workers[0].rollout.remote([task], 2))
    return [TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, t.images, adv)
            for t, adv in zip(trajectories, (1.0, -1.0))]


def test_overlapped_export_publishes_the_weights_of_its_version_while_the_next_step_trains(
        pipeline, tiny_model_dir, monkeypatch):
    """trainer.overlap_weight_export: an export started before the next step (which runs beside it
    in the learner's second thread) carries exactly the weights a plain export of that version
    does, not a mix with the next step's update; the step after it still changes the weights.
    The export is slowed down (it starts reading 2 s late) so that, without the step waiting for
    it before its optimizer update, it would read updated weights: the test can fail."""
    import time

    import ray

    from actors import learner as learner_module
    from actors.learner import LearnerGroup

    class SlowExportLearner(learner_module.Learner.__ray_actor_class__):
        def _export(self, version):
            time.sleep(2.0)
            return super()._export(version)

    monkeypatch.setattr(learner_module, "Learner", ray.remote(SlowExportLearner))
    trainer = pipeline.config.trainer.model_copy(update={"overlap_weight_export": True, "num_cpus_per_learner": 0.5})
    group = LearnerGroup(tiny_model_dir, trainer, 1.0, "cpu", samples_per_step=2)
    try:
        samples = _two_samples(pipeline, 3, "overlap")
        group.train(samples)
        plain = group.export_weights(1).state_dict()
        started = group.start_export(1)  # returns at once: a future
        group.train(samples)  # starts beside the export, updates the weights once it is done
        overlapped = ray.get(started).state_dict()
        after = group.export_weights(2).state_dict()
    finally:
        group.shutdown()
    assert overlapped.keys() == plain.keys()
    assert all(torch.equal(overlapped[name], plain[name]) for name in plain)
    assert any(not torch.equal(after[name], plain[name]) for name in plain)


def test_learner_with_importance_cap_and_kl_reports_them(pipeline, tiny_model_dir):
    from actors.learner import LearnerGroup

    trainer = pipeline.config.trainer.model_copy(update={"importance_cap": 2.0, "kl_coef": 0.1, "num_cpus_per_learner": 0.5})
    group = LearnerGroup(tiny_model_dir, trainer, 1.0, "cpu", samples_per_step=2)
    try:
        samples = _two_samples(pipeline, 2, "kl")
        first = group.train(samples)
        second = group.train(samples)
        assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the learner starts at the reference
        assert second["kl"] > 0  # one step later it has moved away from it
        assert 0 < first["importance_weight"] <= 2.0 and 0 <= first["importance_capped_fraction"] <= 1
        assert first["importance_ratio"] == pytest.approx(1.0)  # ratio against the learner itself
    finally:
        group.shutdown()


@pytest.mark.parametrize("overlap_export", [False, True])
def test_async_mode_bounds_staleness(pipeline, overlap_export):
    """max_staleness 1: the next batch generates while a step trains; no sample is older than 1.
    With the export overlapped, the vLLM worker's update takes the export's future: Ray runs it
    in order anyway (a synchronous actor), so the batches sent after it see the new version."""
    pipeline.config.max_staleness = 1
    pipeline.config.trainer.drop_zero_variance_groups = False  # train every step: versions advance
    pipeline.config.trainer.overlap_weight_export = overlap_export  # (the fixture's learner: one thread)
    first = 10 + 3 * overlap_export
    try:
        start_version = pipeline.policy_version
        results = list(pipeline.run(first, first + 3))
    finally:
        pipeline.config.max_staleness = 0
        pipeline.config.trainer.drop_zero_variance_groups = True
        pipeline.config.trainer.overlap_weight_export = False
    assert [r.step for r in results] == [first, first + 1, first + 2]
    assert pipeline.policy_version == start_version + 3
    staleness = [r.metrics["rollout/staleness_max"] for r in results]
    assert max(staleness) <= 1
    assert staleness[0] == 0 and staleness[1:] == [1, 1]  # batches 11 and 12 were generated a version behind
    for result in results:
        versions = {t.policy_version for t in result.trajectories}
        assert len(versions) == 1  # a weight update never lands inside a batch's generation


def test_video_records_train_on_their_sampled_frames(pipeline, tmp_path):
    """RL data with a video: the prompt shows the clip's N uniformly sampled frames, in order, and
    the step scores and trains on those trajectories like on image ones."""
    from cluster.pictures import trajectory_picture
    from cluster.pipeline import PromptStream
    from policies.data import read_rl_parquet, write_rl_parquet
    from policies.visual_ops import sample_frame_indices
    from tests.eval_fixtures import write_video

    write_video(tmp_path / "clip.mp4", frames=24)  # frame k is grey level 10 k
    write_rl_parquet([{"qid": "clip", "question": "How bright is the last frame?", "image": ["clip.mp4"],
                       "is_video": True, "answer": ["bright"]}], tmp_path / "train.parquet")
    images_stream = pipeline.prompts
    pipeline.prompts = PromptStream(read_rl_parquet(tmp_path / "train.parquet"), shuffle=False, seed=0)
    pipeline.config.trainer.drop_zero_variance_groups = False  # train even if every reward is equal
    try:
        start_version = pipeline.policy_version
        result = pipeline.step(20)
    finally:
        pipeline.prompts = images_stream
        pipeline.config.trainer.drop_zero_variance_groups = True
    shown = pipeline.config.tools.budgets.num_video_frames
    expected_levels = [10 * index for index in sample_frame_indices(24, shown)]
    assert len(result.trajectories) == 4  # the one record, taken twice, x G = 2
    for trajectory in result.trajectories:
        assert trajectory.is_video and len(trajectory.images) >= shown
        levels = [float(np.asarray(frame).mean()) for frame in trajectory.images[:shown]]
        assert np.abs(np.array(levels) - expected_levels).max() < 4, levels  # H.264 is lossy
        assert math.isfinite(trajectory.rewards["total"])
        assert trajectory_picture(trajectory).width > 0
    assert result.metrics["train/samples"] == 4 and pipeline.policy_version == start_version + 1
    assert "rollout/crop_hit_rate" not in result.metrics  # a video has no prompt image to hit


def test_updates_per_step_makes_one_optimizer_step_per_mini_batch(pipeline):
    """trainer.updates_per_step 2: the step's 4 samples train as two mini-batches of 2, two
    DeepSpeed optimizer steps (the group was sized for 4 samples in one: the split fits it)."""
    pipeline.config.trainer.drop_zero_variance_groups = False  # train every step
    try:
        one = pipeline.step(40).metrics
        pipeline.learners.updates_per_step = 2
        two = pipeline.step(41).metrics
    finally:
        pipeline.learners.updates_per_step = 1
        pipeline.config.trainer.drop_zero_variance_groups = True
    assert one["train/samples"] == two["train/samples"] == 4
    assert one["train/optimizer_steps"] == 1 and two["train/optimizer_steps"] == 2
    # counted by DeepSpeed itself, on the learner
    assert two["train/optimizer_step"] - one["train/optimizer_step"] == 2
    assert two["train/trained_tokens"] > 0 and math.isfinite(two["train/loss"])


def test_a_rollout_worker_killed_mid_step_loses_no_prompt(ray_cluster, tiny_model_dir, tmp_path_factory):
    """Two engines; one is killed while the step generates: its share runs again on the other."""
    import ray
    from collections import Counter

    from cluster.config import load_config
    from cluster.pipeline import RLPipeline
    from policies.data import read_rl_parquet
    from policies.synthetic import SyntheticZoomSpec, ensure_synthetic_zoom

    config = load_config(None, [
        "prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens_per_turn=16", "rollout.num_workers=2",
        "rollout.num_cpus=0.5", "trainer.num_cpus_per_learner=0.25", "trainer.micro_batch_size=4",
    ])
    data = ensure_synthetic_zoom(SyntheticZoomSpec(num_train=8, num_eval=0), tmp_path_factory.mktemp("data2"))
    pipe = RLPipeline(config, tiny_model_dir, read_rl_parquet(data["train"]))
    try:
        batch = pipe.submit(0)
        victim = batch.calls[1][0]
        ray.kill(victim, no_restart=True)
        result = pipe.complete(batch)
        counts = Counter(t.qid for t in result.trajectories)
        assert sorted(counts) == sorted(r.qid for r in batch.records)  # every prompt of the step ...
        assert set(counts.values()) == {2}  # ... exactly G times
        assert result.metrics["rollout/lost_workers"] == 1 and len(pipe.workers) == 1
        assert pipe.step(1).metrics["rollout/trajectories"] == 8  # the survivor carries on
    finally:
        pipe.shutdown()
