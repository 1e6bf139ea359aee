"""Pictures of trajectories, for people who would rather look than read: the image the model saw
with every crop drawn as a box and each crop beside it (for a video, its frames as a numbered
contact sheet with the selected ones framed), and the reasoning text underneath."""
from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw

from policies.trajectory import Trajectory

BOX_COLOURS = ((255, 60, 60), (60, 200, 255), (255, 220, 40), (160, 255, 90))


def trajectory_picture(trajectory: Trajectory, text_width: int = 100, max_text_lines: int = 40) -> Image.Image:
    """One PNG-ready picture of a trajectory: its pixels above, its text below."""
    panel = _video_panel(trajectory) if trajectory.is_video else _image_panel(trajectory)
    lines = []
    for paragraph in trajectory.response_text.splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, text_width) or [""])
    header = (f"{trajectory.qid} #{trajectory.sample_index}  policy v{trajectory.policy_version}  "
              f"rewards {', '.join(f'{k} {v:.3f}' for k, v in trajectory.rewards.items() if isinstance(v, float))}")
    lines = [header, f"gold: {', '.join(trajectory.answers)}  finish: {trajectory.finish_reason}", ""] + lines
    lines = lines[:max_text_lines]
    line_height = 14
    canvas = Image.new("RGB", (max(panel.width, 8 * text_width), panel.height + 10 + line_height * len(lines)),
                       (255, 255, 255))
    canvas.paste(panel, (0, 0))
    text = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        text.text((4, panel.height + 6 + row * line_height), line, fill=(0, 0, 0))
    return canvas


def _image_panel(trajectory: Trajectory) -> Image.Image:
    """The prompt image with every crop drawn as a numbered box, the returned crops beside it."""
    view = Image.fromarray(trajectory.images[0]).convert("RGB")
    original_size = trajectory.metadata.get("original_size", view.size)
    scale_x, scale_y = view.width / original_size[0], view.height / original_size[1]
    scale = max(1, 320 // max(view.width, 1))  # tiny views are blown up so the boxes can be seen
    shown = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(shown)
    for index, operation in enumerate(trajectory.visual_operations):
        if operation.ok and operation.box_pixels and operation.target_image == 1:
            x0, y0, x1, y1 = operation.box_pixels
            box = [x0 * scale_x * scale, y0 * scale_y * scale, x1 * scale_x * scale, y1 * scale_y * scale]
            colour = BOX_COLOURS[index % len(BOX_COLOURS)]
            draw.rectangle(box, outline=colour, width=3)
            draw.text((box[0] + 4, box[1] + 2), str(index + 1), fill=colour)
    crops = [Image.fromarray(image).convert("RGB") for image in trajectory.images[1:]]
    crop_height = shown.height // max(len(crops), 1) if crops else 0
    crops = [c.resize((max(1, c.width * crop_height // max(c.height, 1)), crop_height)) for c in crops]
    panel = Image.new("RGB", (shown.width + 10 + max((c.width for c in crops), default=0), shown.height),
                      (255, 255, 255))
    panel.paste(shown, (0, 0))
    y = 0
    for crop in crops:
        panel.paste(crop, (shown.width + 10, y))
        y += crop.height
    return panel


def _video_panel(trajectory: Trajectory, thumb_height: int = 96, per_row: int = 8) -> Image.Image:
    """The prompt's frames as a numbered contact sheet; each frame a select_frames call picked is
    framed in that call's colour (the returned frames are those same frames again)."""
    shown = trajectory.metadata.get("num_frames", len(trajectory.images))
    frames = [Image.fromarray(image).convert("RGB") for image in trajectory.images[:shown]]
    thumbs = [f.resize((max(1, f.width * thumb_height // max(f.height, 1)), thumb_height)) for f in frames]
    cell_width = max(t.width for t in thumbs) + 8
    rows = -(-len(thumbs) // per_row)
    panel = Image.new("RGB", (cell_width * min(per_row, len(thumbs)), (thumb_height + 8) * rows), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    picked: dict[int, tuple[int, int, int]] = {}
    for index, operation in enumerate(trajectory.visual_operations):
        if operation.ok and operation.frames:
            for number in operation.frames:
                picked.setdefault(number, BOX_COLOURS[index % len(BOX_COLOURS)])
    for position, thumb in enumerate(thumbs):
        x, y = (position % per_row) * cell_width + 4, (position // per_row) * (thumb_height + 8) + 4
        panel.paste(thumb, (x, y))
        number = position + 1  # select_frames numbers the shown frames from 1
        if number in picked:
            draw.rectangle([x - 3, y - 3, x + thumb.width + 2, y + thumb_height + 2], outline=picked[number], width=3)
        draw.text((x + 3, y + 2), str(number), fill=(255, 255, 0))
    return panel


def pick_trajectory(trajectories: list[Trajectory]) -> Trajectory:
    """The most telling trajectory of a step: one with a successful visual operation if any."""
    for trajectory in trajectories:
        if any(op.ok for op in trajectory.visual_operations):
            return trajectory
    for trajectory in trajectories:
        if trajectory.visual_operations:
            return trajectory
    return trajectories[0]


def as_array(picture: Image.Image) -> np.ndarray:
    return np.asarray(picture)
