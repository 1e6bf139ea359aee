"""The Ray tool-executor pool: same answers as in-process execution, through executor deaths and
timeouts, with no request lost or duplicated."""
from __future__ import annotations

import json
import operator
import os
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from policies.visual_ops import ImageSource, Observation, PixelBudgets, VideoSource, run_turn

pytestmark = pytest.mark.integration

BUDGETS = PixelBudgets()


def crop_turn(bbox, target=1) -> str:
    call = {"name": "crop_image", "arguments": {"bbox_2d": bbox, "target_image": target}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def assert_same(got: Observation | None, expected: Observation | None) -> None:
    if expected is None:
        assert got is None
        return
    assert (got.ok, got.text, got.error_kind, got.tool_name, got.box_pixels, got.source_size, got.target_image,
            got.frames) == (expected.ok, expected.text, expected.error_kind, expected.tool_name, expected.box_pixels,
                            expected.source_size, expected.target_image, expected.frames)
    for got_images, expected_images in ((got.view_images, expected.view_images),
                                        (got.full_images, expected.full_images)):
        for a, b in zip(got_images, expected_images, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def original() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("pool") / "video.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for index in range(20):
            frame = np.full((120, 160, 3), index * 12, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def pool(ray_cluster):
    from actors.tools import ToolPool, ToolPoolConfig

    tool_pool = ToolPool(ToolPoolConfig(pool_size=2, max_in_flight_per_executor=3, call_timeout_s=4.0, budgets=BUDGETS))
    yield tool_pool
    tool_pool.shutdown()


def crop_batch(ray, original: np.ndarray, size: int) -> tuple[list, list]:
    """`size` crop requests on one object-store copy of `original`; and the same with the array itself."""
    original_ref = ray.put(original)  # put once, shared by every request
    turns = [crop_turn([0.02 * (i % 20), 0.03 * (i % 10), 0.5 + 0.02 * (i % 20), 0.6 + 0.03 * (i % 10)])
             for i in range(size)]
    return [(turn, [original_ref]) for turn in turns], [(turn, [original]) for turn in turns]


def test_batch_matches_in_process_execution(ray_cluster, pool, original, video_path):
    from actors.tools import ToolRequest

    ray = ray_cluster
    original_ref = ray.put(original)
    first_crop = run_turn(crop_turn([0.2, 0.2, 0.6, 0.7]), [original], BUDGETS).full_images[0]
    video = VideoSource.sampled(video_path, 16)
    turns_and_sources = [
        (crop_turn([0.1, 0.1, 0.4, 0.5]), [original]),
        (crop_turn([10, 20, 150, 120]), [original]),  # pixels of the view
        (crop_turn([0, 0, 0.5, 0.5], target=2), [original, first_crop]),
        (crop_turn([0, 0, 1, 1], target=3), [original, first_crop]),  # out of range
        ('<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0, 0, 1, 1]', [original]),  # truncated
        ("The answer is \\boxed{7}.", [original]),  # no tool call
        ('<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [4, 1]}}\n</tool_call>', [video]),
        (crop_turn([0.1, 0.1, 0.4, 0.5]), [ImageSource(b"not an image")]),
    ] * 3
    expected = [run_turn(text, sources, BUDGETS) for text, sources in turns_and_sources]
    # Through the pool the original travels as an object-store reference; tuples work as requests too.
    requests = [ToolRequest(text, [original_ref if s is original else s for s in sources]) if i % 2 else
                (text, [original_ref if s is original else s for s in sources])
                for i, (text, sources) in enumerate(turns_and_sources)]
    before = pool.stats()
    got = pool.run(requests)
    assert len(got) == len(expected)
    for observation, reference in zip(got, expected, strict=True):
        assert_same(observation, reference)
    after = pool.stats()
    assert after["calls"] - before["calls"] == len(requests)
    assert after["tool_calls"] - before["tool_calls"] == sum(e is not None for e in expected)
    assert after["errors"] - before["errors"] == sum(e is not None and not e.ok for e in expected)
    assert after["latency_ms_p50"] <= after["latency_ms_p99"]
    assert after["tasks"] - before["tasks"] < len(requests)  # several calls per Ray task
    assert pool.run([]) == []


def test_a_wedged_call_times_out_and_the_pool_recovers(ray_cluster, pool, original, tmp_path):
    ray = ray_cluster
    fifo = str(tmp_path / "never-written")
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: a stalled file system
    requests, in_process = crop_batch(ray, original, 8)
    requests.insert(1, (crop_turn([0, 0, 1, 1]), [ImageSource(fifo)]))
    in_process.insert(1, (None, None))
    before = pool.stats()
    started = time.monotonic()
    got = pool.run(requests)
    assert got[1].error_kind == "timeout" and got[1].text.startswith("Execution error: ")
    for index, (observation, (text, sources)) in enumerate(zip(got, in_process, strict=True)):
        if index != 1:  # including the calls queued behind the wedged one, re-run after its restart
            assert_same(observation, run_turn(text, sources, BUDGETS))
    after = pool.stats()
    assert after.get("errors/timeout", 0) - before.get("errors/timeout", 0) == 1
    assert after["restarts"] - before["restarts"] == 1
    assert time.monotonic() - started >= 4.0
    # The restarted executor serves the next batch, and the cancelled call is not re-run.
    again, again_in_process = crop_batch(ray, original, 4)
    for observation, (text, sources) in zip(pool.run(again), again_in_process, strict=True):
        assert_same(observation, run_turn(text, sources, BUDGETS))
    assert pool.stats().get("errors/timeout", 0) == after.get("errors/timeout", 0)


def test_a_long_queue_of_healthy_calls_does_not_time_out(ray_cluster, tmp_path):
    """The timeout is for a call that runs too long, not for one that waits behind others: six
    calls of ~0.7 s each (each waits for its pipe to be written) in one task, timeout 2 s."""
    from actors.tools import ToolPool, ToolPoolConfig

    fifos = [str(tmp_path / f"slow-{index}") for index in range(6)]
    for fifo in fifos:
        os.mkfifo(fifo)

    def feed():
        for fifo in fifos:
            time.sleep(0.7)
            with open(fifo, "wb") as pipe:  # blocks until the executor opens it: one call at a time
                pipe.write(b"not an image")

    pool = ToolPool(ToolPoolConfig(pool_size=1, calls_per_task=8, call_timeout_s=2.0, budgets=BUDGETS))
    feeder = threading.Thread(target=feed, daemon=True)
    try:
        feeder.start()
        started = time.monotonic()
        got = pool.run([(crop_turn([0, 0, 1, 1]), [ImageSource(fifo)]) for fifo in fifos])
        elapsed = time.monotonic() - started
        feeder.join(timeout=30)
        assert [observation.error_kind for observation in got] == ["bad_media"] * 6  # ran, none timed out
        assert pool.stats()["restarts"] == 0 and elapsed >= 4.0  # the last ones waited longer than 2 s
    finally:
        pool.shutdown()


class ArrivesBroken:
    """A source that pickles fine but fails to unpickle in the executor: its whole task fails."""

    def __reduce__(self):
        return operator.truediv, (1, 0)


def test_a_task_that_fails_as_a_whole_costs_only_the_guilty_calls(ray_cluster, pool, original):
    ray = ray_cluster
    requests, in_process = crop_batch(ray, original, 6)
    for index in (1, 4):
        requests[index] = (requests[index][0], [ArrivesBroken()])
    before = pool.stats()
    got = pool.run(requests)
    for index, (observation, (text, sources)) in enumerate(zip(got, in_process, strict=True)):
        if index in (1, 4):
            assert observation.error_kind == "executor_failed"
        else:  # shared a task with a broken call, then re-ran on its own
            assert_same(observation, run_turn(text, sources, BUDGETS))
    after = pool.stats()
    assert after["calls"] - before["calls"] == 6 and after["errors"] - before["errors"] == 2
    assert after["resubmissions"] - before["resubmissions"] >= 4  # the broken calls and their task-mates


@pytest.mark.parametrize("max_restarts", [3, 0], ids=["restarted-by-ray", "replaced-by-the-pool"])
def test_an_executor_killed_mid_batch_loses_no_request(ray_cluster, original, max_restarts):
    from actors.tools import ToolPool, ToolPoolConfig

    ray = ray_cluster
    big = np.asarray(Image.fromarray(original).resize((2400, 1800)))  # slower crops: the batch lasts
    # A generous timeout: an executor restarted by Ray on a loaded machine can take tens of seconds
    # to come back (it imports torch), and the pool's clock cannot see that restart.
    pool = ToolPool(ToolPoolConfig(pool_size=2, max_in_flight_per_executor=4, max_restarts=max_restarts,
                                   call_timeout_s=180, budgets=BUDGETS))
    try:
        victim = pool.executors[0]
        victim_pid = ray.get(victim.pid.remote())
        requests, in_process = crop_batch(ray, big, 40)
        busy_at_kill = []

        def kill_when_busy():
            deadline = time.monotonic() + 30
            while pool.in_flight()[0] == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            busy_at_kill.append(pool.in_flight()[0])
            ray.kill(victim, no_restart=False)

        killer = threading.Thread(target=kill_when_busy)
        killer.start()
        got = pool.run(requests)
        killer.join()
        assert busy_at_kill and busy_at_kill[0] > 0  # it died with calls in flight
        assert len(got) == len(requests)
        for observation, (text, sources) in zip(got, in_process, strict=True):
            assert_same(observation, run_turn(text, sources, BUDGETS))
        stats = pool.stats()
        assert stats["calls"] == len(requests) and stats["errors"] == 0  # each answered once, none failed
        if max_restarts:
            assert ray.get(pool.executors[0].pid.remote()) != victim_pid  # same handle, new process
            assert stats["replacements"] == 0
        else:
            assert pool.executors[0] is not victim and stats["replacements"] == 1
            assert stats["resubmissions"] >= 1
    finally:
        pool.shutdown()


def test_returned_images_stay_in_the_object_store_and_serve_later_calls(ray_cluster, pool, original, video_path):
    """Full-resolution crops and frames come back as PooledImage handles, not pixels; used as
    sources they reach the executor by reference, keep their role (the view budget pixel boxes
    refer to), and outlive the executor that made them."""
    from actors.tools import PooledImage, ToolPool, ToolPoolConfig

    ray = ray_cluster
    original_ref = ray.put(original)
    video = VideoSource.sampled(video_path, 16)
    frames_turn = '<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [9, 2]}}\n</tool_call>'
    short_lived = ToolPool(ToolPoolConfig(pool_size=1, budgets=BUDGETS))
    try:
        crop, frames = short_lived.run([(crop_turn([0.2, 0.2, 0.6, 0.7]), [original_ref]), (frames_turn, [video])])
    finally:
        short_lived.shutdown()  # its executor is gone; what it returned is owned by this process
    expected_crop = run_turn(crop_turn([0.2, 0.2, 0.6, 0.7]), [original], BUDGETS)
    expected_frames = run_turn(frames_turn, [video], BUDGETS)
    assert_same(crop, expected_crop)
    assert_same(frames, expected_frames)
    pooled = crop.full_images[0]
    assert isinstance(pooled, PooledImage) and pooled.role == "crop"
    assert pooled.size == expected_crop.full_images[0].size and pooled.load().info["pixelray_role"] == "crop"
    # A crop of an original that went by reference is that reference and the box: no pixels came back.
    assert pooled.ref == original_ref and pooled.index is None and pooled.box == expected_crop.box_pixels
    assert [(f.role, f.size) for f in frames.full_images] == [("frame", (160, 120))] * 2

    crop_view_w, crop_view_h = crop.view_images[0].size
    frame_view_w, frame_view_h = frames.view_images[1].size
    cases = [  # (turn, sources through the pool, the same sources in-process)
        (crop_turn([0, 0, 0.5, 0.5], target=2), [original_ref, pooled], [original, expected_crop.full_images[0]]),
        (crop_turn([0, 0, crop_view_w / 2, crop_view_h / 2], target=2), [original_ref, pooled],
         [original, expected_crop.full_images[0]]),  # pixels of the crop's view
        (crop_turn([0, 0, frame_view_w, frame_view_h], target=2), [video, *frames.full_images],
         [video, *expected_frames.full_images]),  # pixels of the second frame's view: the frame budget
    ]
    got = pool.run([(turn, sources) for turn, sources, _ in cases])
    for observation, (turn, _, in_process) in zip(got, cases, strict=True):
        assert_same(observation, run_turn(turn, in_process, BUDGETS))
    assert got[2].box_pixels == (0, 0, 160, 120)

    # A crop of a crop of a crop: the boxes compose, still by reference to the original.
    second, (second_turn, _, second_sources) = got[0].full_images[0], cases[0]
    expected_second = run_turn(second_turn, second_sources, BUDGETS).full_images[0]
    assert second.ref == original_ref and second.size == expected_second.size
    third_turn = crop_turn([0.3, 0.2, 0.9, 0.8], target=3)
    (third,) = pool.run([(third_turn, [original_ref, pooled, second])])
    assert_same(third, run_turn(third_turn, [original, expected_crop.full_images[0], expected_second], BUDGETS))
    assert third.full_images[0].ref == original_ref
