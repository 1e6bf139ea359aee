"""Versioned, bucketed weight sync: learner rank 0 -> every rollout engine, without restarts.

CPU path (built, the one that runs here)
----------------------------------------
- Learner rank 0 walks the model's state dict in order and cuts it into buckets of at most
  `trainer.weight_sync_bucket_mb` (a tensor larger than that travels alone in its own bucket).
  Under ZeRO-3 every rank joins one `GatheredParameters` per bucket, so at most one bucket of
  full parameters is materialised at a time, and rank 0 packs it.
- A bucket is ONE object-store put (or one range of a shared-memory file) plus a small layout
  `(name, dtype, shape, offset, nbytes)` per tensor; raw bits (bf16 stays bf16, never widened).
  Three wire formats (`trainer.weight_sync_format`):
  - "flat": one contiguous `numpy.uint8` buffer, each tensor at a 64-byte aligned offset, packed
    through a staging buffer the learner keeps warm between syncs. Two host copies on rank 0 (pack,
    then the put's copy into shared memory), so it can reach at most half of memcpy; it is the
    layout the GPU design broadcasts.
  - "direct": the bucket's tensors as a list of uint8 views (no pack); Ray writes them back to back
    into ONE object (pickle-5 out-of-band buffers, aligned), one host copy.
  - "shm" (opt-in; SAME NODE ONLY): no object store. Rank 0 owns a `ShmWriter`, a
    ring of `trainer.weight_sync_shm_slots` (default 2) files in its own directory
    `<weight_sync_shm_dir>/pixelray-ws-<host>-<pid>-<uuid>/` (default dir /dev/shm; unique per
    process and run, so two runs on a host never collide). An export writes all its buckets back to
    back into the next slot file, each laid out exactly like a "flat" bucket (64-byte aligned
    tensors, `bucket_layout`), copying straight from the (gathered) tensors: one host copy. The
    writer keeps its slots mapped and rewrites them in place, so after the first `slots` exports no
    page is allocated or faulted; a slot grows (is re-created under a new name) when an export
    outgrows it. Buckets travel as `ShmBucket(path, offset, nbytes, token)`; the engine maps each
    slot file read-only once (`ShmMaps`, kept by the worker process across syncs; a mapping whose
    file was deleted or replaced is dropped at the next load, and until then keeps that memory) and
    yields zero-copy views into it, like the other formats.
    Lifetime: an export is readable until `slots` later exports rewrite its slot. With
    `max_staleness` k > 0 the driver does not wait for the engines before the next export, and up
    to k published updates can still be queued on an engine then, so the config requires
    `slots >= max_staleness + 1` (k = 0: every engine loads before the next export). The slot
    header carries the export's token; the engine checks it at every bucket and after its load, so
    a violated bound fails the load loudly instead of serving mixed weights. The files are deleted
    by `ShmWriter.close()` (`LearnerGroup.shutdown` calls `Learner.close_weight_sync` before
    `ray.kill`), by a finalizer at a normal process exit, and, after a crash or SIGKILL, by the next
    `ShmWriter` on the host (`sweep_stale_shm`: directories of this host whose pid is dead). Cost:
    `slots` x the state dict in /dev/shm. Same node: an engine must share learner rank 0's /dev/shm;
    `accept_update` compares Ray node ids and refuses an update from another node (and a missing file
    raises a clear error); there is no automatic fallback: use "direct" across nodes (the
    qwen2.5-vl-7b preset does).
  Every format reads the bucket zero-copy on the engine (views into shared memory).
  Measured (benchmarks/weight_sync.py, 0.505 GB fp32, 291 tensors, median of 5, every format
  against the same memcpy in the same run; 2 cores, load average 1.5; memcpy 12.2 GB/s): "shm"
  0.53 / 0.58 / 0.60 / 0.61x memcpy at 16 / 64 / 256 MB / one bucket, "direct" 0.32 / 0.44 / 0.50 /
  0.53x, "flat" 0.25-0.39x; a second run (memcpy 10.6 GB/s): "shm" 0.59-0.65x, "direct"
  0.34-0.49x. The engine side of "shm" is ~2 ms (mapping reused); the export's one copy is the
  cost (54 ms of the 69 ms at 256 MB; the rest is the two driver->actor calls). That
  copy ran at half of memcpy (0.44-0.45x for "shm" in the same session) until the learners got the
  glibc tunable of `nontemporal_copy_env`: this VM reports a 480 MiB L3, so glibc used cached
  stores (read-for-ownership) for every copy below ~360 MB, i.e. every tensor, while the baseline's
  single 0.5 GB memcpy used non-temporal ones. Under load (other jobs on the 2 cores) every format
  drops well below this (0.23-0.58x at load average 12-41 before the tunable).
- `WeightUpdate` = version + bucket references + layouts (a few KB). The driver passes it to every
  engine; the references are nested in it, so they travel as references and each engine fetches
  the buckets itself (same node: a zero-copy read of shared memory; another node: one transfer).
- Engine side (`reload_in_worker`, run inside the vLLM worker through `collective_rpc`): ONE call
  to vLLM's `reload_weights(weights_iterator=..., is_checkpoint_format=True)` with a generator that
  fetches bucket after bucket lazily and yields zero-copy tensor views into it. It must be one call
  (vllm 0.32, model_executor/model_loader/reload/): `reload_weights` wraps every layer's weight
  loaders (`initialize_layerwise_reload`), runs `model.load_weights(iterator)`, then
  `finalize_layerwise_reload` processes every layer that did not receive all its elements. Calling
  it per bucket would re-wrap the whole model each time and, worse, finalise a fused layer whose
  checkpoint tensors straddle a bucket boundary (q/k/v -> qkv_proj, gate/up -> gate_up_proj) from a
  freshly materialised tensor holding only part of the weights. The lazy generator keeps the
  engine's extra memory at the buckets still referenced (vLLM buffers a layer's tensors until the
  layer is complete, then copies and repacks them into the kernel tensors).
- After the reload: prefix cache and encoder cache reset once (`VLLMEngine.load_weights`); the
  engine then records the version it serves.

GPU design (NOT built: no GPU here)
-----------------------------------
The object store costs three host copies (device->host, host->plasma, plasma->device) and PCIe
twice; on GPUs the same buckets go over NCCL instead, with the same layouts and the same loader:
- At startup the driver forms a dedicated process group "weight_sync": learner rank 0 is rank 0,
  then every TP worker of every engine (world = 1 + engines x TP). It must not be the learners'
  default group nor vLLM's TP group, so it is built with its own TCP store (vLLM's
  `StatelessProcessGroup` + `PyNcclCommunicator`, initialised in each worker via `collective_rpc`).
  An engine that restarts re-joins by rebuilding the group (generation number in the store key).
- Per sync the driver sends every engine the manifest only (version + layouts; no references) and
  calls, concurrently, learner `broadcast(version)` and engines `receive(manifest)`.
- Learner rank 0 (after the per-bucket ZeRO-3 all-gather, which can overlap the previous bucket's
  broadcast on a second CUDA stream) copies the bucket's tensors into a preallocated device buffer
  of `bucket_mb` bytes (`pack_bucket` on a torch uint8 tensor: a device-to-device copy) and
  `broadcast`s it from rank 0.
- Each engine worker receives into two preallocated device buffers in turn (double buffering: the
  broadcast of bucket k+1 overlaps the load of bucket k), makes views with `unpack_bucket` (works
  on a torch uint8 tensor too) and feeds the same single `reload_weights` generator; with TP every
  rank receives the whole bucket and the weight loaders take their shard. Then caches are reset
  and the version recorded, exactly as on CPU. Caveat: vLLM's layerwise reload keeps the tensors
  of a layer until the layer is complete, so a receive buffer may be reused only once no pending
  layer points into it: the receiver clones the tensors of a layer that continues into the next
  bucket (at most one layer per bucket boundary), or the planner cuts buckets at layer boundaries.
- Bound: one bucket (x2) of device memory per engine and on learner rank 0; bandwidth is NCCL's
  broadcast (NVLink within a node, IB/RoCE across nodes) instead of host memcpy.
"""
from __future__ import annotations

