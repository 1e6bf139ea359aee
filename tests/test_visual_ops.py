"""Executing visual operations: crop semantics, resize rounding, video frames, every error kind,
and a property test that run_turn never raises on generated (including garbage) tool calls."""
from __future__ import annotations

import io
import json
import math

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from policies.protocol import ERROR_KINDS, parse_tool_call
from policies.visual_ops import (
    ROLE_INFO_KEY,
    ImageSource,
    Observation,
    PixelBudgets,
    VideoSource,
    load_video_frames,
    resize_to_budget,
    run_turn,
    sample_frame_indices,
)

BUDGETS = PixelBudgets()
NUM_VIDEO_FRAMES = 40


def coordinate_image(width: int, height: int) -> np.ndarray:
    """Every pixel encodes its own (x, y), so a crop reveals exactly where it was cut."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, (xs // 256) * 16 + ys // 256], axis=-1).astype(np.uint8)


def crop_turn(bbox, target=1) -> str:
    call = {"name": "crop_image", "arguments": {"bbox_2d": bbox, "target_image": target}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def frames_turn(target_frames) -> str:
    call = {"name": "select_frames", "arguments": {"target_frames": target_frames}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def view_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    h, w = smart_resize(height, width, factor=28, min_pixels=BUDGETS.min_pixels, max_pixels=max_pixels)
    return w, h


def ok(observation: Observation | None) -> Observation:
    assert observation is not None and observation.ok, observation and observation.text
    return observation


def error_kind(observation: Observation | None) -> str:
    assert observation is not None and not observation.ok
    assert observation.text.startswith("Execution error: ")
    return observation.error_kind


@pytest.fixture(scope="module")
def original() -> np.ndarray:
    return coordinate_image(1000, 800)


# --- resize --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1000, 800), (31, 17), (4000, 60), (28, 28), (640, 480), (3000, 2000)])
def test_resize_matches_the_qwen_processor(size):
    image = Image.new("RGB", size)
    view = resize_to_budget(image, BUDGETS.min_pixels, BUDGETS.original_max_pixels)
    processor = Qwen2VLImageProcessorPil(size={"shortest_edge": BUDGETS.min_pixels,
                                               "longest_edge": BUDGETS.original_max_pixels})
    _, grid_h, grid_w = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    assert (view.width, view.height) == (grid_w * 14, grid_h * 14)
    # An engine processor with looser bounds leaves the view as it is. (Not always with the SAME
    # bounds: when a side is clamped up to 28 px the view exceeds max_pixels, e.g. 4000x60 ->
    # 1820x28 > 64*784, and a second smart_resize would shrink it again.)
    engine = Qwen2VLImageProcessorPil(size={"shortest_edge": BUDGETS.min_pixels, "longest_edge": 256 * 784})
    _, again_h, again_w = engine(images=[view], return_tensors="np")["image_grid_thw"][0]
    assert (again_w, again_h) == (grid_w, grid_h)


def test_resize_keeps_an_image_that_already_fits():
    image = Image.new("RGB", (224, 196))
    assert resize_to_budget(image, BUDGETS.min_pixels, BUDGETS.original_max_pixels) is image


# --- crop semantics ------------------------------------------------------------------------------

def test_normalized_crop_is_padded_and_cut_from_full_resolution(original):
    observation = ok(run_turn(crop_turn([0.3, 0.4, 0.6, 0.7]), [original], BUDGETS))
    # Widened by 0.1 on each side: x 0.2..0.7 of 1000, y 0.3..0.8 of 800.
    assert observation.box_pixels == (200, 240, 700, 640)
    full = np.asarray(observation.full_images[0])
    np.testing.assert_array_equal(full, original[240:640, 200:700])
    view = observation.view_images[0]
    assert view.size == view_size(500, 400, BUDGETS.crop_max_pixels)
    assert observation.text == f"Here is the cropped image (Image Size: {view.width}x{view.height}):"
    assert (observation.tool_name, observation.target_image, observation.error_kind) == ("crop_image", 1, None)


def test_normalized_box_touching_the_edge_at_one(original):
    observation = ok(run_turn(crop_turn([0.5, 0.5, 1, 1.0]), [original], BUDGETS))
    assert observation.box_pixels == (400, 320, 1000, 800)  # clamped to the image


def test_padding_is_clamped_at_every_edge(original):
    observation = ok(run_turn(crop_turn([0.05, 0.0, 0.95, 0.02]), [original], BUDGETS))
    assert observation.box_pixels == (0, 0, 1000, 96)  # y2: (0.02 + 0.1) * 800


def test_pixel_box_is_relative_to_the_view_the_model_saw(original):
    view_w, view_h = view_size(1000, 800, BUDGETS.original_max_pixels)  # 224 x 196
    by_pixels = ok(run_turn(crop_turn([view_w * 0.3, view_h * 0.4, view_w * 0.6, view_h * 0.7]), [original], BUDGETS))
    normalized = ok(run_turn(crop_turn([0.3, 0.4, 0.6, 0.7]), [original], BUDGETS))
    assert by_pixels.box_pixels == normalized.box_pixels
    whole = ok(run_turn(crop_turn([0, 0, view_w, view_h]), [original], BUDGETS))
    assert whole.box_pixels == (0, 0, 1000, 800)
    assert error_kind(run_turn(crop_turn([0, 0, view_w + 1, view_h]), [original], BUDGETS)) == "box_out_of_range"


def test_target_image_indexes_originals_then_returned_crops(original):
    first = ok(run_turn(crop_turn([0.3, 0.4, 0.6, 0.7]), [original], BUDGETS))
    assert first.full_images[0].info[ROLE_INFO_KEY] == "crop"
    sources = [original, *first.full_images]  # what the rollout does: append the full-res crops
    second = ok(run_turn(crop_turn([0, 0, 0.5, 0.5], target=2), sources, BUDGETS))
    # Box within crop 1 (500x400 at (200, 240)): x 0..0.6 -> 0..300, y 0..0.6 -> 0..240.
    assert second.box_pixels == (0, 0, 300, 240)
    assert (first.source_size, second.source_size) == ((1000, 800), (500, 400))  # the box's own image
    np.testing.assert_array_equal(np.asarray(second.full_images[0]), original[240:480, 200:500])
    # Pixel coordinates on a crop refer to the crop's view (the size its observation text reported).
    crop_view_w, crop_view_h = first.view_images[0].size
    by_pixels = ok(run_turn(crop_turn([0, 0, crop_view_w / 2, crop_view_h / 2], target=2), sources, BUDGETS))
    assert by_pixels.box_pixels == second.box_pixels
    # Index 1 is still the original.
    assert ok(run_turn(crop_turn([0, 0, 1, 1], target=1), sources, BUDGETS)).box_pixels == (0, 0, 1000, 800)
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1], target=3), sources, BUDGETS)) == "target_out_of_range"


def test_every_image_form_gives_the_same_crop(original, tmp_path):
    png = io.BytesIO()
    Image.fromarray(original).save(png, format="PNG")
    path = tmp_path / "original.png"
    path.write_bytes(png.getvalue())
    forms = [original, Image.fromarray(original), png.getvalue(), str(path), path,
             ImageSource(original), ImageSource(Image.fromarray(original).convert("RGBA"))]
    crops = [ok(run_turn(crop_turn([0.1, 0.1, 0.3, 0.2]), [form], BUDGETS)) for form in forms]
    for observation in crops:
        assert observation.box_pixels == (0, 0, 400, 240)
        np.testing.assert_array_equal(np.asarray(observation.full_images[0]), original[0:240, 0:400])


def test_an_explicit_role_selects_the_view_budget():
    image = coordinate_image(600, 600)
    budgets = PixelBudgets(original_max_pixels=64 * 784, crop_max_pixels=16 * 784)
    for role, max_pixels in (("original", 64 * 784), ("crop", 16 * 784)):
        view_w, view_h = view_size(600, 600, max_pixels)
        whole = run_turn(crop_turn([0, 0, view_w, view_h]), [ImageSource(image, role=role)], budgets)
        assert ok(whole).box_pixels == (0, 0, 600, 600)


def test_crop_too_small_boundary():
    image = coordinate_image(100, 100)
    # x: (0.3 - 0.1) * 100 = 20 .. (0.38 + 0.1) * 100 = 48 -> 28 px, not above 28.
    assert error_kind(run_turn(crop_turn([0.3, 0.3, 0.38, 0.6]), [image], BUDGETS)) == "crop_too_small"
    assert ok(run_turn(crop_turn([0.3, 0.3, 0.39, 0.6]), [image], BUDGETS)).box_pixels == (20, 20, 49, 70)


def test_extremely_elongated_crop_is_a_bad_box():
    image = coordinate_image(6100, 140)
    assert error_kind(run_turn(crop_turn([0, 0.4, 1, 0.41]), [image], BUDGETS)) == "bad_box"


# --- errors --------------------------------------------------------------------------------------

def test_parse_errors_become_error_observations(original):
    observation = run_turn(crop_turn([0.5, 0, 0.2, 1]), [original], BUDGETS)
    assert error_kind(observation) == "bad_box" and observation.tool_name == "crop_image"
    assert observation.view_images == [] and observation.full_images == []


def test_final_answer_gives_no_observation(original):
    assert run_turn("So the answer is \\boxed{cat}.", [original], BUDGETS) is None


@pytest.mark.parametrize("source", [
    b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,  # a corrupt PNG
    b"plain text, not an image",  # unsupported format
    "/nonexistent/image.png",
    np.zeros((10, 10), np.uint8),  # not HxWx3
    np.zeros((10, 10, 3), np.float32),
    ImageSource(b"GIF89a broken"),
])
def test_undecodable_images_are_bad_media(source):
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1]), [source], BUDGETS)) == "bad_media"


def test_truncated_image_file_is_bad_media(original):
    jpeg = io.BytesIO()
    Image.fromarray(original).save(jpeg, format="JPEG")
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1]), [truncated], BUDGETS)) == "bad_media"


def test_unsupported_source_type_is_bad_media():
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1]), [{"image": "x.png"}], BUDGETS)) == "bad_media"


def test_decompression_bomb_is_bad_media(monkeypatch):
    png = io.BytesIO()
    Image.new("RGB", (400, 400)).save(png, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)  # > 2x the limit raises DecompressionBombError
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1]), [png.getvalue()], BUDGETS)) == "bad_media"


def test_select_frames_on_an_image(original):
    observation = run_turn(frames_turn([1, 2]), [original], BUDGETS)
    assert error_kind(observation) == "frames_on_image"
    assert (observation.tool_name, observation.frames) == ("select_frames", [1, 2])


def test_crop_with_only_a_video_has_no_target(video_path):
    assert error_kind(run_turn(crop_turn([0, 0, 1, 1]), [VideoSource.sampled(video_path)], BUDGETS)) \
        == "target_out_of_range"


def test_error_observation_rejects_unknown_kinds():
    with pytest.raises(ValueError):
        Observation.error("oops", "message")


# --- video ---------------------------------------------------------------------------------------

def frame_colour(index: int) -> tuple[int, int, int]:
    return (index * 6, 255 - index * 6, (index * 37) % 256)


def write_colour_video(path: str, num_frames: int, offset: int = 0, codec: str = "mpeg4") -> str:
    """A video (container from the path's extension) whose frame i is a solid, distinct colour:
    frame_colour(i + offset)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = 320, 240
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"  # MJPEG takes full-range YUV only
        for index in range(num_frames):
            pixels = np.empty((240, 320, 3), np.uint8)
            pixels[:] = frame_colour(index + offset)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    """A 40-frame mp4 whose frame i is a solid, distinct colour."""
    return write_colour_video(str(tmp_path_factory.mktemp("video") / "colours.mp4"), NUM_VIDEO_FRAMES)


def nearest_frame(image: Image.Image) -> int:
    mean = np.asarray(image, np.float64).reshape(-1, 3).mean(axis=0)
    return int(np.argmin([np.abs(mean - frame_colour(i)).sum() for i in range(NUM_VIDEO_FRAMES)]))


def test_sampling_is_uniform_over_the_whole_video():
    assert sample_frame_indices(40, 16) == tuple(int(i) for i in np.linspace(0, 39, 16).round())
    assert sample_frame_indices(40, 16)[0] == 0 and sample_frame_indices(40, 16)[-1] == 39
    assert sample_frame_indices(3, 5) == (0, 0, 1, 2, 2)


def test_select_frames_returns_the_matching_frames(video_path):
    video = VideoSource.sampled(video_path, BUDGETS.num_video_frames)
    assert video.frame_indices == sample_frame_indices(NUM_VIDEO_FRAMES, 16)
    chosen = [16, 1, 8]
    observation = ok(run_turn(frames_turn(chosen), [video], BUDGETS))
    assert observation.text == "Here are the selected frames (Frame Numbers: 16, 1, 8):"
    assert observation.frames == chosen and observation.tool_name == "select_frames"
    assert [nearest_frame(frame) for frame in observation.full_images] == [video.frame_indices[k - 1] for k in chosen]
    assert all(frame.size == (320, 240) and frame.info[ROLE_INFO_KEY] == "frame" for frame in observation.full_images)
    assert all(view.size == view_size(320, 240, BUDGETS.frame_max_pixels) for view in observation.view_images)
    # A returned frame becomes an image the model can crop; its pixel frame is the frame budget's view.
    frame_view_w, frame_view_h = observation.view_images[0].size
    cropped = run_turn(crop_turn([0, 0, frame_view_w, frame_view_h], target=1), [video, *observation.full_images],
                       BUDGETS)
    assert ok(cropped).box_pixels == (0, 0, 320, 240)


@pytest.mark.parametrize("name, codec", [("colours.webm", "libvpx"), ("colours.avi", "mpeg4"),
                                         ("colours.avi", "mjpeg")])
def test_webm_and_avi_videos(tmp_path, name, codec):
    path = write_colour_video(str(tmp_path / name), NUM_VIDEO_FRAMES, codec=codec)
    video = VideoSource.sampled(path, BUDGETS.num_video_frames)
    assert video.frame_indices == sample_frame_indices(NUM_VIDEO_FRAMES, 16)
    observation = ok(run_turn(frames_turn([16, 1, 8]), [video], BUDGETS))
    assert [nearest_frame(frame) for frame in observation.full_images] == [video.frame_indices[k - 1] for k in (16, 1, 8)]


def test_video_from_bytes(video_path):
    with open(video_path, "rb") as file:
        video = VideoSource.sampled(file.read(), 16)
    observation = ok(run_turn(frames_turn([2]), [video], BUDGETS))
    assert nearest_frame(observation.full_images[0]) == video.frame_indices[1]


def test_only_the_chosen_frames_are_decoded(video_path, monkeypatch):
    """A long video is never decoded whole: the one decoding call asks for the chosen frames only."""
    import collections

    import decord

    from policies import visual_ops

    real_reader, requested = decord.VideoReader, []

    class SpyReader:  # exposes only what reading the length and decoding chosen frames needs
        def __init__(self, *args, **kwargs):
            self._reader = real_reader(*args, **kwargs)

        def __len__(self):
            return len(self._reader)

        def get_batch(self, indices):
            requested.append(list(indices))
            return self._reader.get_batch(indices)

    monkeypatch.setattr(decord, "VideoReader", SpyReader)
    monkeypatch.setattr(visual_ops, "_readers", collections.OrderedDict())  # no reader from earlier tests
    video = VideoSource.sampled(video_path, 16)
    assert requested == []  # sampling reads the frame count and decodes nothing
    observation = ok(run_turn(frames_turn([16, 1, 8]), [video], BUDGETS))
    chosen = [video.frame_indices[k - 1] for k in (16, 1, 8)]
    assert requested == [sorted(chosen)]  # once, in increasing order
    assert [nearest_frame(frame) for frame in observation.full_images] == chosen  # returned in the order asked


def test_reused_readers_return_the_right_frames(video_path, tmp_path):
    """Readers are cached per file; seeking back and forth on a reused reader stays exact, and a
    file rewritten at the same path is read anew."""
    rng = np.random.default_rng(0)
    for _ in range(6):
        indices = [int(i) for i in rng.choice(NUM_VIDEO_FRAMES, size=4, replace=False)]
        assert [nearest_frame(frame) for frame in load_video_frames(video_path, indices)] == indices
    path = str(tmp_path / "rewritten.mp4")
    write_colour_video(path, 40)
    assert [nearest_frame(frame) for frame in load_video_frames(path, [39, 5])] == [39, 5]
    write_colour_video(path, 12, offset=20)  # frame i now shows colour i + 20
    assert [nearest_frame(frame) for frame in load_video_frames(path, [11, 0])] == [31, 20]


def test_frame_number_beyond_the_frames_shown(video_path):
    video = VideoSource.sampled(video_path, 16)
    assert error_kind(run_turn(frames_turn([17]), [video], BUDGETS)) == "frames_out_of_range"


@pytest.mark.parametrize("video", [b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "/nonexistent/video.mp4"])
def test_corrupt_or_missing_video_is_bad_media(video):
    source = VideoSource(video, frame_indices=tuple(range(16)))
    assert error_kind(run_turn(frames_turn([1]), [source], BUDGETS)) == "bad_media"


def test_frame_index_beyond_the_video_is_bad_media(video_path):
    source = VideoSource(video_path, frame_indices=(0, 10_000))
    assert error_kind(run_turn(frames_turn([2]), [source], BUDGETS)) == "bad_media"


# --- property: never raises, always well-formed ---------------------------------------------------

PROPERTY_IMAGE = coordinate_image(300, 200)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1), st.floats(0, 400),
    st.integers(-10, 400), st.integers(min_value=-(10**400), max_value=10**400), st.booleans(), st.none(),
    st.text(max_size=3),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
