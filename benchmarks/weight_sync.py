"""Weight sync throughput: learner rank 0 -> engine (object store or shared-memory files), vs memcpy.

    .venv/bin/python -m benchmarks.weight_sync [--json FILE] [--size-gb 0.5] [--buckets 16,64,256,one]
                                               [--repeats 5] [--dtype float32] [--formats flat,direct,shm]
                                               [--shm-dir /dev/shm]

Workload: a synthetic state dict with the names and shapes of a Qwen2-1.5B-like language model
(24 layers; q/k/v with biases, o, gate/up/down, two norms per layer; embeddings, final norm, an
untied lm_head) with every dimension scaled so the whole is `--size-gb` (0.505 GB float32: hidden
448, intermediate 2432, vocab 41,152; 291 tensors from 256 B biases to 74 MB embeddings).

The three wire formats of actors/weight_sync.py are measured in the same run, against the same
memcpy samples (`--formats`): "flat" (pack each bucket into one uint8 buffer, then put it: two
copies), "direct" (put the bucket's tensors as a list of uint8 views: one copy) and "shm" (copy the
buckets into the next file of a ring of 2 shared-memory files under `--shm-dir`, kept mapped by
sender and receiver: one copy, on one thread like the learner's (`--shm-copy-threads` to split
it); no object store), at every bucket size of `--buckets`. ("direct" and "flat" copy with Ray's
own parallel memcpy inside `ray.put`.)

Two Ray actors on a private cluster (`address="local"`, own temp dir, no dashboard, shut down at
the end):
- sender (learner rank 0 stand-in) runs the learner's export, `actors.weight_sync.export_weights`:
  plan buckets, then per bucket: pack into the reusable staging buffer and `ray.put` ("flat"), one
  `ray.put` of the views ("direct"), or a copy into the slot file ("shm"); in the learner's
  environment (`trainer.nontemporal_copy_threshold_mb`: glibc's memcpy uses non-temporal stores from
  256 KB; `--glibc-default-copy` measures glibc's own threshold, the state before);
- receiver (engine stand-in) runs the engine's loader, `actors.weight_sync.reload_in_worker`, with a
  stand-in worker whose `reload_weights` consumes the iterator: every bucket fetched and decoded
  into zero-copy tensor views, i.e. engine-side tensors ready, the vLLM reload itself excluded.
  Mode "+copy" also copies every tensor into preallocated parameters (the least a real load does).

sync GB/s = payload bytes / wall time from the export call on the sender to the receiver's last
tensor ready (both calls issued by the driver, back to back). Columns: "pack ms" is the sender's
copy work ("flat": into the staging buffer; "direct": taking views, ~0; "shm": the one copy into
the slot file), "put ms" its `ray.put`s (0 for "shm"), "recv ms" the receiver's whole load. memcpy GB/s = `np.copyto` of the same
number of bytes between two preallocated, already touched arrays, in the sender actor, measured in
every repeat right before the syncs (the machine is shared: load average recorded). Reported:
median over `--repeats` after one warm-up round; ratio = median sync / median memcpy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import ray

from actors.weight_sync import MB, ShmWriter, StagingBuffer, export_weights, nontemporal_copy_env, reload_in_worker
from cluster.config import TrainerConfig

GOAL = 0.5  # sync GB/s >= GOAL x memcpy GB/s (issue 5)


def synthetic_shapes(size_gb: float, layers: int = 24, itemsize: int = 4) -> list[tuple[str, tuple[int, ...]]]:
    """Qwen2-1.5B proportions (hidden 1536, intermediate 8960, 2 KV heads of 128, vocab 151,936),
    every dimension scaled by one factor so the state dict is about `size_gb`."""

    def shapes(scale: float):
        def dim(value):
            return max(64, int(round(value * scale / 64)) * 64)

        hidden, inter, kv, vocab = dim(1536), dim(8960), dim(256), dim(151936)
        lm = "model.language_model"
        out = [(f"{lm}.embed_tokens.weight", (vocab, hidden))]
        for i in range(layers):
            p = f"{lm}.layers.{i}"
            out += [
                (f"{p}.input_layernorm.weight", (hidden,)),
                (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.q_proj.bias", (hidden,)),
                (f"{p}.self_attn.k_proj.weight", (kv, hidden)), (f"{p}.self_attn.k_proj.bias", (kv,)),
                (f"{p}.self_attn.v_proj.weight", (kv, hidden)), (f"{p}.self_attn.v_proj.bias", (kv,)),
                (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
                (f"{p}.post_attention_layernorm.weight", (hidden,)),
                (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
                (f"{p}.mlp.down_proj.weight", (hidden, inter)),
            ]
        out += [(f"{lm}.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
        return out

    def nbytes(scale: float) -> int:
        return sum(int(np.prod(s)) for _, s in shapes(scale)) * itemsize

    best = min(np.linspace(0.02, 1.0, 981), key=lambda scale: abs(nbytes(scale) - size_gb * 1e9))
    return shapes(float(best))


class _ConsumingWorker:
    """Stands in for the vLLM worker: `reload_weights` takes the iterator the engine gets."""

    def __init__(self, params: dict | None):
        self.params = params

    def reload_weights(self, weights_iterator, is_checkpoint_format: bool) -> None:
        if self.params is None:
            for _name, tensor in weights_iterator:
                assert tensor.numel() >= 0  # a view, nothing touched
        else:
            for name, tensor in weights_iterator:
                self.params[name].copy_(tensor)


@ray.remote(num_cpus=0)
class Sender:
    def __init__(self, shapes, dtype: str, shm_dir: str, shm_threads: int, seed: int = 0):
        import torch

        torch.set_num_threads(1)  # learner stand-in: the copies below are memcpy-bound anyway
        generator = torch.Generator().manual_seed(seed)
        self.named = [(name, torch.rand(shape, generator=generator).to(getattr(torch, dtype)))
                      for name, shape in shapes]
        self.nbytes = sum(t.numel() * t.element_size() for _, t in self.named)
        self.staging = StagingBuffer()
        self.shm = ShmWriter(shm_dir, slots=2, copy_threads=shm_threads)  # the learner's default ring
        self.src = np.ones(self.nbytes, dtype=np.uint8)
        self.dst = np.zeros(self.nbytes, dtype=np.uint8)

    def info(self) -> dict:
        return {"tensors": len(self.named), "bytes": self.nbytes, "pid": os.getpid()}

    def memcpy(self) -> float:
        """Seconds for one copy of the state dict's size between two warm arrays."""
        started = time.perf_counter()
        np.copyto(self.dst, self.src)
        return time.perf_counter() - started

    def memcpy_fresh(self) -> float:
        """Seconds for a copy into newly allocated memory (page faults included), for context."""
        started = time.perf_counter()
        copy = self.src.copy()
        elapsed = time.perf_counter() - started
        del copy
        return elapsed

    def export(self, bucket_bytes: int, version: int, wire: str):
        return export_weights(self.named, bucket_bytes, version, staging=self.staging, wire=wire, shm=self.shm)

    def close(self) -> str:
        self.shm.close()
        return self.shm.directory


