"""The CPU tool-executor pool: visual operations run in small Ray actors beside the rollout worker.

`ToolPool` is a plain class living inside the rollout worker. `run(requests)` fans the batch's
tool calls out to `pool_size` `ToolExecutor` actors and blocks until every request has an
answer, in request order. Guarantees:

- Backpressure: at most `max_in_flight_per_executor` calls queued per executor (enough to hide
  the round trip; a slow call does not pile up the whole batch on one actor).
- Timeouts: a call that has run `call_timeout_s` without finishing gets a "timeout" error
  observation. When a task's deadline (`call_timeout_s` after submission) passes, the pool asks
  its executor (a probe in its own concurrency group, answered while a call is stuck) which call
  it is running and for how long: if that call has run less than `call_timeout_s` (a long queue
  of healthy calls), the deadline moves to when that call would time out. Otherwise Ray cannot
  interrupt a running call of a sync actor, so the pool cancels the task and kills the executor
  with restart: the executor is wedged (a stalled file system, a pathological decode) and would
  delay everything queued behind it. Only the stuck call times out; the task's other calls are
  re-run (if the executor cannot answer, each of them runs in a task of its own, so the guilty one
  times out alone). While an executor the pool restarted or replaced is starting up, its calls'
  clocks are stopped (start-up takes seconds: torch is imported). Restarts Ray does on its own (a
  crash) are invisible to the pool, so `call_timeout_s` must stay well above an executor's start
  time (~5-15 s on 2 busy cores).
- Faults: executors restart (`max_restarts`) and Ray re-runs their unfinished calls
  (`max_task_retries` = `max_restarts`; calls are pure, so re-running is safe). If an executor is
  dead for good, the pool replaces it and resubmits its calls once more; a call that keeps
  killing executors ends as an "executor_failed" error. Every request gets exactly one answer.

Calls travel in tasks of up to `calls_per_task` (one Ray task, one object of results per task):
Ray's fixed cost is about 2 ms of CPU per actor task and 3-4 ms per object in the object store
(executor, raylet and caller together), more than a crop's own ~11 ms of work can carry per call.
A task's calls share one answer object and one resolution of each source; every per-call
guarantee above still holds. Calls of a task that crashed its executor for good, or failed as a
whole, are re-run one per task, so an innocent call never shares the fate of a bad one.

Sources travel as Ray arguments: an ObjectRef in `ToolRequest.sources` (e.g. the original image,
put once per prompt as an HxWx3 uint8 array) is resolved by Ray and read zero-copy by the
executor; other in-memory items are pickled with the task, once per task.

Results: the views (what the model sees next) come back as PIL images. The executor ships each
view's own PIL memory (RGBX, 4 bytes a pixel, exported zero-copy through Arrow) out of band, in row
blocks below 1 MiB (Ray 2.60 starts 6 threads to copy each larger buffer); the caller copies the
blocks once out of the object store (whose buffer is then released) and wraps the copy zero-copy
(`Image.fromarrow`): ~0.5 ms a 3 MB view in the caller, against ~1.7 ms for packing to RGB with
`np.asarray` and unpacking with `Image.fromarray`. The full-resolution images a call returns are
`PooledImage` handles, never pixels: a crop of an image that reached the executor by reference as
an array is that reference plus the crop box (its pixels are sliced out again, zero-copy, when a
later call targets it); other full images (video frames, crops of in-memory sources) stay in the
object store, owned by the caller, so they outlive the executor that made them. The caller appends
them to the sources and later calls get them by reference: a crop's pixels never travel back to the
rollout worker at all.

Measured (`benchmarks/tools.py`, 2 cores, CPU of every Ray process counted): per core, the pool
reaches 0.74-0.80x of in-process throughput on crops of a 2560x1600 photo where a crop is ~10 ms
of work (was 0.41x with a task and two store objects per call), 0.82-0.85x where it is 15-18 ms;
0.84-0.98x on select_frames of a 16 s 768x576 video. The pool adds ~3 ms a crop: two crops at
once (one per core) cost ~1.5 ms more each than one alone, in-process too; the caller's side
(Ray's gets, copying each view out of the store) 1-1.6 ms; the raylet and Ray's daemons ~0.5 ms.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import ray
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from policies.visual_ops import (
    PIL_BLOCKS_KEPT,
    ROLE_INFO_KEY,
    ImageSource,
    Observation,
    PixelBudgets,
    VideoSource,
    preload,
    run_turn,
)

_LATENCY_WINDOW = 10_000  # latency percentiles are over the most recent calls
_MAX_POOL_RESUBMISSIONS = 1  # beyond Ray's own retries: a call that kills executors is not retried forever
_PROBE_TIMEOUT_S = 5.0  # how long a timed-out task's executor gets to say which call it is stuck on


class ToolPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool_size: int = Field(default=2, ge=1)
    num_cpus_per_executor: float = Field(default=0.25, ge=0)
    # Custom Ray resources per executor, e.g. {tool_cpu: 1} pins executors to the cluster's CPU worker
    # group (cluster/launch/*.yaml declare `tool_cpu` there). Empty: any node with free CPUs.
    resources: dict[str, float] = Field(default_factory=dict)
    max_in_flight_per_executor: int = Field(default=16, ge=1)
    # Calls per Ray task (fewer when the batch is small, so every executor gets a share). Ray's
    # per-task and per-object costs are shared by a task's calls; 1 = a task per call.
    calls_per_task: int = Field(default=8, ge=1)
    call_timeout_s: float = Field(default=30.0, gt=0)
    max_restarts: int = Field(default=3, ge=0)
    budgets: PixelBudgets = PixelBudgets()


class ToolRequest(NamedTuple):
    """One assistant turn to execute; a plain (turn_text, sources) tuple works too."""

    turn_text: str
    sources: list  # ImageSource / VideoSource / bare images / PooledImage, or ObjectRefs of them


@dataclass(frozen=True, eq=False)
class PooledImage:
    """A full-resolution image a pool call returned (a crop or a video frame), left in Ray's object
    store. Append it to the conversation's sources like any image: the pool passes it to later calls
    by reference, so its pixels are neither copied back into the caller nor re-pickled per call.
    `np.asarray(image)` or `image.load()` fetch the pixels when they are really wanted."""

    ref: Any  # ObjectRef of the pixels: an image (array / ImageSource of one), or a list of ImageSource
    index: int | None  # position in that list; None when the object is the image itself
    role: str  # "crop" or "frame": selects the budget of the view the model saw
    size: tuple[int, int]  # (width, height), as PIL's `size`
    box: tuple[int, int, int, int] | None = None  # (left, top, right, bottom) of the object's pixels

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def load(self) -> Image.Image:
        image = Image.fromarray(np.ascontiguousarray(np.asarray(self)))
        image.info[ROLE_INFO_KEY] = self.role
        return image

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        pixels = _select(ray.get(self.ref), self.index, self.box)  # read-only, zero-copy on the same node
        return pixels.astype(dtype) if dtype is not None else (pixels.copy() if copy else pixels)


class _Full(NamedTuple):
    """Where a call's full-resolution image is: the `stored` index in its task's second return, or
    `box` of its call's `source` (a by-reference array source)."""

    role: str
    size: tuple[int, int]
    stored: int | None
    source: int | None
    box: tuple[int, int, int, int] | None


