"""Typed run configuration: defaults = the tiny-cpu preset; YAML files and dotted overrides on top.

Every section forbids unknown keys, so a typo or a bad value fails at start with the field named
(`trainer.lr: Input should be greater than 0`), before any actor starts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from actors.tools import ToolPoolConfig
from cluster.checkpoint import CheckpointConfig
from policies.model import TinyModelSpec
from policies.replay import ReplayConfig
from policies.simulation import SimulationConfig
from policies.synthetic import SyntheticZoomSpec
from rewards.accuracy import AnswerType
from rewards.curiosity import CuriosityConfig

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "tiny-cpu"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    path: str | None = None  # any HF Qwen2.5-VL checkpoint; None = build the tiny model
    tiny: TinyModelSpec = TinyModelSpec()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DataConfig(Section):
    train_path: str | None = None  # Pixel Reasoner RL parquet; None = the built-in synthetic task
    eval_path: str | None = None
    synthetic: SyntheticZoomSpec = SyntheticZoomSpec()
    shuffle: bool = True


class RolloutConfig(Section):
    # "simulated": time-modelled engines and learners (actors/simulated.py, the `simulation` section)
    engine: Literal["vllm", "simulated"] = "vllm"
    num_workers: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    group_size: int = Field(default=4, ge=1)  # G rollouts per prompt
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tool_calls: int = Field(default=3, ge=0)
    max_new_tokens_per_turn: int = Field(default=96, ge=1)
    max_model_len: int = Field(default=2048, ge=64)  # token budget of a whole trajectory
    max_num_seqs: int = Field(default=64, ge=1)
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    seeded_sampling: bool = True  # per-request seeds from (run seed, step, prompt, sample, turn)
    # How a vLLM worker schedules turns (actors/rollout.py). True: continuous batching over the
    # engine's step loop; a trajectory's next turn joins the running batch right after the step
    # that finished its tool call, so a long turn holds nobody else (tools run between steps, so a
    # seeded rerun gives the same tokens). False: turn-synchronous, one generate call per turn of
    # all active trajectories (the baseline; same tokens). Tiny CPU model, whole episodes
    # (benchmarks/pipeline.py part c): 0.99-1.19x with the random model, 0.90x with one that calls
    # a tool in almost every trajectory (a tool-pool round trip costs about two CPU engine steps);
    # on by default for GPU engines, where a decode step costs about the same whatever the batch.
    # Simulated engines: `simulation.batching`.
    continuous_batching: bool = True
    # Prompt images the driver keeps put in the object store, by path (LRU by pixel bytes): a
    # revisited prompt ships no pixels. Each cached image stays pinned in the store; 0: no cache.
    image_cache_bytes: int = Field(default=1 << 30, ge=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    kv_cache_gib: int = Field(default=1, ge=1)  # CPU engines only (vLLM reads whole GiB)
    cpu_threads_bind: str = "auto"  # CPU engines only: VLLM_CPU_OMP_THREADS_BIND


class RewardConfig(Section):
    curiosity: CuriosityConfig = CuriosityConfig()
    # The verifier of records without their own: one dataset per run (e.g. `anls` for InfoVQA), or
    # "auto" (inferred from each gold's form). Mixtures set it per record instead: an `answer_type`
    # (and optional `choices`) column of the RL parquet wins over this (rewards/group.py).
    answer_type: AnswerType = "auto"
    # Crops covering more than this share of their image do not count as visual operations for the
    # reward (curiosity, efficiency); 1.0 = all count, as in the paper. Metrics (RaPR) count all.
    max_crop_area: float = Field(default=1.0, gt=0, le=1)
    count_failed_operations: bool = True  # False: calls answered by an execution error do not count either
    num_cpus: float = Field(default=0.1, ge=0)


class TrainerConfig(Section):
    num_learners: int = Field(default=1, ge=1)
    num_cpus_per_learner: float = Field(default=1.0, ge=0)
    num_gpus_per_learner: float = Field(default=0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    eps_low: float = Field(default=0.2, ge=0)
    eps_high: float = Field(default=0.35, ge=0)
    micro_batch_size: int = Field(default=4, ge=1)
    # Optimizer steps per RL step: the step's samples are split into this many mini-batches (verl's
    # ppo_mini_batch_size = batch / this), each one optimizer step; the eps_low/eps_high clip then
    # bounds how far the later ones move from the behaviour policy. 1: one step on the whole batch.
    updates_per_step: int = Field(default=1, ge=1)
    # True: one optimizer step per share of samples_per_step / updates_per_step samples kept, rounded
    # up (as verl's fixed ppo_mini_batch_size), so a step whose filter kept fewer samples (zero-variance
    # groups dropped) makes fewer optimizer steps. False: always updates_per_step steps, on smaller
    # mini-batches then; 4 steps of 6 samples at lr 2e-4 preceded a collapse in the learning
    # demonstration (benchmarks/LEARNING.md, "The collapse").
    fixed_mini_batch: bool = False
    gradient_clipping: float = Field(default=1.0, gt=0)
    advantage: Literal["mean", "mean_std"] = "mean"
    drop_zero_variance_groups: bool = True
    freeze_vision_tower: bool = False
    torch_threads: int | None = Field(default=None, ge=1)  # None: Ray's default for the actor's CPUs
    replay: ReplayConfig = ReplayConfig()  # Selective Sample Replay (off by default)
    # Truncated importance weights exp(learner - engine log-prob) capped here; None = off, and the
    # PPO ratio is then taken against the engine's behaviour log-probs directly.
    importance_cap: float | None = Field(default=None, gt=0)
    kl_coef: float = Field(default=0.0, ge=0)  # KL to the frozen initial policy (the paper uses 0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    # Weight sync learner rank 0 -> engines: the state dict travels in buckets of at most this many
    # MB (one object-store put each; a larger tensor gets a bucket of its own). Bounds the ZeRO-3
    # gather and the staging memory; benchmarks/weight_sync.py measures the size's effect.
    weight_sync_bucket_mb: float = Field(default=256, gt=0)
    # "flat": each bucket is packed into one uint8 buffer, then put (two host copies; the layout the
    # GPU/NCCL design broadcasts). "direct": the bucket's tensors are put as a list of uint8 views,
    # which Ray writes back to back into one object (one copy). "shm": learner rank 0 copies the
    # buckets into a ring of `weight_sync_shm_slots` files under `weight_sync_shm_dir`, kept mapped
    # on both sides (one copy, no object store; 0.6x memcpy vs 0.5x for "direct" at 256 MB buckets on
    # this 2-core box, benchmarks/weight_sync.py). SAME NODE ONLY: every rollout engine must share
    # learner rank 0's /dev/shm (an engine elsewhere fails its first sync with a clear error; use
    # "direct" across nodes), and an export stays readable for `weight_sync_shm_slots` exports, so
    # it must be >= max_staleness + 1 (checked below); the ring costs slots x the state dict in
    # shared memory. All formats read zero-copy on the engine.
    weight_sync_format: Literal["flat", "direct", "shm"] = "direct"
    weight_sync_shm_dir: str = "/dev/shm"
    weight_sync_shm_slots: int = Field(default=2, ge=1)
    # Export the new weights in the background: the learners start the next step while rank 0 packs
    # and publishes (the export only reads the parameters; a step waits for it before its first
    # optimizer update, which writes them), and the driver hands the export's future to the engines
    # instead of waiting for it. Takes the export off the serial learner stage of an asynchronous
    # run (benchmarks/pipeline.py, part b). ZeRO-3 cannot: its export gathers are collectives that
    # would interleave with the training step's. Each learner actor then runs two threads.
    overlap_weight_export: bool = False
    # Learner processes run memcpy with non-temporal stores from this size up (glibc tunable, x86;
    # actors.weight_sync.nontemporal_copy_env says why): the export's copies then run at memcpy speed
    # on VMs whose reported L3 is huge. None keeps glibc's own threshold.
    nontemporal_copy_threshold_mb: float | None = Field(default=0.25, gt=0)
    deepspeed: dict[str, Any] = Field(default_factory=dict)  # merged over the generated DeepSpeed config
    # Ray placement group for the learners: one bundle {CPU, GPU} per learner, each learner in its own
    # bundle; STRICT_PACK keeps all ranks on one node (NCCL over NVLink). None: no placement group.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None

    def gradient_accumulation_steps(self, samples_per_step: int, updates_per_step: int = 1) -> int:
        """Micro-batches per optimizer step when `samples_per_step` samples train in `updates_per_step`
        optimizer steps, split across the learners."""
        per_update = math.ceil(samples_per_step / updates_per_step)
        per_rank = math.ceil(per_update / self.num_learners)
        return max(1, math.ceil(per_rank / self.micro_batch_size))

    @model_validator(mode="after")
    def _placeable(self) -> "TrainerConfig":
        if self.placement_strategy and not (self.num_cpus_per_learner or self.num_gpus_per_learner):
            raise ValueError("placement_strategy needs num_cpus_per_learner or num_gpus_per_learner > 0")
        if self.overlap_weight_export and self.zero_stage == 3:
            raise ValueError("overlap_weight_export needs zero_stage <= 2 (ZeRO-3's export gathers are collectives "
                             "that cannot run beside a training step)")
        return self


class SkillGateConfig(Section):
    """Make the warm start's skills a checked outcome, not a draw: after each epoch (or
    `checks_per_epoch` times in one) from `first_check_epoch` on, SFT writes the model and probes
    it (`cluster.skill_probe`, teacher-forced, fresh examples); it stops at the first check that
    passes, and fails (exit code 3, the model still written) if the box share overshoots
    `box_range` or the epochs run out. The learning
    demonstration needs a warm start that reads close-ups and whose zooms pay little at first.
    The lr schedule still spans `sft.epochs` (the budget): a gate passed early stops mid-schedule."""

    min_reading: float = Field(default=0.9, ge=0, le=1)  # close-ups read right, at least
    box_range: tuple[float, float] | None = None  # named cell's box written greedily, share within
    first_check_epoch: int = Field(default=1, ge=1)
    checks_per_epoch: int = Field(default=1, ge=1)  # skills can jump within an epoch (a whole cell's box at once)
    probe_examples: int = Field(default=64, ge=1)  # per skill and check (one example = 1.6 points at 64)

    @model_validator(mode="after")
    def _ordered(self) -> "SkillGateConfig":
        if self.box_range and not 0 <= self.box_range[0] <= self.box_range[1] <= 1:
            raise ValueError(f"box_range {list(self.box_range)} must be [low, high] with 0 <= low <= high <= 1")
        return self


class SFTConfig(Section):
    """Warm-start SFT (`python -m cluster.sft`): the paper's recipe is lr 1e-6 cosine, warmup 0.1,
    5 epochs, ZeRO-2, vision tower frozen; the tiny model needs a far higher lr to learn quickly."""

    data_path: str | None = None  # Pixel Reasoner SFT JSON (`message_list`); None = generated traces
    image_root: str | None = None  # media paths of data_path are relative to this (default: its folder)
    keep_data_system_prompt: bool = False  # False: the tool protocol prompt replaces the data's (as in RL)
    num_traces: int = Field(default=128, ge=1)  # generated traces for the built-in synthetic task
    self_correction_fraction: float = Field(default=0.3, ge=0, le=1)  # traces that err first, then fix
    direct_fraction: float = Field(default=0.0, ge=0, le=1)  # traces that answer without a visual operation
    # what they answer: "task", the example's own (unseen) answer, so the model guesses as the
    # answers fall; "likeliest", the answer data.synthetic.prior_fraction favours
    direct_answers: Literal["task", "likeliest"] = "task"
    # the traces' answer prior: "task", data.synthetic.prior_fraction; a share (or null, uniform) of
    # their own, as the paper's SFT data are not its RL data
    prior_fraction: Annotated[float, Field(ge=0, le=1)] | Literal["task"] | None = "task"
    closeup_fraction: float = Field(default=0.0, ge=0, le=1)  # perception examples: a close-up and its answer
    misdirected_fraction: float = Field(default=0.0, ge=0, le=1)  # plain zoom traces that crop a miss, then guess
    misdirected_crops: Literal["cell", "random"] = "random"  # the miss: a small box anywhere, or another cell
    # "uniform": close-ups answer each option equally often (perception pretraining has no answer
    # prior); "task": as the task's answers (data.synthetic.prior_fraction)
    closeup_answers: Literal["uniform", "task"] = "uniform"
    seed: int | None = None  # the SFT draw (generated traces, their order); None: the run's seed
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=4, ge=1)  # examples per optimizer step, all learners together
    max_steps: int | None = Field(default=None, ge=1)  # stop early (smoke runs); the schedule spans them
    lr: float = Field(default=2e-3, gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, le=1)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    freeze_vision_tower: bool | None = None  # None: as trainer.freeze_vision_tower
    output_dir: str = "checkpoints/sft"  # the model lands in <output_dir>/hf
    skill_gate: SkillGateConfig | None = None  # None: train all epochs, unchecked


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # relative to the working folder; a server URL works too
    experiment: str = "pixelray"
    run_name: str | None = None
    pictures_every_steps: int = Field(default=1, ge=0)  # a trajectory picture artifact; 0 = none


class PixelRayConfig(Section):
    device: Literal["cpu", "cuda"] = "cpu"
    ray_address: str | None = None  # None: join the cluster of `ray job submit`, else start a local one
    seed: int = 0
    steps: int = Field(default=3, ge=1)
    prompts_per_step: int = Field(default=4, ge=1)
    # 0: synchronous, strictly on-policy. k >= 1: the next k batches generate while a step trains,
    # so a trajectory may be up to k policy versions old (each one carries its version).
    max_staleness: int = Field(default=0, ge=0)
    # Held-out evaluation: greedy rollouts of the eval split (data.eval_path, else the synthetic
    # task's) before the first step, every k steps and after the last, logged as eval/*; 0 = none.
    eval_every_steps: int = Field(default=0, ge=0)
    eval_size: int | None = Field(default=None, ge=1)  # the first n held-out questions; None = all
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    tools: ToolPoolConfig = ToolPoolConfig()
    reward: RewardConfig = RewardConfig()
    trainer: TrainerConfig = TrainerConfig()
    tracking: TrackingConfig = TrackingConfig()
    sft: SFTConfig = SFTConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    simulation: SimulationConfig = SimulationConfig()  # used when rollout.engine is "simulated"
    resume: str | None = None  # "auto" = the latest checkpoint in checkpoint.directory, or a path

    def sft_trace_spec(self) -> SyntheticZoomSpec:
        """The synthetic task the generated SFT traces are drawn from: the RL task's, with the answer
        prior of `sft.prior_fraction` unless that is "task"."""
        if self.sft.prior_fraction == "task":
            return self.data.synthetic
        return self.data.synthetic.model_copy(update={"prior_fraction": self.sft.prior_fraction})

    @model_validator(mode="after")
    def _consistent(self) -> "PixelRayConfig":
        if self.device == "cuda" and (self.rollout.num_gpus == 0 or self.trainer.num_gpus_per_learner == 0):
            raise ValueError("device=cuda needs rollout.num_gpus > 0 and trainer.num_gpus_per_learner > 0")
        if self.device == "cpu" and (self.rollout.num_gpus or self.trainer.num_gpus_per_learner):
            raise ValueError("device=cpu cannot ask for GPUs (rollout.num_gpus, trainer.num_gpus_per_learner)")
        gate = self.sft.skill_gate
        if gate and (self.sft.data_path or self.data.train_path):
            raise ValueError("sft.skill_gate probes the built-in synthetic task: it needs sft.data_path and "
                             "data.train_path unset")
        if self.sft.direct_answers == "likeliest" and self.sft_trace_spec().prior_fraction is None:
            raise ValueError("sft.direct_answers='likeliest' needs an answer prior, sft.prior_fraction or "
                             "data.synthetic.prior_fraction (uniform answers have no likeliest one)")
        if gate and gate.box_range and not self.data.synthetic.region_hint:
            raise ValueError("sft.skill_gate.box_range needs data.synthetic.region_hint (a named cell to crop)")
        if gate and gate.first_check_epoch > self.sft.epochs:
            raise ValueError(f"sft.skill_gate.first_check_epoch ({gate.first_check_epoch}) is after the last "
                             f"epoch (sft.epochs={self.sft.epochs})")
        trainer = self.trainer
        # with max_staleness k an engine may still have k published updates queued when the next
        # export rewrites the oldest slot, one more with the export overlapped (it starts a step's
        # export time earlier); simulated learners publish no files
        slots_needed = self.max_staleness + 1 + int(trainer.overlap_weight_export)
        if (self.rollout.engine == "vllm" and trainer.weight_sync_format == "shm"
                and trainer.weight_sync_shm_slots < slots_needed):
            raise ValueError(f"trainer.weight_sync_shm_slots ({trainer.weight_sync_shm_slots}) must be >= "
                             f"max_staleness + 1{' + 1 (overlap_weight_export)' if trainer.overlap_weight_export else ''}"
                             f" ({slots_needed}) with weight_sync_format=shm")
        return self

    def required_resources(self) -> dict[str, float]:
        """Logical CPUs / GPUs the run's actors reserve (each rollout worker owns a tool pool)."""
        rollout, tools, trainer = self.rollout, self.tools, self.trainer
        pooled = rollout.engine == "vllm" or self.simulation.tools == "pool"  # simulated: stub/inline tools
        required = {
            "CPU": rollout.num_workers * (rollout.num_cpus + pooled * tools.pool_size * tools.num_cpus_per_executor)
            + self.reward.num_cpus + trainer.num_learners * trainer.num_cpus_per_learner,
            "GPU": rollout.num_workers * rollout.num_gpus + trainer.num_learners * trainer.num_gpus_per_learner,
        }
        for name, amount in tools.resources.items():  # custom resources, e.g. tool_cpu (cluster/launch)
            if pooled and amount:
                required[name] = rollout.num_workers * tools.pool_size * amount
        return required


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending field."""


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(tree: dict, dotted: str) -> None:
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key.path=value")
    path, raw = dotted.split("=", 1)
    keys = path.strip().split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)  # "1e-6" -> float, "true" -> bool, "[1, 2]" -> list


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset shipped in cluster/configs (e.g. `tiny-cpu`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset (presets: {known})")


def load_config(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PixelRayConfig:
    """The YAML file (the tiny-cpu preset if none), then dotted overrides; validated once at the end."""
    tree: dict[str, Any] = {}
    config_file = config_file or DEFAULT_PRESET
    if config_file:
        loaded = yaml.safe_load(resolve_preset(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: the top level must be a mapping")
        tree = _deep_merge(tree, loaded)
    for override in overrides:
        _apply_override(tree, override)
    try:
        return PixelRayConfig.model_validate(tree)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None


def flatten(config: PixelRayConfig) -> dict[str, str]:
    """Dotted key -> value strings, e.g. for MLflow params."""
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = str(node)

    walk("", config.model_dump(mode="json"))
    return flat