@ray.remote(num_cpus=0)
class Receiver:
    def __init__(self, shapes, dtype: str):
        import torch

        torch.set_num_threads(1)
        self.params = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, shape in shapes}

    def receive(self, update, copy: bool) -> dict:
        started = time.perf_counter()
        report = reload_in_worker(_ConsumingWorker(self.params if copy else None), update)
        report["receive_s"] = time.perf_counter() - started
        return report

    def checksum(self, names: list[str]) -> list[float]:
        return [float(self.params[n].double().sum()) for n in names]


def _load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--size-gb", type=float, default=0.5)
    parser.add_argument("--buckets", default="16,64,256,one", help="bucket sizes in MB; 'one' = a single bucket")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--formats", default="flat,direct,shm", help="wire formats (actors/weight_sync.py)")
    parser.add_argument("--shm-dir", default="/dev/shm", help='where the "shm" format writes its files')
    parser.add_argument("--shm-copy-threads", type=int, default=1, help='"shm" copy threads (the learner uses 1)')
    parser.add_argument("--nontemporal-copy-threshold-mb", type=float,
                        default=TrainerConfig().nontemporal_copy_threshold_mb,
                        help="the sender's glibc non-temporal memcpy threshold (the learner's default)")
    parser.add_argument("--glibc-default-copy", action="store_true",
                        help="the sender keeps glibc's own non-temporal threshold (the baseline before tuning)")
    parser.add_argument("--no-copy-mode", action="store_true", help="skip the '+copy into parameters' rows")
    args = parser.parse_args(argv)

    itemsize = 4 if args.dtype == "float32" else 2
    shapes = synthetic_shapes(args.size_gb, itemsize=itemsize)
    sizes: list[tuple[str, int]] = []
    for token in args.buckets.split(","):
        token = token.strip()
        sizes.append(("one", 1 << 62) if token == "one" else (f"{token} MB", int(float(token) * MB)))
    modes = [False] if args.no_copy_mode else [False, True]
    formats = [f.strip() for f in args.formats.split(",")]

    temp_dir = tempfile.mkdtemp(prefix="wsb-", dir="/tmp")  # short: unix socket paths are limited
    ray.init(address="local", include_dashboard=False, _temp_dir=temp_dir, num_cpus=2,
             object_store_memory=2 * 1024**3, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        started = time.perf_counter()
        # the sender runs with the learner's memcpy tuning (trainer.nontemporal_copy_threshold_mb)
        copy_env = nontemporal_copy_env(None if args.glibc_default_copy else args.nontemporal_copy_threshold_mb)
        sender = Sender.options(runtime_env={"env_vars": copy_env}).remote(
            shapes, args.dtype, args.shm_dir, args.shm_copy_threads)
        receiver = Receiver.remote(shapes, args.dtype)
        info = ray.get(sender.info.remote())
        ray.get(receiver.checksum.remote([]))
        print(f"state dict: {info['tensors']} tensors, {info['bytes'] / 1e9:.3f} GB {args.dtype} "
              f"(actors up in {time.perf_counter() - started:.1f} s); load average {_load():.1f}", file=sys.stderr)

        # correctness once: the receiver's parameters equal the sender's after a multi-bucket sync
        check_names = [shapes[0][0], shapes[len(shapes) // 2][0], shapes[-1][0]]
        for wire in formats:
            update = ray.get(sender.export.remote(16 * MB, 0, wire))
            ray.get(receiver.receive.remote(update, True))
            sent = {name: float(t.double().sum()) for name, t in update.tensors() if name in check_names}
            assert ray.get(receiver.checksum.remote(check_names)) == [sent[n] for n in check_names]
            ray.get(receiver.receive.remote(update, True))
            del update

        samples: dict[str, list] = {"memcpy": [], "memcpy_fresh": []}
        details: dict[str, list] = {}
        loads = []
        for repeat in range(-1, args.repeats):  # -1: warm-up (object-store pages, staging buffer)
            memcpy_s = statistics.median(ray.get(sender.memcpy.remote()) for _ in range(3))
            fresh_s = ray.get(sender.memcpy_fresh.remote())
            if repeat >= 0:
                samples["memcpy"].append(info["bytes"] / memcpy_s / 1e9)
                samples["memcpy_fresh"].append(info["bytes"] / fresh_s / 1e9)
                loads.append(_load())
            for wire, copy, (label, bucket_bytes) in [(w, c, s) for w in formats for c in modes for s in sizes]:
                key = f"{wire} {label}{' +copy' if copy else ''}"
                begun = time.perf_counter()
                update = ray.get(sender.export.remote(bucket_bytes, repeat, wire))
                report = ray.get(receiver.receive.remote(update, copy))
                elapsed = time.perf_counter() - begun
                if repeat < 0:
                    del update
                    continue
                samples.setdefault(key, []).append(update.nbytes / elapsed / 1e9)
                details.setdefault(key, []).append({
                    "sync_s": elapsed, "export_s": update.export_s, "pack_s": update.stats["pack_s"],
                    "put_s": update.stats["put_s"], "receive_s": report["receive_s"],
                    "fetch_s": report["fetch_s"], "buckets": len(update.buckets),
                    "sender_faults_per_page": update.stats["minor_faults"] / (update.nbytes / 4096),
                    "receiver_faults_per_page": report["minor_faults"] / (update.nbytes / 4096),
                })
                del update
            print(f"repeat {repeat}: done (load {_load():.1f})", file=sys.stderr)
        shm_dir = ray.get(sender.close.remote())
        assert not os.path.exists(shm_dir), f"{shm_dir} left behind"
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

    memcpy = statistics.median(samples["memcpy"])
    rows = []
    for key, values in samples.items():
        if key.startswith("memcpy"):
            continue
        d = details[key]
        rows.append({
            "bucket": key, "buckets": d[0]["buckets"], "gb_per_s": statistics.median(values),
            "best_gb_per_s": max(values), "ratio_to_memcpy": statistics.median(values) / memcpy,
            **{f"{k}_ms": 1e3 * statistics.median(x[k] for x in d)
               for k in ("sync_s", "export_s", "pack_s", "put_s", "receive_s", "fetch_s")},
            **{k: statistics.median(x[k] for x in d) for k in ("sender_faults_per_page", "receiver_faults_per_page")},
        })

    print(f"\nweight sync, {info['bytes'] / 1e9:.3f} GB {args.dtype} ({info['tensors']} tensors), "
          f"median of {args.repeats}; load average {statistics.mean(loads):.1f} on {os.cpu_count()} cores")
    print(f"sender environment (the learner's): {copy_env or 'glibc defaults'}")
    print(f"memcpy (warm): {memcpy:.2f} GB/s   memcpy into fresh memory: "
          f"{statistics.median(samples['memcpy_fresh']):.2f} GB/s   goal: sync >= {GOAL} x memcpy")
    header = (f"{'format bucket':>20} {'n':>4} {'GB/s':>6} {'best':>6} {'x memcpy':>8} {'sync ms':>8} "
              f"{'pack ms':>8} {'put ms':>7} {'recv ms':>8} {'faults/page s/r':>15}")
    print(header)
    for r in rows:
        print(f"{r['bucket']:>20} {r['buckets']:>4} {r['gb_per_s']:>6.2f} {r['best_gb_per_s']:>6.2f} "
              f"{r['ratio_to_memcpy']:>8.2f} {r['sync_s_ms']:>8.0f} {r['pack_s_ms']:>8.0f} {r['put_s_ms']:>7.0f} "
              f"{r['receive_s_ms']:>8.0f} {r['sender_faults_per_page']:>7.2f}/{r['receiver_faults_per_page']:.2f}")
    met = [r["bucket"] for r in rows if r["ratio_to_memcpy"] >= GOAL]
    print(f"goal met by: {', '.join(met) if met else 'none'}")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "state_dict": {"bytes": info["bytes"], "tensors": info["tensors"], "dtype": args.dtype},
            "memcpy_gb_per_s": memcpy, "memcpy_samples": samples["memcpy"],
            "memcpy_fresh_gb_per_s": statistics.median(samples["memcpy_fresh"]),
            "goal_ratio": GOAL, "sender_env": copy_env, "rows": rows, "samples": {k: v for k, v in samples.items()},
            "details": details, "repeats": args.repeats, "load_average": loads, "cpus": os.cpu_count(),
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