TOOL_NAMES = st.sampled_from(["crop_image", "crop_image_normalized", "select_frames", "zoom", ""])


@st.composite
def ordered_boxes(draw, coordinates) -> list:
    x1, x2 = sorted((draw(coordinates), draw(coordinates)))
    y1, y2 = sorted((draw(coordinates), draw(coordinates)))
    return [x1, y1, x2, y2]


@st.composite
def valid_normalized_boxes(draw) -> list:
    x1, y1 = draw(st.floats(0, 0.9)), draw(st.floats(0, 0.9))
    return [x1, y1, draw(st.floats(x1 + 0.05, 1)), draw(st.floats(y1 + 0.05, 1))]


BOXES = st.one_of(
    valid_normalized_boxes(),
    ordered_boxes(st.floats(0, 1)),  # normalized, often degenerate
    ordered_boxes(st.integers(0, 300)),  # pixels of the views (original view is 252x168 here)
    ordered_boxes(st.floats(0, 1e6) | st.floats(-1, 2)),
    st.lists(NUMBERS, min_size=3, max_size=5),  # garbage
)
FRAME_LISTS = st.one_of(
    st.lists(st.integers(1, 16), min_size=1, max_size=8, unique=True),  # mostly valid
    st.lists(st.integers(-2, 20), max_size=10),
    JSON_VALUES,
)