class _StoredImage(NamedTuple):
    """A full-resolution image a call returned, as `_export` row blocks (the second return of
    `ToolExecutor.run` is a list of these)."""

    pieces: list[np.ndarray]
    role: str


class _PackedObservation(NamedTuple):
    """An Observation without its images; `views` index the task's view arrays."""

    observation: Observation
    views: list[int]
    fulls: list[_Full]


class _PackedTask(NamedTuple):
    """The first return of `ToolExecutor.run`: one entry per call (None: no tool call), and the
    views of all of them as `_export` row blocks, which Ray serializes out of band (one copy into
    the object store, read zero-copy by the caller)."""

    calls: list[_PackedObservation | None]
    views: list[list[np.ndarray]]


class _Spec(NamedTuple):
    """How a call's source reaches the executor: `argument` is its position among the task's
    arguments; a PooledImage also gives its `index`, `box` and `role`; `by_ref` tells whether the
    argument was an ObjectRef (so a crop of it can be returned as that reference and a box)."""

    argument: int
    index: int | None
    box: tuple[int, int, int, int] | None
    role: str | None
    by_ref: bool


@ray.remote(concurrency_groups={"probe": 1})
class ToolExecutor:
    """Runs `policies.visual_ops.run_turn`; never raises for bad input (errors are observations).
    Tasks run one at a time; `running` answers from its own thread while a task is stuck."""

    def __init__(self, budgets: PixelBudgets):
        self.budgets = budgets
        self._running: tuple[int, int, float] | None = None  # (task token, call position, start) running
        preload()  # pay the transformers/torch import now, not inside the first call's timeout

    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="probe")
    def running(self) -> tuple[int, int, float] | None:
        """(task token, call position, seconds it has run) of the call under way, if any."""
        running = self._running
        return None if running is None else (running[0], running[1], time.monotonic() - running[2])

    @ray.method(num_returns=2)
    def run(self, token: int, calls: list[tuple[str, list[_Spec]]], *arguments: Any
            ) -> tuple[_PackedTask, list[_StoredImage]]:
        """Sources are separate arguments so that Ray resolves the ObjectRefs among them (each once
        per task); a PooledImage arrives as its object, its spec picking the image meant."""
        packed, views, stored = [], [], []
        for position, (turn_text, specs) in enumerate(calls):
            self._running = (token, position, time.monotonic())
            packed.append(self._run_one(turn_text, specs, arguments, views, stored))
        self._running = None
        return _PackedTask(packed, views), stored

    def _run_one(self, turn_text: str, specs: list[_Spec], arguments: tuple, views: list, stored: list
                 ) -> _PackedObservation | None:
        try:
            sources = [_source(arguments[spec.argument], spec) for spec in specs]
        except Exception as exc:  # e.g. a PooledImage whose object is not what it should be
            observation = Observation.error("bad_media", f"a source cannot be read ({type(exc).__name__}).")
            return _PackedObservation(observation, [], [])
        observation = run_turn(turn_text, sources, self.budgets)
        if observation is None:
            return None
        view_slots = []
        for image in observation.view_images:
            view_slots.append(len(views))
            views.append(_export(image))
        derived = _derived(observation, specs, sources) if observation.full_images else None
        fulls = []
        for image in observation.full_images:
            role = image.info.get(ROLE_INFO_KEY, "crop")
            if derived is not None:
                fulls.append(_Full(role, image.size, None, *derived))
            else:
                fulls.append(_Full(role, image.size, len(stored), None, None))
                stored.append(_StoredImage(_export(image), role))
        return _PackedObservation(dataclasses.replace(observation, view_images=[], full_images=[]), view_slots, fulls)


