"""Learner group: N DeepSpeed actors (gloo on CPU, NCCL on GPU) training the policy with PPO-clip.

Each step every rank runs the same number of micro-batches (DeepSpeed's fixed gradient
accumulation, and under ZeRO-3 every rank must join every gather); a rank with fewer samples pads
with a filler sample whose loss mask is zero. The loss is a token-level mean over the assistant
tokens of the whole global batch.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.learner_inbox import ShareInbox
from actors.weight_sync import nontemporal_copy_env
from policies.batching import TrainSample, collate, mini_batch_count, mini_batches, token_logprobs
from policies.losses import micro_batch_policy_loss


def deepspeed_config(trainer, gradient_accumulation_steps: int, device: str,
                     scheduler: dict[str, Any] | None = None) -> dict[str, Any]:
    """DeepSpeed JSON config from the trainer section; `trainer.deepspeed` is merged on top.

    `scheduler` is a DeepSpeed "scheduler" entry (e.g. `cosine_schedule(...)`, used by SFT); none
    by default (RL keeps a constant lr)."""
    from cluster.config import _deep_merge

    zero: dict[str, Any] = {"stage": trainer.zero_stage}
    if trainer.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # shard even tiny parameters
    optimizer_params: dict[str, Any] = {"lr": trainer.lr, "weight_decay": trainer.weight_decay}
    if device == "cpu":
        optimizer_params["torch_adam"] = True  # FusedAdam is CUDA-only (it would JIT-compile ~100 s)
    config = {
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": trainer.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": trainer.dtype == "bfloat16"},
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scheduler is not None:
        config["scheduler"] = scheduler
    return _deep_merge(config, trainer.deepspeed)


def cosine_schedule(total_steps: int, warmup_ratio: float = 0.1, min_lr_ratio: float = 0.0) -> dict[str, Any]:
    """DeepSpeed's WarmupCosineLR entry: linear warmup over `warmup_ratio` of the optimizer steps
    (W of them, at least 2 as DeepSpeed demands; from lr / (W + 1) up, so no step is wasted at
    lr 0), then cosine decay to `min_lr_ratio` x lr. DeepSpeed steps it once per optimizer step;
    `Learner.setup` steps it once at the start, out of its pre-start state (lr 0)."""
    total_steps = max(1, int(total_steps))
    warmup = max(2, round(warmup_ratio * total_steps))
    return {"type": "WarmupCosineLR", "params": {
        "total_num_steps": total_steps + 1,  # the last step runs just before the floor, not at it
        "warmup_num_steps": warmup,
        "warmup_min_ratio": 1.0 / (warmup + 1),
        "warmup_type": "linear",
        "cos_min_ratio": min_lr_ratio,
    }}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm name of DeepSpeed's CPU shared-memory allreduce workspace.

    On the CPU accelerator, `init_distributed` creates
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (69 MB) and never
    removes it, so every learner start leaked 69 MB of RAM (14 GB here over a few days). Each rank
    maps every other rank's workspace inside `init_distributed`, so after a barrier the names are no
    longer needed; the mappings, and the memory, live until the processes exit."""
    import torch.distributed as dist

    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                               f"{os.environ['MASTER_PORT']}_{rank}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    path.unlink(missing_ok=True)


