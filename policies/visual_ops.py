"""Executing visual operations (crop an image, select video frames) on the conversation's sources.

Two sizes exist for every image. The FULL-RESOLUTION source is what the tools cut from: a crop is
taken from the original pixels, never from the downsampled copy the model saw, so zooming in
really adds detail. The VIEW is the source resized to its pixel budget (`resize_to_budget`, the
Qwen processor's own rounding): what the model sees, and the reference frame for pixel
coordinates (below).

Pixel-coordinate reference frame (a decision): a `bbox_2d` in pixels is relative to the VIEW of
the target image, i.e. the image as the model saw it. That is the size the crop observation text
reports ("Image Size: WxH") and the frame Qwen2.5-VL grounds absolute coordinates in (its
coordinates live in the resized input). The view size is recomputed from the source's full-res
size and its role's budget (original / crop / frame), so the tools never need the view itself.

Image numbering: `target_image` is 1-indexed over the IMAGE items of `sources` in order (video
sources are skipped): the original image(s), then every image a tool returned. Appending an
`Observation.full_images` list to `sources` keeps the numbering right.

Never raises for bad input: `run_turn` turns every failure (malformed call, corrupt media, PIL's
DecompressionBombError, an unexpected bug) into an error `Observation`.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from policies.protocol import (
    CROP_TOOL,
    ERROR_KINDS,
    SELECT_FRAMES_TOOL,
    CropCall,
    SelectFramesCall,
    ToolCallError,
    format_crop_text,
    format_error_text,
    format_frames_text,
    parse_tool_call,
)

CROP_PADDING = 0.1  # each side of a crop box is widened by this much (normalized units)
MIN_CROP_SIDE = 28  # a crop must be MORE than this many full-res pixels wide and high
_EDGE_EPSILON = 1e-9  # keeps float noise (0.7 * 10 = 7.000000000000001) from adding a pixel

ImageRole = Literal["original", "crop", "frame"]
# Bare PIL images returned by the tools carry their role here (PIL keeps `info` through pickling),
# so a caller can append `full_images` to its sources as they are.
ROLE_INFO_KEY = "pixelray_role"


class PixelBudgets(BaseModel):
    """Pixel budgets per kind of image, in pixels (one visual token = 28x28 pixels).

    Defaults suit the tiny CPU model. The paper's values, in tokens: original 4..2000 in training
    (256..8000 in evaluation), crop at most 1000 (5120 in evaluation), selected frame at most 400,
    N = 16 frames shown per video. E.g. `PixelBudgets(min_pixels=4*784, original_max_pixels=2000*784,
    crop_max_pixels=1000*784, frame_max_pixels=400*784)`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_pixels: int = Field(default=4 * 28 * 28, gt=0)
    original_max_pixels: int = Field(default=64 * 28 * 28, gt=0)
    crop_max_pixels: int = Field(default=64 * 28 * 28, gt=0)
    frame_max_pixels: int = Field(default=16 * 28 * 28, gt=0)
    num_video_frames: int = Field(default=16, gt=0)
    patch_factor: int = Field(default=28, gt=0)

    def max_pixels_for(self, role: ImageRole) -> int:
        budgets = {"original": self.original_max_pixels, "crop": self.crop_max_pixels, "frame": self.frame_max_pixels}
        return budgets[role]


@functools.cache
def _smart_resize():
    """transformers' Qwen2-VL rounding, imported on first use (it pulls in torch: ~5 s, ~0.5 GB),
    so importing this module for its types stays cheap."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize


PIL_BLOCKS_KEPT = 32  # freed image blocks PIL keeps for reuse in a process that runs the tools


def preload() -> None:
    """Prepare this process to run the tools: import the heavy dependencies now (executors call
    this at start, not in their first call), and let PIL keep freed image memory for reuse. By
    default PIL returns every image's memory to the OS, so each crop, resize and decoded frame
    faults in fresh pages: ~20 % of a crop's CPU time. Kept blocks are at most 16 MB each."""
    _smart_resize()
    import decord  # noqa: F401

    Image.core.set_blocks_max(max(Image.core.get_blocks_max(), PIL_BLOCKS_KEPT))
    _keep_large_allocations()


_MALLOC_MMAP_BYTES = 32 << 20  # glibc's ceiling for the mmap threshold
_MALLOC_TRIM_BYTES = 128 << 20