def _select(item: Any, index: int | None, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """The HxWx3 pixels a PooledImage designates in its object (a view; a copy only to join the
    row blocks of an image a call stored)."""
    item = item if index is None else item[index]
    if isinstance(item, _StoredImage):
        pixels = _join(item.pieces)
    else:
        pixels = np.asarray(item.image if isinstance(item, ImageSource) else item)
    pixels = pixels[..., :3] if pixels.ndim == 3 and pixels.shape[2] == 4 else pixels  # RGBX: drop the pad byte
    if box is not None:
        left, top, right, bottom = box
        pixels = pixels[top:bottom, left:right]
    return pixels


def _source(argument: Any, spec: _Spec) -> Any:
    if spec.role is None:  # a source as the caller gave it
        return argument
    return ImageSource(_select(argument, spec.index, spec.box), spec.role)  # a PooledImage


def _derived(observation: Observation, specs: list[_Spec], sources: list) -> tuple | None:
    """(source, box) when the call's full image is a crop of an array that reached the executor by
    reference: then it is returned as that reference and the box (in the object's pixels)."""
    if not observation.ok or observation.box_pixels is None or observation.target_image is None:
        return None
    images = [position for position, item in enumerate(sources) if not isinstance(item, VideoSource)]
    position = images[observation.target_image - 1]
    item, spec = sources[position], specs[position]
    pixels = item.image if isinstance(item, ImageSource) else item
    if not spec.by_ref or not isinstance(pixels, np.ndarray):
        return None
    left, top, right, bottom = observation.box_pixels
    x, y = (spec.box[0], spec.box[1]) if spec.box is not None else (0, 0)
    return position, (left + x, top + y, right + x, bottom + y)


_PIECE_BYTES = (1 << 20) - 1  # Ray copies a larger out-of-band buffer with 6 threads it starts per buffer


def _export(image: Image.Image) -> list[np.ndarray]:
    """An RGB image's pixels for the object store, as row blocks below 1 MiB each: views of its own
    memory (HxWx4 RGBX, exported zero-copy through Arrow), or of an HxWx3 copy when PIL keeps the
    rows in several blocks (images above 16 MB). Ray serializes each block out of band with a plain
    memcpy; a single buffer above 1 MiB would make it start 6 copying threads (Ray 2.60's
    `parallel_memcopy`: 6 clone3 calls per buffer under strace), which on 2 cores cost more CPU than
    the copy itself (~1 ms more per 3 MB view in a micro-benchmark)."""
    pixels = None
    if image.mode == "RGB":
        with contextlib.suppress(ValueError):  # "Image rows are not contiguous in memory"
            buffer = pa.array(image).values.buffers()[1]
            pixels = np.frombuffer(buffer, np.uint8, count=image.width * image.height * 4).reshape(
                image.height, image.width, 4)
    if pixels is None:
        pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    rows = max(1, _PIECE_BYTES // (pixels.shape[1] * pixels.shape[2]))
    return [pixels[top:top + rows] for top in range(0, pixels.shape[0], rows)]


def _join(pieces: Sequence[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _view(pieces: list[np.ndarray]) -> Image.Image:
    """A view as a PIL image in this process's memory: one copy out of the object store (whose
    buffer is then released), wrapped zero-copy (`Image.fromarrow`) when it is RGBX."""
    pixels = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
    if pixels.shape[2] != 4:
        return Image.fromarray(pixels)
    flat = pa.Array.from_buffers(pa.uint8(), pixels.size, [None, pa.py_buffer(pixels)])
    return Image.fromarrow(pa.FixedSizeListArray.from_arrays(flat, 4), "RGB", (pixels.shape[1], pixels.shape[0]))


def _unpack(packed: _PackedObservation | None, views: list[Image.Image], fulls_ref, sources: list
            ) -> Observation | None:
    if packed is None:
        return None
    fulls = []
    for full in packed.fulls:
        if full.stored is not None:
            fulls.append(PooledImage(fulls_ref, full.stored, full.role, full.size))
            continue
        source = sources[full.source]
        ref, index = (source.ref, source.index) if isinstance(source, PooledImage) else (source, None)
        fulls.append(PooledImage(ref, index, full.role, full.size, full.box))
    return dataclasses.replace(packed.observation, view_images=[views[i] for i in packed.views], full_images=fulls)


def _task_arguments(requests: Sequence[ToolRequest]) -> tuple[list[tuple[str, list[_Spec]]], list[Any]]:
    """`ToolExecutor.run`'s calls and arguments: each distinct source once (a PooledImage as its
    ObjectRef), so a task's calls on the same image resolve it once."""
    arguments: list[Any] = []
    positions: dict[Any, int] = {}
    calls = []
    for request in requests:
        specs = []
        for source in request.sources:
            value = source.ref if isinstance(source, PooledImage) else source
            by_ref = isinstance(value, ray.ObjectRef)
            key = ("ref", value) if by_ref else ("object", id(value))
            if key not in positions:
                positions[key] = len(arguments)
                arguments.append(value)
            if isinstance(source, PooledImage):
                specs.append(_Spec(positions[key], source.index, source.box, source.role, True))
            else:
                specs.append(_Spec(positions[key], None, None, None, by_ref))
        calls.append((request.turn_text, specs))
    return calls, arguments


@dataclass
class _Task:
    token: int
    indices: list[int]  # positions in the batch
    resubmissions: list[int]  # per call: pool resubmissions so far
    slot: int  # executor slot it was submitted to
    executor: Any  # the handle it was submitted to (a slot's handle changes when replaced)
    submitted_at: float
    deadline: float
    fulls: Any  # ObjectRef of the task's stored full images (its second return)


class _Waiting(NamedTuple):
    index: int
    resubmissions: int
    alone: bool  # must run in a task of its own (it was in a task that failed)


class ToolPool:
    """Driver-side pool of ToolExecutor actors; not thread-safe (one `run` at a time)."""

    def __init__(self, config: ToolPoolConfig):
        self.config = config
        # The views arrive as arrays and become PIL images here: let PIL reuse freed image memory
        # in this process too (see visual_ops.preload), instead of faulting in fresh pages per view.
        Image.core.set_blocks_max(max(Image.core.get_blocks_max(), PIL_BLOCKS_KEPT))
        self._executors = [self._spawn() for _ in range(config.pool_size)]
        ray.get([executor.pid.remote() for executor in self._executors])  # started before the first timeout runs
        self._in_flight = [0] * config.pool_size
        self._latencies_ms: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        # calls, tool_calls, tasks, restarts, replacements, resubmissions
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._starting: dict[ray.ObjectRef, int] = {}  # start probe of a (re)starting executor -> slot
        self._tokens = itertools.count()

    @property
    def executors(self) -> list:
        """The current executor handles, one per slot (for diagnostics and fault tests)."""
        return list(self._executors)

    def in_flight(self) -> list[int]:
        return list(self._in_flight)

    def run(self, requests: Sequence[ToolRequest | tuple[str, list]]) -> list[Observation | None]:
        """One answer per request, in order: an Observation, or None for a turn without a tool call."""
        requests = [ToolRequest(*request) for request in requests]
        results: list[Observation | None] = [None] * len(requests)
        waiting = deque(_Waiting(index, 0, False) for index in range(len(requests)))
        pending: dict[ray.ObjectRef, _Task] = {}
        while waiting or pending:
            self._submit(waiting, pending, requests)
            deadline = min(task.deadline for task in pending.values())
            timeout = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
            watched = list(pending) + list(self._starting)
            # fetch_local=False: a result is collected by `ray.get` anyway; waiting for it to be local
            # as well costs a raylet round trip per wait.
            ready, _ = ray.wait(watched, num_returns=1, timeout=timeout, fetch_local=False)
            if ready:  # collect everything else that is done as well
                ready, _ = ray.wait(watched, num_returns=len(watched), timeout=0, fetch_local=False)
            for ref in ready:
                if ref in self._starting:
                    self._started(ref, pending)
                    continue
                task = pending.pop(ref)
                self._in_flight[task.slot] -= len(task.indices)
                self._collect(ref, task, requests, results, waiting)
            now = time.monotonic()
            for ref in [ref for ref, task in pending.items() if task.deadline <= now]:
                if ref in pending and pending[ref].deadline <= now:  # a restart may have reset it meanwhile
                    self._time_out(ref, pending, requests, results, waiting)
        return results

    def _submit(self, waiting: deque, pending: dict, requests: list[ToolRequest]) -> None:
        limit, pool_size = self.config.max_in_flight_per_executor, len(self._executors)
        while waiting:
            slot = min(range(pool_size), key=self._in_flight.__getitem__)
            room = limit - self._in_flight[slot]
            if room <= 0:
                return
            # Full tasks, but no executor left idle while another has a queue: share the tail out.
            size = min(room, self.config.calls_per_task, -(-len(waiting) // pool_size))
            chunk = [waiting.popleft()]
            while waiting and len(chunk) < size and not chunk[0].alone and not waiting[0].alone:
                chunk.append(waiting.popleft())
            executor, token = self._executors[slot], next(self._tokens)
            calls, arguments = _task_arguments([requests[call.index] for call in chunk])
            ref, fulls = executor.run.remote(token, calls, *arguments)
            pending[ref] = _Task(token, [call.index for call in chunk], [call.resubmissions for call in chunk],
                                 slot, executor, time.monotonic(), self._deadline(slot), fulls)
            self._in_flight[slot] += len(chunk)
            self._counts["tasks"] += 1

    def _deadline(self, slot: int) -> float:
        # No clock while the executor (re)starts: start-up is not the call's fault.
        if slot in self._starting.values():
            return math.inf
        return time.monotonic() + self.config.call_timeout_s

    def _watch_start(self, slot: int) -> None:
        self._starting[self._executors[slot].pid.remote()] = slot

    def _started(self, probe, pending: dict) -> None:
        """The slot's executor answered its start probe (or died): start the clocks of its calls."""
        slot = self._starting.pop(probe)
        with contextlib.suppress(ray.exceptions.RayError):  # died again: its calls fail, _collect handles them
            ray.get(probe)
        if slot in self._starting.values():
            return  # a newer start of the same slot is still under way
        for task in pending.values():
            if task.slot == slot:
                task.deadline = time.monotonic() + self.config.call_timeout_s

    def _collect(self, ref, task: _Task, requests: list, results: list, waiting: deque) -> None:
        try:
            packed = ray.get(ref)
        except Exception as exc:
            with contextlib.suppress(Exception):  # its second return failed too: seen, so Ray does not log it
                ray.get(task.fulls, timeout=0)
            self._failed(task, exc, results, waiting)
            return
        views = [_view(pieces) for pieces in packed.views]
        for index, call in zip(task.indices, packed.calls, strict=True):
            self._record(task, index, _unpack(call, views, task.fulls, requests[index].sources), results)

    def _failed(self, task: _Task, exc: Exception, results: list, waiting: deque) -> None:
        if isinstance(exc, ray.exceptions.RayActorError):
            # Ray's restarts and retries are used up: this executor is dead for good.
            self._replace(task.slot, task.executor)
            for index, resubmissions in reversed(list(zip(task.indices, task.resubmissions, strict=True))):
                if resubmissions < _MAX_POOL_RESUBMISSIONS:
                    self._counts["resubmissions"] += 1
                    waiting.appendleft(_Waiting(index, resubmissions + 1, True))
                else:
                    self._record(task, index, Observation.error(
                        "executor_failed", "the tool executor crashed on this call."), results)
        elif len(task.indices) > 1:  # e.g. a source ObjectRef that was lost: find out whose, each on its own
            self._requeue(task, range(len(task.indices)), waiting, alone=True)
        else:
            observation = Observation.error("executor_failed", f"the tool call could not run ({type(exc).__name__}).")
            self._record(task, task.indices[0], observation, results)

    def _requeue(self, task: _Task, positions, waiting: deque, alone: bool) -> None:
        """Put calls of a task that gave no results back at the front of the queue, in order."""
        for position in reversed(list(positions)):
            self._counts["resubmissions"] += 1
            waiting.appendleft(_Waiting(task.indices[position], task.resubmissions[position], alone))

    def _time_out(self, ref, pending: dict, requests: list, results: list, waiting: deque) -> None:
        """The task's deadline passed. If its executor is busy with a call that has not yet run
        `call_timeout_s` (this task's or one queued ahead), the executor is working: wait longer.
        Otherwise the call it is stuck on times out, the task's other calls are re-run, and the
        executor is restarted."""
        if ray.wait([ref], timeout=0, fetch_local=False)[0]:
            return  # it finished after all: collected with the next results
        task = pending[ref]
        running = self._probe(task)
        timeout = self.config.call_timeout_s
        if running is not None and running[2] < timeout:
            task.deadline = time.monotonic() + timeout - running[2]
            return
        del pending[ref]
        self._in_flight[task.slot] -= len(task.indices)
        if len(task.indices) == 1:
            stuck = 0
        else:
            stuck = running[1] if running is not None and running[0] == task.token else None
        ray.cancel(ref)  # a cancelled task is not re-run when its executor restarts
        if stuck is None:  # it cannot say: run each call on its own, and the guilty one times out alone
            self._requeue(task, range(len(task.indices)), waiting, alone=True)
        else:
            self._record(task, task.indices[stuck], Observation.error(
                "timeout", f"the tool call took longer than {timeout:g} s."), results)
            self._requeue(task, [p for p in range(len(task.indices)) if p != stuck], waiting, alone=False)
        if task.executor is self._executors[task.slot]:
            self._counts["restarts"] += 1
            ray.kill(task.executor, no_restart=False)  # unwedge it; Ray re-runs the tasks queued behind
            self._watch_start(task.slot)
            for other in pending.values():
                if other.slot == task.slot:
                    other.deadline = math.inf

    @staticmethod
    def _probe(task: _Task) -> tuple[int, int, float] | None:
        """What the task's executor is running (token, position, seconds), or None if it cannot
        say (idle, dead, or stuck without ever releasing the GIL)."""
        try:
            return ray.get(task.executor.running.remote(), timeout=_PROBE_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            return None

    def _replace(self, slot: int, dead_executor) -> None:
        if self._executors[slot] is not dead_executor:
            return  # already replaced by an earlier failed task of the same executor
        ray.kill(dead_executor, no_restart=True)
        self._executors[slot] = self._spawn()
        self._counts["replacements"] += 1
        self._watch_start(slot)

    def _record(self, task: _Task, index: int, observation: Observation | None, results: list) -> None:
        results[index] = observation
        self._latencies_ms.append((time.monotonic() - task.submitted_at) * 1000)
        self._counts["calls"] += 1
        if observation is not None:
            self._counts["tool_calls"] += 1
            if not observation.ok:
                self._errors[observation.error_kind] += 1

    def _spawn(self):
        config = self.config
        return ToolExecutor.options(
            num_cpus=config.num_cpus_per_executor,
            resources=dict(config.resources) or None,
            max_restarts=config.max_restarts,
            max_task_retries=config.max_restarts,
        ).remote(config.budgets)

    def stats(self) -> dict[str, float]:
        """Flat counters for logging: calls (requests answered), tool_calls (requests with a tool
        call), tasks (Ray tasks submitted), errors and errors/<kind>, restarts/replacements/
        resubmissions, latency in ms (submission to result, queueing included) over the last calls."""
        latencies = np.asarray(self._latencies_ms, dtype=np.float64)
        stats: dict[str, float] = {key: self._counts[key] for key in
                                   ("calls", "tool_calls", "tasks", "restarts", "replacements", "resubmissions")}
        stats["errors"] = sum(self._errors.values())
        stats.update({f"errors/{kind}": count for kind, count in sorted(self._errors.items())})
        if latencies.size:
            stats.update(latency_ms_mean=float(latencies.mean()), latency_ms_p50=float(np.percentile(latencies, 50)),
                         latency_ms_p99=float(np.percentile(latencies, 99)))
        return stats

    def shutdown(self) -> None:
        """Kill this pool's executors (and only them)."""
        for executor in self._executors:
            ray.kill(executor, no_restart=True)
        self._executors = []