import mmap
import os
import re
import shutil
import socket
import time
import uuid
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Sequence

import numpy as np

ALIGNMENT = 64  # byte offset of every tensor in a bucket: any dtype view of it is aligned
MB = 1 << 20
WIRE_FORMATS = ("flat", "direct", "shm")
SHM_PREFIX = "pixelray-ws"  # run directories: <shm dir>/pixelray-ws-<host>-<pid>-<uuid>/
_SHM_MAGIC = 0x3130_5357_5852_5850  # b"PXRWSW01" little-endian: a slot file's header word 0
_SHM_HEADER = 64  # bytes before the first bucket: magic, token (0 while being written), payload end


def nontemporal_copy_env(threshold_mb: float | None) -> dict[str, str]:
    """Environment for a process that exports weights: glibc's memcpy uses non-temporal stores from
    `threshold_mb` up (the x86 tunable, read at process start; other CPUs ignore it). None: {}.

    Why: glibc derives the threshold from the L3 size the CPU reports. A VM that reports a huge L3
    (480 MiB on our 2-core boxes) gets none below ~360 MB, so the export's per-tensor copies (KB to
    tens of MB) read each destination line before writing it and run at half the speed of one large
    memcpy (5.7 vs 10 GB/s, benchmarks/weight_sync.py). Appended to any GLIBC_TUNABLES already set."""
    if threshold_mb is None:
        return {}
    tunable = f"glibc.cpu.x86_non_temporal_threshold={int(threshold_mb * MB)}"
    existing = os.environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{existing}:{tunable}" if existing else tunable}


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor sits in its bucket's flat byte buffer."""

    name: str
    dtype: str  # torch dtype name: "float32", "bfloat16", ...
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the buffer, a multiple of ALIGNMENT
    nbytes: int