@ray.remote
class Learner(ShareInbox):
    def rendezvous(self) -> tuple[str, int]:
        """Address for the process group (called on rank 0)."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, model_path: str, trainer, temperature: float, device: str, rank: int, world_size: int,
              master: tuple[str, int], gradient_accumulation_steps: int,
              scheduler: dict[str, Any] | None = None) -> dict:
        import deepspeed
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        started = time.perf_counter()
        self._export_idle = threading.Event()  # cleared while an export reads the parameters
        self._export_idle.set()
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_SIZE="1")
        self.rank, self.world_size, self.trainer, self.temperature = rank, world_size, trainer, temperature
        self.gradient_accumulation_steps = gradient_accumulation_steps
        if trainer.torch_threads:
            torch.set_num_threads(trainer.torch_threads)
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        _unlink_shm_allreduce_buffer(rank)
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32)
        if trainer.freeze_vision_tower:
            for name, parameter in model.named_parameters():
                if ".visual." in f".{name}":
                    parameter.requires_grad_(False)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(trainer, gradient_accumulation_steps, device, scheduler),
        )
        if scheduler is not None and self.engine.lr_scheduler is not None:
            self.engine.lr_scheduler.step()  # leave the pre-start state, where DeepSpeed's schedules give lr 0
        # The frozen initial policy for the KL term: replicated on every rank (not sharded).
        self.reference = None
        if trainer.kl_coef:
            self.reference = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()
            self.reference.requires_grad_(False)
        self.image_processor = AutoImageProcessor.from_pretrained(model_path)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = tokenizer.pad_token_id
        return {"rank": rank, "setup_s": time.perf_counter() - started, "backend": torch.distributed.get_backend()}

    def train_step(self, samples: list[TrainSample], filler: TrainSample, global_tokens: int) -> dict:
        """One optimizer step on this rank's share; returns sums the driver adds up across ranks."""
        import torch

        started = time.perf_counter()
        self.engine.train()
        micro = self.trainer.micro_batch_size
        totals: dict[str, float] = {}
        tokens_per_rank = max(global_tokens, 1) / self.world_size  # DeepSpeed averages over ranks
        dtype = next(self.engine.module.parameters()).dtype
        for index in range(self.gradient_accumulation_steps):
            chunk = samples[index * micro:(index + 1) * micro] or [filler]
            batch, logits = self._forward(chunk, dtype)
            logprobs = token_logprobs(logits, batch.targets, self.temperature)
            reference = None
            if self.reference is not None:
                reference_inputs = dict(batch.inputs)  # the reference stays in float32
                with torch.no_grad():
                    reference_logits = self.reference(**reference_inputs).logits
                reference = token_logprobs(reference_logits, batch.targets, self.temperature)
            loss, sums = micro_batch_policy_loss(logprobs, batch.old_logprobs, batch.advantages, batch.loss_mask,
                                                 self.trainer, reference)
            self.engine.backward(loss / tokens_per_rank, scale_wrt_gas=False)
            if index == 0:  # an overlapped export may still be reading the weights this step updates
                self._export_idle.wait()
            self.engine.step()
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["optimizer_step"] = float(self.engine.global_steps)  # this rank's optimizer steps so far
        totals["train_s"] = time.perf_counter() - started
        return totals

    def _forward(self, chunk: list[TrainSample], dtype):
        """The micro-batch of `chunk` and the training engine's logits on it (pixels in the model's dtype)."""
        batch = collate(chunk, self.image_processor, self.image_pad_id, self.pad_id)
        inputs = dict(batch.inputs)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        return batch, self.engine(**inputs).logits

    def sft_step(self, samples: list[TrainSample], filler: TrainSample, global_tokens: int) -> dict:
        """One optimizer step of supervised fine-tuning on this rank's share: token-level
        cross-entropy on the loss-mask tokens, averaged over the `global_tokens` of the whole
        global batch (micro-batches and filler as in `train_step`); returns sums."""
        import torch

        started = time.perf_counter()
        self.engine.train()
        micro = self.trainer.micro_batch_size
        totals = {"nll_sum": 0.0, "tokens": 0.0, "correct_tokens": 0.0}
        tokens_per_rank = max(global_tokens, 1) / self.world_size  # DeepSpeed averages over ranks
        dtype = next(self.engine.module.parameters()).dtype
        lr = self.engine.get_lr()[0]  # the lr this step runs at
        for index in range(self.gradient_accumulation_steps):
            chunk = samples[index * micro:(index + 1) * micro] or [filler]
            batch, logits = self._forward(chunk, dtype)
            logprobs = token_logprobs(logits, batch.targets)  # temperature 1: the data's distribution
            nll = -(logprobs * batch.loss_mask).sum()
            self.engine.backward(nll / tokens_per_rank, scale_wrt_gas=False)
            if index == 0:
                self._export_idle.wait()
            self.engine.step()
            with torch.no_grad():
                hits = (logits[:, :-1].argmax(-1) == batch.targets).float() * batch.loss_mask
            totals["nll_sum"] += float(nll.detach())
            totals["tokens"] += float(batch.loss_mask.sum())
            totals["correct_tokens"] += float(hits.sum())
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        totals["lr"] = float(lr)
        totals["train_s"] = time.perf_counter() - started
        return totals

    def save_hf(self, hf_dir: str) -> None:
        """HF safetensors only (gathered on rank 0; every rank must call under ZeRO-3): a model to
        start from, without the optimizer state `save_checkpoint` adds."""
        import deepspeed

        module = self.engine.module
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.trainer.zero_stage == 3 else _nullcontext())
        with gather:
            state = ({k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
                     if self.rank == 0 else None)
        if state is not None:
            module.save_pretrained(hf_dir, state_dict=state, safe_serialization=True)

    def local_parameter_count(self) -> int:
        """Elements this rank holds (its shard under ZeRO-3, everything otherwise)."""
        return sum(getattr(p, "ds_tensor", p).numel() for p in self.engine.module.parameters())

    def export_weights(self, version: int | None = None):
        """The full weights as a `WeightUpdate` of object-store buckets on rank 0 (None elsewhere).

        Every rank must call it under ZeRO-3: each bucket's parameters are gathered on all ranks
        (one `GatheredParameters` per bucket of `trainer.weight_sync_bucket_mb`, so at most one
        bucket is materialised at a time) and rank 0 packs and puts it (actors/weight_sync.py), or
        with `weight_sync_format` "shm" writes it into its ring of shared-memory files.
        Tensors keep their raw bits: bf16 stays bf16.
        """
        self._export_idle.wait()  # one export at a time (the staging buffer and shm ring are shared)
        self._export_idle.clear()
        try:
            return self._export(version)
        finally:
            self._export_idle.set()

    def _export(self, version: int | None):
        import deepspeed

        from actors.weight_sync import MB, ShmWriter, StagingBuffer, export_weights

        named = list(self.engine.module.state_dict(keep_vars=True).items())  # ZeRO-3: the parameters

        def full_shape(tensor):
            return tuple(tensor.ds_shape) if hasattr(tensor, "ds_shape") else tuple(tensor.shape)

        def gather(tensors):
            unique = list({id(t): t for t in tensors if hasattr(t, "ds_id")}.values())  # tied weights once
            return deepspeed.zero.GatheredParameters(unique, modifier_rank=None)

        if getattr(self, "_staging", None) is None:
            self._staging = StagingBuffer()  # kept warm between syncs
        wire = self.trainer.weight_sync_format
        if wire == "shm" and self.rank == 0 and getattr(self, "_shm", None) is None:
            self._shm = ShmWriter(self.trainer.weight_sync_shm_dir, self.trainer.weight_sync_shm_slots)
        return export_weights(named, int(self.trainer.weight_sync_bucket_mb * MB), version,
                              full_shape=full_shape, gather=gather if self.trainer.zero_stage == 3 else None,
                              publish=self.rank == 0, staging=self._staging, wire=wire,
                              shm=getattr(self, "_shm", None))

    def close_weight_sync(self) -> None:
        """Delete this rank's shared-memory weight files ("shm"); called before the actor is killed."""
        if getattr(self, "_export_idle", None) is not None:
            self._export_idle.wait(timeout=30)  # not under an overlapped export still writing them
        if getattr(self, "_shm", None) is not None:
            self._shm.close()
            self._shm = None

    def save_checkpoint(self, deepspeed_dir: str, hf_dir: str) -> None:
        """DeepSpeed state (every rank writes its shard) and HF safetensors (gathered, rank 0).

        All ranks must write to the same (shared) folder.
        """
        self.engine.save_checkpoint(deepspeed_dir, tag="state")
        self.save_hf(hf_dir)

    def load_checkpoint(self, deepspeed_dir: str) -> None:
        self._export_idle.wait()  # loading rewrites the weights an overlapped export may be reading
        path, _ = self.engine.load_checkpoint(deepspeed_dir, tag="state")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {deepspeed_dir}")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def learner_bundles(trainer) -> list[dict[str, float]]:
    """One placement-group bundle per learner rank: its CPUs and GPUs (zero amounts left out, as
    Ray rejects all-zero bundles)."""
    bundle = {name: float(amount) for name, amount in
              (("CPU", trainer.num_cpus_per_learner), ("GPU", trainer.num_gpus_per_learner)) if amount > 0}
    if not bundle:
        raise ValueError("trainer.placement_strategy needs num_cpus_per_learner or num_gpus_per_learner > 0")
    return [dict(bundle) for _ in range(trainer.num_learners)]


def learner_actor_options(trainer, placement_group=None, rank: int = 0) -> dict[str, Any]:
    """Ray options of learner `rank`: its CPUs / GPUs, its memcpy tuning for weight export, and, with a
    placement group, its own bundle."""
    options: dict[str, Any] = {"num_cpus": trainer.num_cpus_per_learner, "num_gpus": trainer.num_gpus_per_learner}
    # threaded: the next step's shares arrive (`receive`) beside the running step, and an overlapped
    # export runs beside it too
    options["max_concurrency"] = 3 if trainer.overlap_weight_export else 2
    copy_env = nontemporal_copy_env(trainer.nontemporal_copy_threshold_mb)
    if copy_env:  # merged by Ray over the job's environment
        options["runtime_env"] = {"env_vars": copy_env}
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=rank)
    return options