@st.composite
def tool_call_texts(draw) -> str:
    """Turn texts: well-formed calls with random values, random JSON shapes, and plain garbage."""
    shape = draw(st.sampled_from(["crop", "crop", "frames", "json", "garbage"]))
    if shape == "crop":
        name = draw(st.sampled_from(["crop_image"] * 4 + ["crop_image_normalized", "select_frames", "zoom"]))
        well_typed = draw(st.integers(0, 4)) > 0  # most calls are plausible, the rest wrongly typed
        target = draw(st.integers(1, 3)) if well_typed else draw(NUMBERS)
        arguments = {"bbox_2d": draw(BOXES), "target_image": target}
        payload = json.dumps({"name": name, "arguments": arguments})
    elif shape == "frames":
        name = draw(st.sampled_from(["select_frames"] * 4 + ["crop_image"]))
        payload = json.dumps({"name": name, "arguments": {"target_frames": draw(FRAME_LISTS)}})
    elif shape == "json":
        payload = json.dumps(draw(JSON_VALUES))
    else:
        payload = draw(st.text(max_size=60))
    if shape == "garbage" and draw(st.booleans()):
        return payload  # no block at all (or a stray tag inside the text)
    closing = draw(st.sampled_from(["\n</tool_call>", "\n</tool_call>", "", "</tool_call> trailing text"]))
    prefix = draw(st.sampled_from(["", "Let me look closer. ", "<tool_call>{}</tool_call>", "</tool_call>"]))
    return prefix + "<tool_call>\n" + payload + closing


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=tool_call_texts(), with_video=st.booleans())
def test_run_turn_never_raises_and_is_well_formed(text, with_video, sampled_video):
    crop_source = Image.fromarray(PROPERTY_IMAGE[20:180, 50:250])
    crop_source.info[ROLE_INFO_KEY] = "crop"
    sources = [PROPERTY_IMAGE, crop_source] + ([sampled_video] if with_video else [])
    observation = run_turn(text, sources, BUDGETS)
    if observation is None:
        assert parse_tool_call(text) is None
        return
    assert isinstance(observation, Observation) and isinstance(observation.text, str)
    assert observation.ok == (observation.error_kind is None)
    if not observation.ok:
        assert observation.error_kind in ERROR_KINDS and observation.error_kind != "internal_error"
        assert observation.text.startswith("Execution error: ")
        assert observation.view_images == [] and observation.full_images == []
        return
    assert len(observation.view_images) == len(observation.full_images) >= 1
    for view in observation.view_images:
        assert view.width % 28 == 0 and view.height % 28 == 0
    if observation.tool_name == "crop_image":
        target_w, target_h = [(300, 200), crop_source.size][observation.target_image - 1]
        left, top, right, bottom = observation.box_pixels
        assert 0 <= left < right <= target_w and 0 <= top < bottom <= target_h
        assert observation.full_images[0].size == (right - left, bottom - top)
        assert math.prod(observation.view_images[0].size) <= BUDGETS.crop_max_pixels
    else:
        assert observation.tool_name == "select_frames" and len(observation.frames) <= 8


@pytest.fixture(scope="module")
def sampled_video(video_path) -> VideoSource:
    return VideoSource.sampled(video_path, 16)