def _keep_large_allocations() -> None:
    """Serve image-sized allocations (MBs: crops, views, decoded frames) from malloc's heap and keep
    up to 128 MB of it free for reuse, instead of a fresh mmap per allocation whose pages fault in
    one by one. glibc raises its mmap threshold by itself once a large block is freed, but not in
    a process whose image memory PIL recycles (its cached blocks are realloc'ed, never freed), as
    in a tool executor (150-200 page faults per crop there, ~0 with this). No-op off glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, _MALLOC_MMAP_BYTES)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, _MALLOC_TRIM_BYTES)  # M_TRIM_THRESHOLD


def resize_to_budget(image: Image.Image, min_pixels: int, max_pixels: int, factor: int = 28) -> Image.Image:
    """Resize to the size the Qwen2-VL / 2.5-VL processor would use (transformers' `smart_resize`):
    both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.
    Returns `image` itself when it already has that size. Raises ValueError for an aspect
    ratio above 200 (as the processor does)."""
    height, width = _smart_resize()(image.height, image.width, factor=factor, min_pixels=min_pixels,
                                    max_pixels=max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)  # the processor's resample


ImageLike = Image.Image | np.ndarray | bytes | str | os.PathLike


@dataclass(frozen=True)
class ImageSource:
    """A full-resolution image: a PIL image, an HxWx3 uint8 array (zero-copy from Ray's object
    store), encoded bytes, or a file path. Decoded lazily, so corrupt data becomes an error
    observation in the executor rather than a crash in the caller."""

    image: ImageLike
    role: ImageRole = "original"  # selects the budget of the view the model saw


@dataclass(frozen=True)
class VideoSource:
    """A video (path or encoded bytes) and the frame indices, in the video's own numbering, of the
    N frames shown to the model: `select_frames` number k means `frame_indices[k - 1]`. A video
    given as its frames (a dataset's frame folder) is a tuple of image files (paths or encoded
    bytes), indexed the same way."""

    video: str | os.PathLike | bytes | tuple[str | os.PathLike | bytes, ...]
    frame_indices: tuple[int, ...]

    @classmethod
    def sampled(cls, video: str | os.PathLike | bytes, num_frames: int = 16) -> VideoSource:
        """Uniform sampling over the whole video; opens the container, decodes nothing."""
        if isinstance(video, (list, tuple)):
            return cls(tuple(video), sample_frame_indices(len(video), num_frames))
        with _video_reader(video) as reader:
            total = len(reader)
        return cls(video, sample_frame_indices(total, num_frames))


Source = ImageSource | VideoSource | ImageLike


def sample_frame_indices(total_frames: int, num_frames: int) -> tuple[int, ...]:
    """`num_frames` indices spread evenly from the first to the last frame (Qwen's sampling;
    indices repeat when the video is shorter than `num_frames`)."""
    if total_frames <= 0:
        raise ValueError("the video has no frames")
    return tuple(int(i) for i in np.linspace(0, total_frames - 1, num_frames).round())


def load_video_frames(video: str | os.PathLike | bytes | Sequence, indices: Sequence[int]) -> list[Image.Image]:
    """Decode only the frames at `indices`, full resolution, in the order given. The video is never
    decoded whole: decord's `get_batch` seeks to the keyframe before each requested frame and
    decodes from there; the indices are asked for once each, in increasing order, so frames of
    the same group of pictures are decoded in one pass. A video given as a tuple of frame files
    (paths or encoded bytes) opens only the files at `indices`."""
    if isinstance(video, (list, tuple)):
        return [_open_frame(video[int(i)]) for i in indices]
    wanted = sorted(set(int(i) for i in indices))
    with _video_reader(video) as reader:
        frames = reader.get_batch(wanted).asnumpy()
    position = {index: k for k, index in enumerate(wanted)}
    return [Image.fromarray(frames[position[int(i)]]) for i in indices]


def _open_frame(item: str | os.PathLike | bytes) -> Image.Image:
    with Image.open(io.BytesIO(item) if isinstance(item, bytes) else item) as image:
        return image.convert("RGB")


_READER_CACHE_SIZE = 4  # open readers kept per process, for videos given as file paths
_readers: collections.OrderedDict[tuple, object] = collections.OrderedDict()
_readers_lock = threading.Lock()


@contextlib.contextmanager
def _video_reader(video: str | os.PathLike | bytes):
    """A decord VideoReader of `video`. Opening one demuxes the whole container to index its frames
    (about 10 ms for 16 s of video, a tenth of a select_frames call), so readers of files are
    reused: keyed by path, size and modification time, lent to one caller at a time (thread-safe),
    and dropped if a call on them fails. Readers of in-memory bytes are not cached."""
    import decord  # lazy: image-only users need not have it

    if isinstance(video, bytes):
        yield decord.VideoReader(io.BytesIO(video), ctx=decord.cpu(0), num_threads=1)
        return
    path = os.fspath(video)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _readers_lock:
        reader = _readers.pop(key, None)
    if reader is None:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    yield reader  # an exception here skips the rest: a reader that failed is not reused
    with _readers_lock:
        _readers[key] = reader
        while len(_readers) > _READER_CACHE_SIZE:
            _readers.popitem(last=False)


@dataclass
class Observation:
    """What a tool call produced: the text and images of the next user turn, plus diagnostics."""

    ok: bool
    text: str  # the observation text shown to the model (precedes the images)
    view_images: list[Image.Image] = field(default_factory=list)  # resized to budget: what the model sees next
    full_images: list[Image.Image] = field(default_factory=list)  # full-res; append to the sources
    # (from an actors.tools.ToolPool: PooledImage handles, left in the object store)
    error_kind: str | None = None  # one of protocol.ERROR_KINDS when not ok
    tool_name: str | None = None  # canonical name (crop_image / select_frames) once known
    box_pixels: tuple[int, int, int, int] | None = None  # crop box in the target's full-res pixels
    source_size: tuple[int, int] | None = None  # (width, height) of the target the box is in
    target_image: int | None = None
    frames: list[int] | None = None

    @classmethod
    def error(cls, kind: str, message: str, tool_name: str | None = None, target_image: int | None = None,
              frames: list[int] | None = None) -> Observation:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        return cls(ok=False, text=format_error_text(message), error_kind=kind,
                   tool_name=tool_name, target_image=target_image, frames=frames)


class _ToolFailure(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def run_turn(turn_text: str, sources: Sequence[Source], budgets: PixelBudgets) -> Observation | None:
    """Parse the turn's last tool call and execute it. None when the turn has no tool call.
    Never raises."""
    try:
        call = parse_tool_call(turn_text)
    except Exception as exc:  # a parser bug must not kill a rollout
        return Observation.error("internal_error", f"the tool call could not be read ({type(exc).__name__}).")
    if call is None:
        return None
    return execute(call, sources, budgets)


def execute(call: CropCall | SelectFramesCall | ToolCallError, sources: Sequence[Source],
            budgets: PixelBudgets) -> Observation:
    """Execute a parsed call against the conversation's sources. Never raises."""
    if isinstance(call, ToolCallError):
        return Observation.error(call.kind, call.message, call.tool_name)
    is_crop = isinstance(call, CropCall)
    context = dict(tool_name=CROP_TOOL, target_image=call.target_image) if is_crop else dict(
        tool_name=SELECT_FRAMES_TOOL, frames=list(call.target_frames))
    try:
        return _crop(call, sources, budgets) if is_crop else _select_frames(call, sources, budgets)
    except _ToolFailure as failure:
        return Observation.error(failure.kind, failure.message, **context)
    except Exception as exc:  # a bug, reported to the model and the counters instead of raised
        return Observation.error("internal_error", f"the tool failed ({type(exc).__name__}).", **context)


def _crop(call: CropCall, sources: Sequence[Source], budgets: PixelBudgets) -> Observation:
    images = _image_items(sources)
    if call.target_image > len(images):
        raise _ToolFailure("target_out_of_range",
                           f"target_image {call.target_image} does not exist: there are {len(images)} image(s).")
    item, role = images[call.target_image - 1]
    pixels = _decode_image(item)
    full_width, full_height = _size(pixels)
    try:
        view_height, view_width = _smart_resize()(full_height, full_width, factor=budgets.patch_factor,
                                               min_pixels=budgets.min_pixels, max_pixels=budgets.max_pixels_for(role))
    except (ValueError, ZeroDivisionError) as exc:
        raise _ToolFailure("bad_media", f"image {call.target_image} has an unusable size ({exc}).") from None
    x1, y1, x2, y2 = call.bbox_2d
    if not call.is_normalized:
        if x2 > view_width or y2 > view_height:
            raise _ToolFailure("box_out_of_range", f"bbox_2d exceeds image {call.target_image}, which is "
                                                   f"{view_width}x{view_height} pixels.")
        x1, x2, y1, y2 = x1 / view_width, x2 / view_width, y1 / view_height, y2 / view_height
    left = math.floor(max(0.0, x1 - CROP_PADDING) * full_width + _EDGE_EPSILON)
    top = math.floor(max(0.0, y1 - CROP_PADDING) * full_height + _EDGE_EPSILON)
    right = math.ceil(min(1.0, x2 + CROP_PADDING) * full_width - _EDGE_EPSILON)
    bottom = math.ceil(min(1.0, y2 + CROP_PADDING) * full_height - _EDGE_EPSILON)
    left, top = max(0, left), max(0, top)
    right, bottom = min(full_width, right), min(full_height, bottom)
    if right - left <= MIN_CROP_SIDE or bottom - top <= MIN_CROP_SIDE:
        raise _ToolFailure("crop_too_small", f"the crop is {right - left}x{bottom - top} pixels; both sides must "
                                             f"exceed {MIN_CROP_SIDE}. Choose a larger region.")
    crop = _cut(pixels, (left, top, right, bottom))
    try:
        view = resize_to_budget(crop, budgets.min_pixels, budgets.crop_max_pixels, budgets.patch_factor)
    except ValueError:
        raise _ToolFailure("bad_box", "the crop is too elongated (aspect ratio above 200).") from None
    crop.info[ROLE_INFO_KEY] = "crop"
    view = view.copy() if view is crop else view
    view.info.pop(ROLE_INFO_KEY, None)
    return Observation(ok=True, text=format_crop_text(view.width, view.height), view_images=[view],
                       full_images=[crop], tool_name=CROP_TOOL, box_pixels=(left, top, right, bottom),
                       source_size=(full_width, full_height), target_image=call.target_image)


def _select_frames(call: SelectFramesCall, sources: Sequence[Source], budgets: PixelBudgets) -> Observation:
    videos = [item for item in sources if isinstance(item, VideoSource)]
    if not videos:
        raise _ToolFailure("frames_on_image", "select_frames needs a video; this conversation has only images.")
    video = videos[0]  # the conversation's video (the paper has one per question)
    shown = len(video.frame_indices)
    if max(call.target_frames) > shown:
        raise _ToolFailure("frames_out_of_range", f"frame numbers go from 1 to {shown}.")
    try:
        fulls = load_video_frames(video.video, [video.frame_indices[f - 1] for f in call.target_frames])
    except Exception as exc:  # decord raises RuntimeError (DECORDError) for corrupt or missing files
        raise _ToolFailure("bad_media", f"the video cannot be decoded ({type(exc).__name__}).") from None
    views = []
    for frame in fulls:
        try:
            views.append(resize_to_budget(frame, budgets.min_pixels, budgets.frame_max_pixels, budgets.patch_factor))
        except (ValueError, ZeroDivisionError) as exc:
            raise _ToolFailure("bad_media", f"the video frames have an unusable size ({exc}).") from None
        views[-1] = views[-1].copy() if views[-1] is frame else views[-1]
        frame.info[ROLE_INFO_KEY] = "frame"
    return Observation(ok=True, text=format_frames_text(call.target_frames), view_images=views, full_images=fulls,
                       tool_name=SELECT_FRAMES_TOOL, frames=list(call.target_frames))


def _image_items(sources: Sequence[Source]) -> list[tuple[ImageLike, ImageRole]]:
    """The image items of the conversation with their roles. A bare image's role is its
    ROLE_INFO_KEY tag if it is a tagged PIL image, else "original" for the first image and
    "crop" for later ones (the order of a single-image conversation)."""
    images: list[tuple[ImageLike, ImageRole]] = []
    for item in sources:
        if isinstance(item, VideoSource):
            continue
        if isinstance(item, ImageSource):
            images.append((item.image, item.role))
            continue
        if not isinstance(item, (Image.Image, np.ndarray, bytes, str, os.PathLike)):
            raise _ToolFailure("bad_media", f"unsupported source of type {type(item).__name__}.")
        tagged = item.info.get(ROLE_INFO_KEY) if isinstance(item, Image.Image) else None
        role = tagged if tagged in ("original", "crop", "frame") else ("crop" if images else "original")
        images.append((item, role))
    return images


def _decode_image(item: ImageLike) -> Image.Image | np.ndarray:
    """The full-res RGB pixels: a PIL image, or the array itself (cropped by slicing, no copy)."""
    try:
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise ValueError(f"expected an HxWx3 uint8 array, got {item.dtype} {item.shape}")
            return item
        if isinstance(item, Image.Image):
            image = item
        else:
            image = Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)
            image.load()  # decode now, so a truncated file fails here and not half-way through a crop
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # UnidentifiedImageError, truncated files, DecompressionBombError, ...
        raise _ToolFailure("bad_media", f"the image cannot be decoded ({type(exc).__name__}).") from None


def _size(pixels: Image.Image | np.ndarray) -> tuple[int, int]:
    return (pixels.shape[1], pixels.shape[0]) if isinstance(pixels, np.ndarray) else pixels.size


def _cut(pixels: Image.Image | np.ndarray, box: tuple[int, int, int, int]) -> Image.Image:
    left, top, right, bottom = box
    if isinstance(pixels, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(pixels[top:bottom, left:right]))
    return pixels.crop(box)