def reserve_learner_placement(trainer, wait_log_s: float = 60.0):
    """The learners' placement group (`trainer.placement_strategy`), once every bundle is reserved;
    None when no strategy is set. An autoscaling cluster may need minutes to start the nodes: the wait
    logs what it is waiting for rather than hanging silently."""
    if getattr(trainer, "placement_strategy", None) is None:
        return None
    from ray.util.placement_group import placement_group

    bundles = learner_bundles(trainer)
    group = placement_group(bundles, strategy=trainer.placement_strategy)
    ready = group.ready()
    waited = 0.0
    while not ray.wait([ready], timeout=wait_log_s)[0]:
        waited += wait_log_s
        logging.getLogger(__name__).warning(
            "waiting %.0f s for the learners' placement group (%d x %s, %s): is the cluster scaling up, or "
            "can no node type hold it?", waited, len(bundles), bundles[0], trainer.placement_strategy)
    return group


class LearnerGroup:
    """Driver-side handle: creates the actors, splits each batch across ranks, exports weights."""

    def __init__(self, model_path: str, trainer, temperature: float, device: str, samples_per_step: int,
                 scheduler: dict[str, Any] | None = None, updates_per_step: int = 1):
        """`train` makes `updates_per_step` optimizer steps of samples_per_step / updates_per_step
        samples each (`sft`: one step on `samples_per_step`)."""
        self.trainer = trainer
        world = trainer.num_learners
        self.updates_per_step = updates_per_step
        self.samples_per_step = samples_per_step
        self.gradient_accumulation_steps = trainer.gradient_accumulation_steps(samples_per_step, updates_per_step)
        self.placement_group = reserve_learner_placement(trainer)  # None: no placement group (default)
        self.actors = [Learner.options(**learner_actor_options(trainer, self.placement_group, rank)).remote()
                       for rank in range(world)]
        master = ray.get(self.actors[0].rendezvous.remote())
        self.setup_info = ray.get([
            actor.setup.remote(model_path, trainer, temperature, device, rank, world, master,
                               self.gradient_accumulation_steps, scheduler)
            for rank, actor in enumerate(self.actors)
        ])

    def _run_on_ranks(self, method: str, samples: list[TrainSample]) -> tuple[list[dict], int]:
        """Split `samples` across ranks and run one optimizer step (`train_step` or `sft_step`)."""
        return self._call_ranks(method, self._split(samples))

    def _split(self, samples: list[TrainSample]) -> tuple[list[list[TrainSample]], TrainSample, int]:
        """One optimizer step's samples as (share per rank, zero-weight filler, global loss tokens)."""
        if not samples:
            raise ValueError("a learner step needs at least one sample")
        world = len(self.actors)
        capacity = self.gradient_accumulation_steps * self.trainer.micro_batch_size
        shares = [samples[rank::world] for rank in range(world)]
        if max(len(s) for s in shares) > capacity:
            raise ValueError(f"{len(samples)} samples exceed {world} ranks x {capacity} per step")
        return shares, _zero_weight_copy(samples[0]), sum(s.num_trained_tokens for s in samples)

    def _call_ranks(self, method: str, split) -> tuple[list[dict], int]:
        shares, filler, global_tokens = split
        results = ray.get([
            getattr(actor, method).remote(share, filler, global_tokens) for actor, share in zip(self.actors, shares)
        ])
        return results, sum(r["tokens"] for r in results)

    def stage(self, samples: list[TrainSample]) -> "StagedBatch":
        """`train`'s input delivered ahead: split into its mini-batches and rank shares, each sent to
        its learner (`ShareInbox.receive`). The pipeline stages the next step's samples while the
        learners train the current one, so neither the driver's pickling nor the learners' fetch
        and unpickling of a share is on the serial learner stage."""
        steps = []
        count = mini_batch_count(len(samples), self.samples_per_step, self.updates_per_step, self.trainer.fixed_mini_batch)
        for batch in mini_batches(samples, count):
            shares, filler, global_tokens = self._split(batch)
            key, filler_ref = next(_STAGE_KEYS), ray.put(filler)
            deliveries = [actor.receive.remote(key, share, filler_ref) for actor, share in zip(self.actors, shares)]
            steps.append(StagedStep(key, deliveries, global_tokens))
        return StagedBatch(steps, len(samples))

    def train(self, samples: "list[TrainSample] | StagedBatch") -> dict[str, float]:
        """`updates_per_step` optimizer steps, one per mini-batch of `samples` (or of the staged
        batch); metrics are token means over all of them (grad_norm: the mean of the steps')."""
        if not isinstance(samples, StagedBatch):
            samples = self.stage(samples)
        results, tokens, grad_norms, train_s = [], 0, [], 0.0
        for number, staged in enumerate(samples.steps):
            ray.get(staged.deliveries)  # long done, normally; a failed delivery raises here
            batch_results = ray.get([actor.train_received.remote(staged.key, staged.global_tokens)
                                     for actor in self.actors])
            batch_tokens = sum(r["tokens"] for r in batch_results)
            if number == 0:  # the step waited for a started export: it is done, surface its error
                self.finish_exports()
            results += batch_results
            tokens += batch_tokens
            grad_norms.append(batch_results[0]["grad_norm"])
            train_s += max(r["train_s"] for r in batch_results)

        def token_mean(key: str) -> float:
            return sum(r.get(key, 0.0) for r in results) / max(tokens, 1)

        metrics = {
            "loss": token_mean("loss_sum"),
            "policy_loss": token_mean("policy_loss_sum"),
            "clip_fraction": token_mean("clipped_tokens"),
            "importance_ratio": token_mean("ratio_sum"),
            "logprob_mismatch": token_mean("mismatch_sum"),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "optimizer_steps": len(grad_norms),
            "optimizer_step": max(r.get("optimizer_step", 0.0) for r in results),  # the learners' count so far
            "trained_tokens": tokens,
            "train_s": train_s,
        }
        if self.trainer.importance_cap is not None:
            metrics["importance_weight"] = token_mean("importance_weight_sum")
            metrics["importance_capped_fraction"] = token_mean("importance_capped_tokens")
        if self.trainer.kl_coef:
            metrics["kl"] = token_mean("kl_sum")
        return metrics

    def sft(self, samples: list[TrainSample]) -> dict[str, float]:
        """One supervised optimizer step on `samples` (split across ranks like `train`)."""
        results, tokens = self._run_on_ranks("sft_step", samples)
        self.finish_exports()
        return {
            "loss": sum(r["nll_sum"] for r in results) / max(tokens, 1),
            "token_accuracy": sum(r["correct_tokens"] for r in results) / max(tokens, 1),
            "grad_norm": results[0]["grad_norm"],
            "lr": results[0]["lr"],
            "trained_tokens": tokens,
            "train_s": max(r["train_s"] for r in results),
        }

    def save_hf(self, hf_dir: str) -> None:
        self.finish_exports()
        ray.get([actor.save_hf.remote(hf_dir) for actor in self.actors])

    def export_weights(self, version: int | None = None):
        """The full weights, bucketed in the object store, stamped with `version` (a `WeightUpdate`
        from rank 0; pass it to `RolloutWorker.update_weights`)."""
        self.finish_exports()
        updates = ray.get([actor.export_weights.remote(version) for actor in self.actors])
        return updates[0]

    def start_export(self, version: int | None = None):
        """Start exporting the weights and return at once: the future of rank 0's `WeightUpdate`
        (Ray resolves it before a `update_weights` call that takes it runs). Needs
        `trainer.overlap_weight_export` (learners with a second thread), else the next step would
        queue behind the export anyway. The next `train` starts at once and waits for the export
        only before its first optimizer update."""
        if not self.trainer.overlap_weight_export:
            raise ValueError("start_export needs trainer.overlap_weight_export")
        self._exports = [actor.export_weights.remote(version) for actor in self.actors]
        return self._exports[0]

    def finish_exports(self) -> None:
        """Wait for a started export on every rank (raises its error, if it failed)."""
        exports, self._exports = getattr(self, "_exports", []), []
        ray.get(exports)

    def save_checkpoint(self, deepspeed_dir: str, hf_dir: str) -> None:
        self.finish_exports()
        ray.get([actor.save_checkpoint.remote(deepspeed_dir, hf_dir) for actor in self.actors])

    def load_checkpoint(self, deepspeed_dir: str) -> None:
        self.finish_exports()
        ray.get([actor.load_checkpoint.remote(deepspeed_dir) for actor in self.actors])

    def shutdown(self) -> None:
        try:  # "shm" files must not outlive the run; ray.kill gives the actor no chance to clean up
            ray.get([actor.close_weight_sync.remote() for actor in self.actors], timeout=30)
        except Exception as error:  # noqa: BLE001 - a dead learner: the next ShmWriter sweeps its files
            logging.getLogger(__name__).warning("closing weight sync files failed: %s", error)
        for actor in self.actors:
            ray.kill(actor)
        if getattr(self, "placement_group", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


_STAGE_KEYS = itertools.count()  # names a staged step in the learners' inboxes


@dataclass
class StagedStep:
    """One optimizer step's shares, delivered to the learners' inboxes under `key`."""

    key: int
    deliveries: list  # each rank's `receive` future
    global_tokens: int


@dataclass
class StagedBatch:
    """`LearnerGroup.stage`'s output: its optimizer steps; `size`: the samples in all of them."""

    steps: list[StagedStep]
    size: int

    def __len__(self) -> int:
        return self.size


def _zero_weight_copy(sample: TrainSample) -> TrainSample:
    return TrainSample(sample.token_ids, [0] * len(sample.loss_mask), sample.behaviour_logprobs, sample.images, 0.0)
