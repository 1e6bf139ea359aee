"""Placement groups for the learners (`trainer.placement_strategy`): bundles and actor options as
pure functions checked with Ray's own validator, and one light check on a local Ray cluster."""
from __future__ import annotations

import time

import pytest
from ray.util.placement_group import validate_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.learner import learner_actor_options, learner_bundles
from actors.weight_sync import nontemporal_copy_env
from cluster.config import ConfigError, TrainerConfig, load_config


def test_default_is_no_placement_group_and_unchanged_options():
    trainer = load_config().trainer
    assert trainer.placement_strategy is None
    options = learner_actor_options(trainer)
    assert options.pop("runtime_env") == {"env_vars": nontemporal_copy_env(trainer.nontemporal_copy_threshold_mb)}
    # two threads: a step's shares arrive beside the step before (actors/learner_inbox.py)
    assert options == {"num_cpus": trainer.num_cpus_per_learner, "num_gpus": trainer.num_gpus_per_learner,
                       "max_concurrency": 2}
    overlapped = trainer.model_copy(update={"overlap_weight_export": True})
    assert learner_actor_options(overlapped)["max_concurrency"] == 3  # and the export beside both


def test_gpu_preset_packs_one_bundle_per_learner_on_one_node():
    trainer = load_config("qwen2.5-vl-7b").trainer
    bundles = learner_bundles(trainer)
    assert trainer.placement_strategy == "STRICT_PACK"
    assert bundles == [{"CPU": 4.0, "GPU": 1.0}] * 4
    validate_placement_group(bundles, strategy=trainer.placement_strategy)  # Ray's own checks


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
def test_each_learner_goes_into_its_own_bundle(strategy):
    trainer = TrainerConfig(num_learners=3, num_cpus_per_learner=0.5, placement_strategy=strategy)
    bundles = learner_bundles(trainer)
    assert bundles == [{"CPU": 0.5}] * 3  # zero GPUs left out: Ray rejects zero-only bundles
    validate_placement_group(bundles, strategy=strategy)
    group = object()  # stands in for a PlacementGroup: the options only carry it
    for rank in range(3):
        options = learner_actor_options(trainer, group, rank)
        options.pop("runtime_env")
        strategy_option = options.pop("scheduling_strategy")
        assert isinstance(strategy_option, PlacementGroupSchedulingStrategy)
        assert strategy_option.placement_group is group and strategy_option.placement_group_bundle_index == rank
        assert options == {"num_cpus": 0.5, "num_gpus": 0.0, "max_concurrency": 2}


def test_bad_strategy_or_empty_bundles_fail_at_config_time():
    with pytest.raises(ConfigError, match="trainer.placement_strategy"):
        load_config(None, ["trainer.placement_strategy=STRICTPACK"])
    with pytest.raises(ConfigError, match="placement_strategy needs"):
        load_config(None, ["trainer.placement_strategy=PACK", "trainer.num_cpus_per_learner=0"])
    assert load_config(None, ["trainer.placement_strategy=null"]).trainer.placement_strategy is None


@pytest.mark.integration
def test_learners_land_in_their_bundles_on_a_local_cluster(ray_cluster):
    """The group reserved by `reserve_learner_placement` holds actors scheduled with
    `learner_actor_options` each in its own bundle (tiny stand-in actors; no DeepSpeed)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from actors.learner import reserve_learner_placement

    @ray.remote
    class Probe:
        def placement_group_id(self):
            return ray.get_runtime_context().get_placement_group_id()

        def glibc_tunables(self):
            import os

            return os.environ.get("GLIBC_TUNABLES")

    trainer = TrainerConfig(num_learners=2, num_cpus_per_learner=0.25, placement_strategy="STRICT_PACK")
    group = reserve_learner_placement(trainer, wait_log_s=5)

    def free_in_bundles() -> tuple[float, float]:  # Ray exposes each bundle as CPU_group_<index>_<group id>
        available = ray.available_resources()
        return tuple(available.get(f"CPU_group_{i}_{group.id.hex()}", 0.0) for i in (0, 1))

    def settle(expected: tuple[float, float]) -> tuple[float, float]:
        deadline = time.monotonic() + 30  # resource views refresh asynchronously
        while free_in_bundles() != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return free_in_bundles()

    try:
        assert ray.get(group.ready(), timeout=60)
        assert settle((0.25, 0.25)) == (0.25, 0.25)
        second = Probe.options(**learner_actor_options(trainer, group, rank=1)).remote()
        assert ray.get(second.placement_group_id.remote(), timeout=60) == group.id.hex()
        # the learner process starts with the memcpy tuning (glibc reads it at start only)
        assert "x86_non_temporal_threshold=262144" in ray.get(second.glibc_tunables.remote())
        assert settle((0.25, 0.0)) == (0.25, 0.0)  # rank 1 took bundle 1, not any bundle
        ray.kill(second)
    finally:
        remove_placement_group(group)
    assert reserve_learner_placement(TrainerConfig()) is None


def test_custom_tool_resources_count_in_the_required_resources():
    config = load_config("qwen2.5-vl-7b", ["tools.resources={tool_cpu: 1}"])
    assert config.required_resources() == {"CPU": pytest.approx(96.1), "GPU": 8, "tool_cpu": 64}
    assert "tool_cpu" not in load_config("qwen2.5-vl-7b").required_resources()
