"""Trajectory pictures: the crop box is drawn where the crop was taken."""
import numpy as np
from PIL import Image

from cluster.pictures import BOX_COLOURS, pick_trajectory, trajectory_picture
from policies.trajectory import Trajectory, VisualOperation


def make_trajectory(ok=True):
    view = np.full((224, 224, 3), 128, np.uint8)
    crop = np.full((112, 112, 3), 30, np.uint8)
    trajectory = Trajectory(qid="q", sample_index=0, answers=("red",), images=[view, crop],
                            response_text="Let me zoom.\n\\boxed{red}", metadata={"original_size": (896, 896)})
    trajectory.visual_operations.append(VisualOperation("crop_image", ok, target_image=1, box_pixels=(448, 448, 672, 672)))
    trajectory.rewards = {"accuracy": 1.0, "total": 1.0}
    return trajectory


def test_the_crop_box_is_drawn_at_its_place_in_the_view():
    picture = np.asarray(trajectory_picture(make_trajectory()))
    # the view (224 px) is shown at 1x; the box in full-res pixels 448..672 of 896 -> 112..168 in the view
    assert tuple(picture[140, 112]) == BOX_COLOURS[0]  # left edge of the box
    assert tuple(picture[112, 140]) == BOX_COLOURS[0]  # top edge
    assert tuple(picture[140, 140]) == (128, 128, 128)  # inside: the image itself
    # the crop is pasted beside the view
    assert tuple(picture[50, 224 + 10 + 5]) == (30, 30, 30)


def test_failed_operations_draw_no_box_and_the_picker_prefers_successes():
    failed, good = make_trajectory(ok=False), make_trajectory(ok=True)
    picture = np.asarray(trajectory_picture(failed))
    assert tuple(picture[140, 112]) == (128, 128, 128)
    assert pick_trajectory([failed, good]) is good
    assert isinstance(trajectory_picture(good), Image.Image)


def test_a_video_is_a_contact_sheet_with_the_selected_frames_framed():
    frames = [np.full((48, 64, 3), 10 * k, np.uint8) for k in range(16)]  # frame k is grey 10 k
    returned = [frames[2], frames[9]]  # what select_frames([3, 10]) gave back
    trajectory = Trajectory(qid="v", sample_index=0, answers=("A",), is_video=True, images=frames + returned,
                            response_text="\\boxed{A}", metadata={"num_frames": 16})
    trajectory.visual_operations.append(VisualOperation("select_frames", True, frames=[3, 10]))
    trajectory.rewards = {"accuracy": 1.0, "total": 1.0}
    picture = np.asarray(trajectory_picture(trajectory))
    cell_width, cell_height = 128 + 8, 96 + 8  # 64x48 thumbnails at 96 px high, 8 per row

    def frame_centre(number):
        position = number - 1
        return (position // 8) * cell_height + 4 + 48, (position % 8) * cell_width + 4 + 64

    for number in (1, 3, 10, 16):  # the frames in order: frame k shows grey 10 (k - 1)
        y, x = frame_centre(number)
        assert tuple(picture[y, x]) == (10 * (number - 1),) * 3
    for number, framed in ((3, True), (10, True), (4, False)):
        y, x = frame_centre(number)
        edge = tuple(picture[y, x - 64 - 2])  # just left of the thumbnail
        assert (edge == BOX_COLOURS[0]) is framed, (number, edge)
    assert picture.shape[0] > 2 * cell_height  # the two rows of frames, then the text
