import pytest

from cluster.config import ConfigError, PixelRayConfig, flatten, load_config


def test_default_is_the_tiny_cpu_preset_and_fits_two_cores():
    defaults = load_config()
    assert defaults == load_config("tiny-cpu")
    assert defaults.device == "cpu" and defaults.model.path is None
    assert defaults.required_resources() == {"CPU": pytest.approx(1.9), "GPU": 0}


def test_gpu_preset_validates_offline():
    config = load_config("qwen2.5-vl-7b")
    assert config.device == "cuda"
    assert config.trainer.zero_stage == 3 and config.trainer.num_learners == 4
    assert config.rollout.num_workers == 4 and config.rollout.group_size == 8
    assert config.tools.budgets.original_max_pixels == 2000 * 28 * 28


def test_dotted_overrides_are_typed():
    config = load_config(None, ["trainer.lr=1e-6", "steps=7", "reward.curiosity.alpha=0", "rollout.temperature=0.7"])
    assert config.trainer.lr == 1e-6
    assert config.steps == 7
    assert config.reward.curiosity.alpha == 0
    assert config.rollout.temperature == 0.7


@pytest.mark.parametrize(
    "override, field",
    [
        ("trainer.lr=-1", "trainer.lr"),
        ("trainer.lrr=1e-6", "trainer.lrr"),
        ("rollout.group_size=0", "rollout.group_size"),
        ("trainer.zero_stage=5", "trainer.zero_stage"),
        ("reward.curiosity.variant=mine", "reward.curiosity.variant"),
        ("tools.pool_size=0", "tools.pool_size"),
        ("rollout.image_cache_bytes=-1", "rollout.image_cache_bytes"),
    ],
)
def test_bad_values_fail_with_the_field_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_guessing_the_likeliest_answer_needs_an_answer_prior():
    with pytest.raises(ConfigError, match=r"sft\.direct_answers"):
        load_config(None, ["sft.direct_answers=likeliest"])  # the default task's answers are uniform
    with pytest.raises(ConfigError, match=r"sft\.direct_answers"):
        load_config("zoom-curiosity", ["sft.direct_answers=likeliest", "sft.prior_fraction=null"])
    config = load_config("zoom-curiosity", ["sft.direct_answers=likeliest"])
    assert config.sft.direct_answers == "likeliest"
    assert load_config(None, ["sft.direct_answers=likeliest", "sft.prior_fraction=0.55"]).sft.prior_fraction == 0.55


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["trainer.lr"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny-cpu"):
        load_config("no-such-preset")


def test_cpu_device_cannot_ask_for_gpus():
    with pytest.raises(ConfigError, match="device=cpu"):
        load_config(None, ["rollout.num_gpus=1"])


def test_flatten_gives_dotted_string_params():
    flat = flatten(PixelRayConfig())
    assert flat["trainer.lr"] == "1e-05"
    assert flat["reward.curiosity.alpha"] == "0.5"


def test_learning_preset_validates_and_keeps_the_view_too_coarse_for_the_pattern():
    config = load_config("zoom-curiosity")
    task, budgets = config.data.synthetic, config.tools.budgets
    assert task.region_hint and task.detail == "pattern" and task.prior_fraction == 0.55
    # the view shrinks the canvas at least 4x, past the pattern's period, and a crop does not
    view_side = (budgets.original_max_pixels ** 0.5)
    assert task.canvas_size / view_side >= task.pattern_period
    assert budgets.crop_max_pixels >= (task.canvas_size / task.grid) ** 2
    assert config.reward.curiosity.alpha > 0 and config.sft.closeup_fraction > 0