@dataclass
class WeightUpdate:
    """One published version of the weights: bucket references + layouts (small; pass it around).

    The references are nested in this object, so Ray passes them to actors as references (it only
    resolves top-level arguments): each engine fetches the buckets itself.
    """

    version: int | None
    # one entry per bucket: a ray.ObjectRef of a flat uint8 array ("flat") or of a list of per-tensor
    # uint8 arrays ("direct"), or a `ShmBucket` (a byte range of a shared-memory file, "shm")
    buckets: list[Any]
    layouts: list[tuple[TensorLayout, ...]]
    bucket_bytes: int  # the limit the buckets were cut with
    wire: str = "flat"  # "flat" | "direct" | "shm" (module docstring)
    export_s: float = 0.0  # learner rank 0: gather + pack + put (or write), all buckets
    stats: dict[str, float] = field(default_factory=dict)
    node_id: str | None = None  # "shm": the Ray node that wrote the files (engines must be on it)

    @property
    def num_tensors(self) -> int:
        return sum(len(layout) for layout in self.layouts)

    @property
    def nbytes(self) -> int:
        """Payload bytes (alignment padding excluded)."""
        return sum(t.nbytes for layout in self.layouts for t in layout)

    @property
    def num_elements(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for layout in self.layouts for t in layout)

    def tensors(self, get: Callable[[Any], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """(name, tensor) in order, fetching one bucket at a time; zero-copy views into the buckets."""
        if get is None:
            get = _fetcher(ShmMaps())  # "shm": files mapped for this walk only (nothing cached)
        for ref, layout in zip(self.buckets, self.layouts):
            yield from unpack_bucket(get(ref), layout)

    def state_dict(self) -> dict[str, Any]:
        """Owned copies of every tensor (for checks and tests; the engine uses `tensors()`)."""
        return {name: tensor.clone() for name, tensor in self.tensors()}


# --- packing (pure) ----------------------------------------------------------------------------

def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def tensor_nbytes(shape: Sequence[int], dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * _itemsize(dtype)


def plan_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of consecutive tensors per bucket; a bucket's buffer (aligned offsets included)
    stays within `bucket_bytes`, except a tensor larger than that, which gets a bucket of its own."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    end = 0
    for index, size in enumerate(nbytes):
        start = _align(end) if current else 0
        if current and start + size > bucket_bytes:
            buckets.append(current)
            current, start = [], 0
        current.append(index)
        end = start + size
    if current:
        buckets.append(current)
    return buckets


def bucket_layout(entries: Sequence[tuple[str, Any, Sequence[int]]]) -> tuple[tuple[TensorLayout, ...], int]:
    """Layouts for (name, torch dtype, shape) entries packed in order, and the buffer size."""
    layout, end = [], 0
    for name, dtype, shape in entries:
        offset = _align(end)
        size = tensor_nbytes(shape, dtype)
        layout.append(TensorLayout(name, dtype_name(dtype), tuple(int(s) for s in shape), offset, size))
        end = offset + size
    return tuple(layout), end


def _torch():
    import torch

    return torch


def _raw_bytes(tensor):
    """A torch uint8 view of a tensor's bytes (bf16 included: the raw bits), in host memory."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.to("cpu")
    return flat.contiguous().reshape(-1).view(_torch().uint8)


def pack_bucket(tensors: Sequence[tuple[str, Any]], out: np.ndarray | None = None
                ) -> tuple[np.ndarray, tuple[TensorLayout, ...]]:
    """Copy named torch tensors into one flat uint8 buffer (`out` if big enough: reused staging).

    Returns the buffer (exactly as long as the layout needs: a view of `out`) and the layout.
    """
    layout, total = bucket_layout([(name, t.dtype, tuple(t.shape)) for name, t in tensors])
    if out is None or out.nbytes < total:
        out = np.empty(total, dtype=np.uint8)
    buffer = out[:total]
    for (name, tensor), entry in zip(tensors, layout):
        if entry.nbytes:
            # numpy's copy is a plain memcpy; torch's uint8 copy_ measured ~2x slower here
            np.copyto(buffer[entry.offset:entry.offset + entry.nbytes], _raw_bytes(tensor).numpy())
    return buffer, layout


def bucket_views(tensors: Sequence[tuple[str, Any]]) -> tuple[list[np.ndarray], tuple[TensorLayout, ...]]:
    """The "direct" wire format: a list of uint8 numpy views of the tensors' bytes (no copy) and
    the layout. `ray.put` of the list writes the views back to back into ONE object-store object
    (pickle 5 out-of-band buffers, 8/64-byte aligned), so the bucket costs one copy instead of two
    (pack, then put); `ray.get` hands back zero-copy arrays into it. Offsets are those a flat
    buffer would use (informative only)."""
    layout, _ = bucket_layout([(name, t.dtype, tuple(t.shape)) for name, t in tensors])
    return [_raw_bytes(t).numpy() for _, t in tensors], layout


def _as_torch_bytes(buffer):
    if isinstance(buffer, np.ndarray):
        with warnings.catch_warnings():  # read-only object-store memory: torch warns, we never write
            warnings.simplefilter("ignore", UserWarning)
            return _torch().from_numpy(buffer)
    return buffer


def unpack_bucket(buffer, layout: Sequence[TensorLayout]) -> list[tuple[str, Any]]:
    """Zero-copy torch views of every tensor in a bucket: a flat numpy uint8 buffer or torch uint8
    tensor, or (the "direct" format) a list of per-tensor uint8 arrays.

    A buffer from the object store is read-only shared memory; the views must not be written to
    (vLLM's loaders only copy from them)."""
    if isinstance(buffer, (list, tuple)):
        if len(buffer) != len(layout):
            raise ValueError(f"bucket holds {len(buffer)} tensors, layout {len(layout)}")
        return [(entry.name, _typed(_as_torch_bytes(raw).reshape(-1), entry)) for raw, entry in zip(buffer, layout)]
    flat = _as_torch_bytes(buffer)
    return [(entry.name, _typed(flat[entry.offset:entry.offset + entry.nbytes], entry)) for entry in layout]


def _typed(raw, entry: TensorLayout):
    """A 1-D torch uint8 view -> the tensor it holds (same memory)."""
    torch = _torch()
    dtype = getattr(torch, entry.dtype)
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    return raw.view(dtype).reshape(entry.shape)


def _minor_faults() -> int:
    """Page faults of this process so far: first touches of object-store pages show up here."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # pragma: no cover - not Unix
        return 0


# --- the "shm" wire format: a ring of shared-memory files (same node only) -----------------------

@dataclass(frozen=True)
class ShmBucket:
    """One bucket of the "shm" format: bytes [offset, offset + nbytes) of a slot file, laid out like
    a "flat" bucket (its `TensorLayout` offsets are relative to `offset`)."""

    path: str
    offset: int  # a multiple of ALIGNMENT
    nbytes: int
    token: int  # the export that wrote it: the slot's header holds it while the data is valid


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_stale_shm(base: str, host: str | None = None) -> list[str]:
    """Remove run directories under `base` left by dead processes of this host (a learner killed
    with SIGKILL cannot clean up; `ray.kill` is one). Returns the removed paths."""
    host = host or socket.gethostname()
    pattern = re.compile(rf"^{re.escape(SHM_PREFIX)}-{re.escape(host)}-(\d+)-[0-9a-f]+$")
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(os.path.join(base, name))
    return removed


class _Slot:
    """One slot file, kept mapped read-write by the writer (no page faults after the first use)."""

    def __init__(self, path: str, capacity: int):
        self.path, self.capacity = path, capacity
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)  # allocate the pages now, not one fault at a time
            self.map = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.header = np.frombuffer(self.map, dtype=np.uint64, count=_SHM_HEADER // 8)

    def release(self) -> None:
        self.array = self.header = None
        try:
            self.map.close()
        except BufferError:  # a caller still holds a view: the mapping goes with it
            pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class ShmWriter:
    """Learner rank 0's side of the "shm" wire format: a ring of `slots` files in its own directory
    `<base>/pixelray-ws-<host>-<pid>-<uuid>/` (unique per process and run: two runs on a host never
    share one). Export k writes slot k % slots in place, so from the (slots+1)-th export on no page
    is allocated or faulted any more; a slot file grows (is re-created) when a larger export needs it.

    Lifetime: the files live as long as this writer. `close()` removes the directory (the learner
    calls it from `LearnerGroup.shutdown`, before `ray.kill`); a finalizer covers a normal process
    exit, and the next writer on the host removes directories of dead processes (`sweep_stale_shm`).
    An export stays readable until `slots` further exports: every engine must have loaded it by then
    (module docstring, "shm").
    """

    def __init__(self, base: str = "/dev/shm", slots: int = 2, copy_threads: int = 1):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        # >1: the copies split over threads (numpy releases the GIL), as Ray's put does; on this
        # shared 2-core box 2 threads were +10% idle and slower under load, hence 1 by default
        self.copy_threads = max(1, copy_threads)
        self._pool = None
        if not os.path.isdir(base):
            raise FileNotFoundError(f"weight sync shared-memory directory {base!r} does not exist")
        sweep_stale_shm(base)
        self.base, self.slots = base, slots
        self.directory = os.path.join(base, f"{SHM_PREFIX}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.directory, 0o700)
        self._ring: list[_Slot | None] = [None] * slots
        self._exports = 0
        self._finalizer = weakref.finalize(self, _remove_tree, self.directory)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def reserve(self, nbytes: int) -> tuple[_Slot, int]:
        """The next slot, able to hold `nbytes` after the header and marked invalid (token 0) until
        `commit`; and the token this export will carry."""
        if self.closed:
            raise RuntimeError("the ShmWriter is closed")
        self._exports += 1
        index = (self._exports - 1) % self.slots
        slot = self._ring[index]
        needed = _SHM_HEADER + nbytes
        if slot is None or slot.capacity < needed:
            if slot is not None:
                slot.release()
            capacity = -(-needed // (2 * MB)) * (2 * MB)
            slot = self._ring[index] = _Slot(os.path.join(self.directory, f"slot{index}-{self._exports}.bin"),
                                             capacity)
        slot.header[:3] = (_SHM_MAGIC, 0, _SHM_HEADER + nbytes)  # invalid while being written
        return slot, self._exports

    @staticmethod
    def commit(slot: _Slot, token: int) -> None:
        slot.header[1] = token  # readers check it before and after loading

    def write(self, tensors: Sequence[tuple[str, Any]], out: np.ndarray, piece: int = 4 * MB
              ) -> tuple[np.ndarray, tuple[TensorLayout, ...]]:
        """`pack_bucket` into `out` (a bucket's range of a slot), the copies split in pieces of at
        most `piece` bytes over `copy_threads` threads."""
        layout, total = bucket_layout([(name, t.dtype, tuple(t.shape)) for name, t in tensors])
        if out.nbytes < total:
            raise ValueError(f"bucket needs {total} bytes, the slot range holds {out.nbytes}")
        buffer = out[:total]
        jobs = []
        if self.copy_threads == 1:  # whole tensors: every piece boundary costs (~15% at 4 MB pieces)
            piece = max([entry.nbytes for entry in layout], default=1) or 1
        for (_, tensor), entry in zip(tensors, layout):
            if entry.nbytes:
                raw = _raw_bytes(tensor).numpy()
                for start in range(0, entry.nbytes, piece):
                    stop = min(start + piece, entry.nbytes)
                    jobs.append((buffer[entry.offset + start:entry.offset + stop], raw[start:stop]))
        if self.copy_threads == 1 or len(jobs) < 2:
            for dst, src in jobs:
                np.copyto(dst, src)
        else:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="shm-copy")

            def run(share):
                for dst, src in share:
                    np.copyto(dst, src)

            shares = [jobs[k::self.copy_threads] for k in range(self.copy_threads)]
            list(self._pool.map(run, [share for share in shares if share]))
        return buffer, layout

    def close(self) -> None:
        """Unmap and delete every file of this writer (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for slot in self._ring:
            if slot is not None:
                slot.release()
        self._ring = [None] * self.slots
        self._finalizer()


class ShmMaps:
    """A reader's read-only mappings of slot files, by path.

    The engine keeps one instance for the life of its process (`reload_in_worker`), so a slot the
    writer rewrites in place is mapped once, not at every sync; a mapping is dropped as soon as its
    file is gone or replaced (checked at every `prune`, i.e. every load). Until then it keeps the
    file's memory alive even after the writer deleted it (at most `slots` files per writer)."""

    def __init__(self):
        self._maps: dict[str, tuple[int, int, np.ndarray]] = {}  # path -> (inode, size, uint8 array)

    def __len__(self) -> int:
        return len(self._maps)

    def array(self, path: str) -> np.ndarray:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"weight sync file {path} not found: the \"shm\" wire format needs every engine on learner "
                f"rank 0's node (sharing its /dev/shm), and the update loaded before `trainer.weight_sync_shm_slots` "
                f"newer exports; across nodes use weight_sync_format=direct") from None
        cached = self._maps.get(path)
        if cached is not None and cached[:2] == (stat.st_ino, stat.st_size):
            return cached[2]
        fd = os.open(path, os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, stat.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        array = np.frombuffer(mapping, dtype=np.uint8)  # read-only; owns the mapping
        self._maps[path] = (stat.st_ino, stat.st_size, array)
        return array

    def bucket(self, bucket: ShmBucket) -> np.ndarray:
        """Zero-copy read-only uint8 view of the bucket; checks that the slot still holds its export."""
        array = self.array(bucket.path)
        self._check(array, bucket)
        return array[bucket.offset:bucket.offset + bucket.nbytes]

    def check(self, bucket: ShmBucket) -> None:
        """Raise if the slot no longer holds `bucket`'s export (rewritten by a later one)."""
        self._check(self.array(bucket.path), bucket)

    @staticmethod
    def _check(array: np.ndarray, bucket: ShmBucket) -> None:
        header = array[:_SHM_HEADER].view(np.uint64)
        if header[0] != _SHM_MAGIC or int(header[1]) != bucket.token:
            raise RuntimeError(
                f"weight sync file {bucket.path} holds export {int(header[1])}, not {bucket.token}: the slot "
                f"was rewritten before this engine loaded it; raise trainer.weight_sync_shm_slots (>= "
                f"max_staleness + 1) or use weight_sync_format=direct")

    def prune(self) -> None:
        """Forget mappings whose file was deleted or replaced (their memory is freed once unused)."""
        for path, (inode, size, _) in list(self._maps.items()):
            try:
                stat = os.stat(path)
                if (stat.st_ino, stat.st_size) == (inode, size):
                    continue
            except FileNotFoundError:
                pass
            del self._maps[path]

    def clear(self) -> None:
        self._maps.clear()


_ENGINE_MAPS = ShmMaps()  # the engine process's mappings, reused across syncs


def _fetcher(maps: ShmMaps) -> Callable[[Any], Any]:
    """A bucket reference -> its contents: an `ShmBucket` through `maps`, an ObjectRef with `ray.get`."""

    def get(ref):
        if isinstance(ref, ShmBucket):
            return maps.bucket(ref)
        import ray

        return ray.get(ref)  # zero-copy on the same node

    return get


def _current_node_id() -> str | None:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no Ray here: the file check remains
        pass
    return None


# --- export (learner side) ---------------------------------------------------------------------

class StagingBuffer:
    """A reusable host buffer for packing buckets (kept warm between syncs)."""

    def __init__(self):
        self.array: np.ndarray | None = None

    def get(self, nbytes: int) -> np.ndarray:
        if self.array is None or self.array.nbytes < nbytes:
            self.array = np.empty(nbytes, dtype=np.uint8)
            self.array.fill(0)  # fault the pages in now, not while timing a sync
        return self.array


def export_weights(
    named_tensors: Sequence[tuple[str, Any]],
    bucket_bytes: int,
    version: int | None,
    *,
    full_shape: Callable[[Any], Sequence[int]] | None = None,
    gather: Callable[[list], ContextManager] | None = None,
    publish: bool = True,
    staging: StagingBuffer | None = None,
    put: Callable[[Any], Any] | None = None,
    wire: str = "flat",
    shm: ShmWriter | None = None,
) -> WeightUpdate | None:
    """Cut `named_tensors` into buckets, pack and put each; the `WeightUpdate` on the publishing rank.

    - `wire`: "flat" packs each bucket into one uint8 buffer (`pack_bucket`) and puts that;
      "direct" puts the bucket's tensors as a list of uint8 views (`bucket_views`), one copy less;
      "shm" copies the buckets one after the other into the next slot file of `shm` (required on
      the publishing rank), no object store involved.
    - `full_shape(tensor)`: the tensor's full shape (ZeRO-3: `ds_shape`, the same on every rank, so
      every rank plans the same buckets); default `tensor.shape`.
    - `gather(tensors)`: context manager materialising the bucket's tensors (ZeRO-3:
      `GatheredParameters`); entered on EVERY rank, bucket by bucket.
    - `publish`: this rank packs and puts (learner rank 0); others only join the gathers -> None.
    """
    if wire not in WIRE_FORMATS:
        raise ValueError(f"wire must be one of {WIRE_FORMATS}, got {wire!r}")
    if wire == "shm" and publish and shm is None:
        raise ValueError('wire "shm" needs a ShmWriter (shm=...) on the publishing rank')
    started, faults = time.perf_counter(), _minor_faults()
    shape_of = full_shape or (lambda t: tuple(t.shape))
    specs = [(name, t.dtype, tuple(shape_of(t))) for name, t in named_tensors]
    plan = plan_buckets([tensor_nbytes(shape, dtype) for _, dtype, shape in specs], bucket_bytes)
    if put is None and wire != "shm":
        import ray

        put = ray.put
    staging = staging or StagingBuffer()
    slot = token = None
    if wire == "shm" and publish:  # one slot file for the whole export, buckets back to back
        planned = [bucket_layout([specs[i] for i in indices]) for indices in plan]
        starts, end = [], _SHM_HEADER
        for _, size in planned:
            starts.append(end)
            end = _align(end + size)
        slot, token = shm.reserve(end - _SHM_HEADER)
    refs, layouts = [], []
    gather_s = pack_s = put_s = 0.0
    for number, indices in enumerate(plan):
        members = [named_tensors[i] for i in indices]
        begun = time.perf_counter()
        with (gather([t for _, t in members]) if gather else nullcontext()):
            gather_s += time.perf_counter() - begun
            if publish:
                begun = time.perf_counter()
                if wire == "flat":
                    needed = bucket_layout([specs[i] for i in indices])[1]
                    buffer, layout = pack_bucket(members, staging.get(needed))
                elif wire == "shm":
                    size = planned[number][1]
                    buffer, layout = shm.write(members, slot.array[starts[number]:starts[number] + size])
                else:
                    buffer, layout = bucket_views(members)
                for entry, spec in zip(layout, (specs[i] for i in indices)):
                    if entry.shape != spec[2]:
                        raise RuntimeError(f"{entry.name}: shape {entry.shape} after the gather, planned {spec[2]}")
                pack_s += time.perf_counter() - begun
                if wire == "shm":  # written in place: the bucket is already published
                    refs.append(ShmBucket(slot.path, starts[number], buffer.nbytes, token))
                else:
                    begun = time.perf_counter()
                    refs.append(put(buffer))  # copies into the object store: staging / gathered tensors free again
                    put_s += time.perf_counter() - begun
                layouts.append(layout)
    if not publish:
        return None
    if slot is not None:
        shm.commit(slot, token)
    elapsed = time.perf_counter() - started
    return WeightUpdate(version, refs, layouts, bucket_bytes, wire, elapsed,
                        {"gather_s": gather_s, "pack_s": pack_s, "put_s": put_s, "buckets": len(refs),
                         "minor_faults": _minor_faults() - faults},
                        node_id=_current_node_id() if wire == "shm" else None)


# --- load (engine side) ------------------------------------------------------------------------

def reload_in_worker(worker, update: WeightUpdate) -> dict:
    """Runs inside the vLLM worker (via `collective_rpc`): load every bucket in ONE `reload_weights`.

    `reload_weights` re-packs weights the way the model runner expects (plain `load_weights` fails
    on CPU, where linear weights are re-packed). The buckets are fetched here, in the worker, so a
    multi-process engine reads them straight from the object store.
    """
    started, faults = time.perf_counter(), _minor_faults()
    count = 0
    fetch_s = 0.0
    if update.wire == "shm":
        _ENGINE_MAPS.prune()  # drop mappings of slot files deleted or replaced since the last load
    get = _fetcher(_ENGINE_MAPS)

    def tensors() -> Iterator[tuple[str, Any]]:
        nonlocal count, fetch_s
        for ref, layout in zip(update.buckets, update.layouts):
            begun = time.perf_counter()
            buffer = get(ref)  # zero-copy on the same node (object store or slot file)
            fetch_s += time.perf_counter() - begun
            views = unpack_bucket(buffer, layout)
            del buffer  # the views keep the bucket alive exactly as long as vLLM holds them
            count += len(views)
            yield from views

    worker.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
    if count != update.num_tensors:
        raise RuntimeError(f"reload consumed {count} of {update.num_tensors} tensors")
    for bucket in {b.path: b for b in update.buckets if isinstance(b, ShmBucket)}.values():
        _ENGINE_MAPS.check(bucket)  # not rewritten while loading (else the engine may hold mixed weights)
    return {"tensors": count, "fetch_s": fetch_s, "reload_s": time.perf_counter() - started,
            "minor_faults": _minor_faults() - faults}



def accept_update(update, version: int | None, serving_version: int, log) -> "WeightUpdate":
    """The update a rollout worker should load: unwrapped from the older `[update]` form, with
    `version` (if given) overriding the stamped one; a missing version is an error, a version
    going backwards a warning."""
    import dataclasses

    if isinstance(update, list):
        update = update[0]
    if version is not None and version != update.version:
        update = dataclasses.replace(update, version=version)
    if update.version is None:
        raise ValueError("a weight update needs a policy version")
    if update.wire == "shm" and update.node_id is not None:
        here = _current_node_id()
        if here is not None and here != update.node_id:
            raise RuntimeError(
                f"weight_sync_format 'shm' needs every rollout engine on learner rank 0's node: the update "
                f"was written on node {update.node_id}, this engine runs on {here}; use 'direct' across nodes")
    if update.version < serving_version:
        log.warning("policy version goes back from %d to %d", serving_version, update.version)
    return update
