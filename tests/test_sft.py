"""`python -m cluster.sft`: its config section, lr schedule, and an end-to-end run whose checkpoint
loads in transformers and starts an RL run (vLLM serving it)."""
import json
import subprocess
import sys

import pytest

from cluster.config import ConfigError, load_config


def test_sft_section_defaults_and_overrides():
    config = load_config()
    assert config.sft.data_path is None and config.sft.self_correction_fraction == 0.3
    assert config.sft.warmup_ratio == 0.1 and config.sft.output_dir == "checkpoints/sft"
    config = load_config(None, ["sft.epochs=2", "sft.lr=1e-6", "sft.data_path=sft.json", "sft.max_steps=3"])
    assert (config.sft.epochs, config.sft.lr, config.sft.data_path, config.sft.max_steps) == (2, 1e-6, "sft.json", 3)


@pytest.mark.parametrize("override", ["sft.self_correction_fraction=1.5", "sft.epochs=0", "sft.lr=0", "sft.epoch=3",
                                      "sft.prior_fraction=1.5", "sft.prior_fraction=most"])
def test_bad_sft_values_fail_with_the_field_named(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_the_sft_traces_answer_prior_is_the_tasks_unless_set_apart():
    assert load_config("zoom-curiosity").sft_trace_spec().prior_fraction == 0.55
    apart = load_config("zoom-curiosity", ["data.synthetic.prior_fraction=0.6", "sft.prior_fraction=0.55"])
    assert apart.sft_trace_spec().prior_fraction == 0.55 and apart.data.synthetic.prior_fraction == 0.6
    assert apart.sft_trace_spec().square_size == apart.data.synthetic.square_size  # only the prior differs
    assert load_config("zoom-curiosity", ["sft.prior_fraction=null"]).sft_trace_spec().prior_fraction is None


def test_sft_traces_keep_their_own_answer_prior_when_the_rl_task_moves(tiny_model_dir):
    from cluster.sft import build_examples

    traces = ["sft.num_traces=12", "sft.direct_fraction=0.5"]
    as_task = build_examples(load_config(None, [*traces, "data.synthetic.prior_fraction=0.55"]), tiny_model_dir)
    set_apart = build_examples(load_config(None, [*traces, "data.synthetic.prior_fraction=0.9",
                                                  "sft.prior_fraction=0.55"]), tiny_model_dir)
    moved = build_examples(load_config(None, [*traces, "data.synthetic.prior_fraction=0.9"]), tiny_model_dir)
    assert [e.token_ids for e in set_apart] == [e.token_ids for e in as_task]  # the same SFT draw
    assert [e.token_ids for e in moved] != [e.token_ids for e in as_task]


@pytest.mark.parametrize("overrides, field", [
    (["sft.skill_gate.box_range=[0.7, 0.3]"], "sft.skill_gate"),
    (["sft.skill_gate.min_reading=1.5"], "sft.skill_gate.min_reading"),
    (["sft.skill_gate.first_check_epoch=9", "sft.epochs=8"], "sft.skill_gate.first_check_epoch"),
    (["sft.skill_gate.min_reading=0.9", "sft.data_path=traces.json"], "sft.skill_gate"),
    (["sft.skill_gate.box_range=[0, 1]", "data.synthetic.region_hint=false"], "sft.skill_gate.box_range"),
])
def test_a_skill_gate_the_run_cannot_check_fails_at_start(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_cosine_schedule_goes_into_the_deepspeed_config_only_when_asked():
    from actors.learner import cosine_schedule, deepspeed_config

    trainer = load_config().trainer
    assert "scheduler" not in deepspeed_config(trainer, 1, "cpu")
    schedule = cosine_schedule(total_steps=40, warmup_ratio=0.1)
    config = deepspeed_config(trainer, 2, "cpu", schedule)
    assert config["scheduler"]["type"] == "WarmupCosineLR"
    params = config["scheduler"]["params"]
    assert params["total_num_steps"] == 41 and params["warmup_num_steps"] == 4
    assert params["warmup_type"] == "linear" and 0 < params["warmup_min_ratio"] < 1
    assert cosine_schedule(3, 0.1)["params"]["warmup_num_steps"] == 2  # DeepSpeed's minimum


def test_plan_steps_counts_partial_batches_and_caps():
    from cluster.sft import plan_steps

    assert plan_steps(20, 8, 3, None) == (3, 9)
    assert plan_steps(16, 8, 5, 4) == (2, 4)


def test_bad_config_fails_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cluster.sft", "sft.lr=-1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "sft.lr" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.integration
def test_sft_loss_falls_and_its_checkpoint_loads_and_starts_an_rl_run(tmp_path, tiny_model_dir):
    output = tmp_path / "sft"
    summary_path = tmp_path / "sft-summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.sft", "--summary-json", str(summary_path), "sft.num_traces=24",
         "sft.epochs=2", "sft.batch_size=8", "sft.lr=2e-3", f"sft.output_dir={output}", "trainer.torch_threads=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == summary["steps"] == 6
    assert losses[-1] < losses[0] - 0.5, losses
    lrs = [h["lr"] for h in summary["history"]]
    peak = lrs.index(max(lrs))  # warmup from above 0, then cosine decay (never above sft.lr)
    assert 0 < lrs[0] < lrs[peak] <= 2e-3 and lrs[peak:] == sorted(lrs[peak:], reverse=True) and lrs[-1] < lrs[peak]
    assert set(summary["kinds"]) <= {"zoom", "zoom_miss", "zoom_error"}

    # the loss per step is in MLflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pixelray.mode"] == "sft"
    logged = sorted(client.get_metric_history(summary["run_id"], "sft/loss"), key=lambda m: m.step)
    assert [m.value for m in logged] == pytest.approx(losses)

    # plain transformers loads the checkpoint (weights, tokenizer, processor), and it was trained
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf_dir = output / "hf"
    assert summary["model"] == str(hf_dir)
    trained = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(hf_dir)
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == trained.config.image_token_id
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)

    # an RL run starts from it: vLLM serves it, the tool loop runs, the learner trains a step
    rl_summary = tmp_path / "rl-summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.run", "--summary-json", str(rl_summary), "steps=1", "prompts_per_step=2",
         "rollout.group_size=2", "rollout.max_new_tokens_per_turn=48", f"model.path={hf_dir}",
         f"checkpoint.directory={tmp_path / 'rl-checkpoints'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rl = json.loads(rl_summary.read_text())
    assert rl["model"] == str(hf_dir) and rl["steps"] == 1


def run_sft(tmp_path, name, *overrides):
    summary_path = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, "-m", "cluster.sft", "--config", "zoom-curiosity", "--summary-json", str(summary_path),
         "sft.num_traces=16", "sft.batch_size=8", f"sft.output_dir={tmp_path / name}", "trainer.torch_threads=1",
         "sft.skill_gate.probe_examples=4", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    return result, json.loads(summary_path.read_text()) if summary_path.exists() else None


@pytest.mark.integration
def test_sft_stops_at_the_first_epoch_passing_its_skill_gate_and_fails_when_none_does(tmp_path, tiny_model_dir):
    # a gate anything passes: the first check (after epoch 1 of 3) ends SFT, its model is the output
    result, summary = run_sft(tmp_path, "passes", "sft.epochs=3", "sft.skill_gate.min_reading=0")
    assert result.returncode == 0, result.stderr[-3000:]
    gate = summary["skill_gate"]
    assert gate["passed"] and [c["epoch"] for c in gate["checks"]] == [1]
    assert summary["epochs_trained"] == 1 and summary["steps"] == summary["steps_per_epoch"] == 2
    assert {"reading", "box", "holds_square"} <= set(gate["checks"][0]) and gate["checks"][0]["verdict"] == "passed"
    assert (tmp_path / "passes" / "hf" / "config.json").exists()

    # the same seed on the same machine gives the same warm start, bit for bit
    result, again = run_sft(tmp_path, "passes-again", "sft.epochs=3", "sft.skill_gate.min_reading=0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert again["weights_sha256"] == summary["weights_sha256"]
    assert len(summary["weights_sha256"]) == 64 and again["first_loss"] == summary["first_loss"]
    assert summary["machine"]["torch_cpu_capability"] == again["machine"]["torch_cpu_capability"] != ""

    # a box share of 100% on fresh examples is out of reach of 4 steps: checked after epochs 1 and 2,
    # missed, exit code 3 with the reason; the model is still written
    from cluster.sft import GATE_FAILED

    result, summary = run_sft(tmp_path, "misses", "sft.epochs=2", "sft.skill_gate.min_reading=0",
                              "sft.skill_gate.box_range=[1, 1]")
    assert result.returncode == GATE_FAILED, result.stderr[-3000:]
    assert "failed sft.skill_gate at epoch 2: box" in result.stderr
    gate = summary["skill_gate"]
    assert not gate["passed"] and [c["verdict"] for c in gate["checks"]] == ["short", "short"]
    assert summary["steps"] == 4 and (tmp_path / "misses" / "hf" / "config.json").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(summary["run_id"]).data.tags["pixelray.skill_gate"] == "short"
    assert [m.step for m in client.get_metric_history(summary["run_id"], "sft/skill_reading")] == [2, 4]


def test_gate_checks_fall_evenly_in_each_epoch_from_the_first_check_epoch():
    from cluster.sft import epoch_batches, gate_due

    batches = list(epoch_batches(10, 4, 2, seed=0))
    assert [(e, d, len(i)) for e, d, i in batches] == [(0, 1, 4), (0, 2, 4), (0, 3, 2), (1, 1, 4), (1, 2, 4), (1, 3, 2)]
    assert sorted(i for _, _, indices in batches[:3] for i in indices) == list(range(10))  # each example once an epoch

    def due(first, per_check, per_epoch=4, epochs=3):
        return [(e, d) for e in range(epochs) for d in range(1, per_epoch + 1)
                if gate_due(first, per_check, e + d / per_epoch, d, per_epoch)]

    assert due(1, 1) == [(0, 4), (1, 4), (2, 4)]
    assert due(2, 2) == [(1, 4), (2, 2), (2, 4)]  # epoch 1.5 is before epoch 2: not checked
    assert due(3, 4, epochs=3) == [(2, 4)]
    assert due(1, 3, per_epoch=4, epochs=2) == [(0, 4), (1, 2), (1, 3), (1, 4)]  # ceil(4/3), ceil(8/3), 4


def test_weights_digest_names_the_weights_and_nothing_else(tmp_path):
    from cluster.sft import weights_digest

    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (second / "config.json").write_text("{}")  # not weights: does not change the digest
    assert weights_digest(first) == weights_digest(second)
    (second / "model.safetensors").write_bytes(b"\x00\x01" * 999 + b"\x00\x02")
    assert weights_digest(first) != weights_digest(second)
