"""The rollout workflow with a scripted engine: token bookkeeping, masks, images, limits; image and
video prompts (no Ray)."""
import numpy as np
import pytest
from PIL import Image

from policies.episode import (
    EpisodeSettings, GenerationResult, observation_token_ids, prompt_token_ids, run_episodes, start_episodes,
    start_video_episodes, video_frame_views,
)
from policies.visual_ops import PixelBudgets, run_turn

CROP_CALL = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.4, 0.4, 0.6, 0.6], "target_image": 1}}\n'


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


class ScriptedEngine:
    """Answers each turn from a script: the turn index picks the text; log-prob -0.5 per token."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.turn, self.requests = tokenizer, script, 0, []

    def __call__(self, requests):
        self.requests.append(requests)
        text, stops_at_tool = self.script[self.turn]
        self.turn += 1
        results = []
        for _ in requests:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if stops_at_tool:
                ids.append(self.tokenizer.convert_tokens_to_ids("</tool_call>"))
            results.append(GenerationResult(ids, [-0.5] * len(ids), text, stops_at_tool,
                                            "tool_call" if stops_at_tool else "stop"))
        return results


def tools(budgets):
    return lambda requests: [run_turn(text, sources, budgets) for text, sources in requests]


def episodes(tokenizer, settings, group_size=2):
    image = Image.fromarray(np.full((600, 800, 3), 120, dtype=np.uint8))
    return start_episodes(tokenizer, "q1", "What colour?", image, ("red",), group_size, settings, policy_version=3)


def test_crop_then_answer_builds_masked_multi_turn_tokens(tokenizer):
    settings = EpisodeSettings(max_tool_calls=3, budgets=PixelBudgets())
    engine = ScriptedEngine(tokenizer, [(CROP_CALL, True), ("It is \\boxed{red}.<|im_end|>", False)])
    trajectories = run_episodes(episodes(tokenizer, settings), engine, tools(settings.budgets), tokenizer, settings)
    assert len(trajectories) == 2
    t = trajectories[0]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert t.token_ids.count(pad) == len(t.images) == 2  # the original and one crop
    assert len(t.token_ids) == len(t.loss_mask) == len(t.behaviour_logprobs)
    assert t.visual_operations[0].ok and t.visual_operations[0].name == "crop_image"
    assert t.visual_operations[0].source_size == (800, 600) and 0 < t.visual_operations[0].area_fraction < 1
    assert t.finish_reason == "stop" and t.policy_version == 3
    assert t.response_text.endswith("\\boxed{red}.<|im_end|>")
    # trained tokens are exactly the two generated turns, with their log-probs
    call_ids = tokenizer.encode(CROP_CALL, add_special_tokens=False)
    answer_ids = tokenizer.encode("It is \\boxed{red}.<|im_end|>", add_special_tokens=False)
    assert t.num_response_tokens == len(call_ids) + 1 + len(answer_ids)
    assert all(lp == -0.5 for lp, m in zip(t.behaviour_logprobs, t.loss_mask) if m)
    assert all(lp == 0.0 for lp, m in zip(t.behaviour_logprobs, t.loss_mask) if not m)
    # no image pad is ever trainable
    assert all(m == 0 for tok, m in zip(t.token_ids, t.loss_mask) if tok == pad)
    # the second request carried both images, the crop at the crop budget
    second = engine.requests[1][0]
    assert len(second.images) == 2
    assert second.images[1].width * second.images[1].height <= settings.budgets.crop_max_pixels


def test_tool_call_after_the_limit_ends_the_trajectory(tokenizer):
    settings = EpisodeSettings(max_tool_calls=1, budgets=PixelBudgets())
    engine = ScriptedEngine(tokenizer, [(CROP_CALL, True), (CROP_CALL, True)])
    trajectories = run_episodes(episodes(tokenizer, settings, 1), engine, tools(settings.budgets), tokenizer, settings)
    assert trajectories[0].finish_reason == "tool_limit"
    assert trajectories[0].num_visual_operations == 1
    assert engine.turn == 2


def test_malformed_call_becomes_an_error_observation_and_the_episode_goes_on(tokenizer):
    settings = EpisodeSettings(max_tool_calls=2, budgets=PixelBudgets())
    bad = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.9, 0.9, 0.1, 0.1], "target_image": 1}}\n'
    engine = ScriptedEngine(tokenizer, [(bad, True), ("\\boxed{blue}<|im_end|>", False)])
    t = run_episodes(episodes(tokenizer, settings, 1), engine, tools(settings.budgets), tokenizer, settings)[0]
    assert not t.visual_operations[0].ok and t.last_operation_failed
    assert t.finish_reason == "stop"
    error_tokens = observation_token_ids(tokenizer, "Execution error:", 0)[:3]
    assert len(t.images) == 1  # no image came back
    assert "Execution error" in tokenizer.decode(t.token_ids)
    assert error_tokens  # the observation segment is tokenizable


def test_token_budget_counts_expanded_image_tokens(tokenizer):
    probe = episodes(tokenizer, EpisodeSettings(budgets=PixelBudgets()), 1)[0]
    view = probe.view_images[0]
    expanded_prompt = len(probe.trajectory.token_ids) - 1 + (view.width // 28) * (view.height // 28)
    budget = expanded_prompt + 40  # room for the call, not for the crop's 64 image tokens after it
    settings = EpisodeSettings(max_tool_calls=3, max_new_tokens_per_turn=500, max_model_len=budget, budgets=PixelBudgets())
    engine = ScriptedEngine(tokenizer, [(CROP_CALL, True), ("x", False)])
    trajectories = run_episodes(episodes(tokenizer, settings, 1), engine, tools(settings.budgets), tokenizer, settings)
    assert engine.requests[0][0].max_tokens == 40
    assert len(engine.requests) == 1  # no room left for a second turn
    assert trajectories[0].finish_reason == "length"


# --------------------------------------------------------------------------------------------
# Video questions: the N sampled frames shown as images, select_frames picking among them
# --------------------------------------------------------------------------------------------

SELECT_CALL = '<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [3, 7]}}\n'


def grey_level(image) -> int:
    """The fixture video's frame k is grey level 10 k: the frame number a picture shows (lossy codec)."""
    return round(float(np.asarray(image.convert("L")).mean()) / 10)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from eval_fixtures import write_video

    from policies.visual_ops import VideoSource

    path = write_video(tmp_path_factory.mktemp("video") / "clip.mp4", frames=24, size=64)
    return VideoSource.sampled(str(path), 16)


def video_episodes(tokenizer, settings, video, group_size=1):
    from policies.visual_ops import load_video_frames

    frames = load_video_frames(video.video, video.frame_indices)
    return start_video_episodes(tokenizer, "v1", "What happens?", frames, ("A",), group_size, settings,
                                policy_version=2, tool_source=video)


def test_video_prompt_shows_the_sampled_frames_as_images_at_the_frame_budget(tokenizer, video):
    budgets = PixelBudgets()
    assert video.frame_indices == (0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23)  # uniform over 24
    [episode] = video_episodes(tokenizer, EpisodeSettings(budgets=budgets), video)
    t = episode.trajectory
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert t.is_video and t.metadata["num_frames"] == 16
    assert t.token_ids.tolist() == prompt_token_ids(tokenizer, "What happens?", num_images=16)
    assert t.token_ids.count(pad) == len(t.images) == len(episode.view_images) == 16
    assert not any(t.loss_mask)
    text = tokenizer.decode(t.token_ids)
    assert text.index("<|vision_start|>") < text.rindex("<|vision_end|>") < text.index("What happens?")
    for view in episode.view_images:
        assert view.width % 28 == 0 and view.height % 28 == 0
        assert budgets.min_pixels <= view.width * view.height <= budgets.frame_max_pixels
    # frame k of the prompt is the video's frame frame_indices[k - 1], in order
    assert [grey_level(v) for v in episode.view_images] == list(video.frame_indices)
    assert episode.sources == [video]  # what select_frames reads; the video is not a crop target


def test_video_prompt_views_match_video_frame_views(video):
    from policies.visual_ops import load_video_frames

    budgets = PixelBudgets(frame_max_pixels=4 * 28 * 28, min_pixels=28 * 28)
    frames = load_video_frames(video.video, video.frame_indices[:2])
    assert [v.size for v in video_frame_views(frames, budgets)] == [(56, 56)] * 2


def test_select_frames_turn_shows_the_chosen_frames_with_their_numbers(tokenizer, video):
    settings = EpisodeSettings(max_tool_calls=3, budgets=PixelBudgets())
    engine = ScriptedEngine(tokenizer, [(SELECT_CALL, True), ("\\boxed{A}<|im_end|>", False)])
    [t] = run_episodes(video_episodes(tokenizer, settings, video), engine, tools(settings.budgets), tokenizer,
                       settings)
    [operation] = t.visual_operations
    assert operation.ok and operation.name == "select_frames" and operation.frames == [3, 7]
    assert t.finish_reason == "stop" and t.response_text.endswith("\\boxed{A}<|im_end|>")
    assert "Here are the selected frames (Frame Numbers: 3, 7):" in tokenizer.decode(t.token_ids)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert t.token_ids.count(pad) == len(t.images) == 18
    # the two returned frames are frames 3 and 7 of the 16 shown, at the frame budget
    second = engine.requests[1][0]
    assert len(second.images) == 18
    assert [grey_level(image) for image in second.images[16:]] == [video.frame_indices[2], video.frame_indices[6]]
    assert [grey_level(Image.fromarray(a)) for a in t.images[16:]] == [video.frame_indices[2], video.frame_indices[6]]
    assert second.images[16].size == second.images[2].size  # same budget as in the prompt


def test_select_frames_beyond_the_frames_shown_is_an_error_the_episode_survives(tokenizer, video):
    settings = EpisodeSettings(max_tool_calls=3, budgets=PixelBudgets())
    beyond = '<tool_call>\n{"name": "select_frames", "arguments": {"target_frames": [17]}}\n'
    engine = ScriptedEngine(tokenizer, [(beyond, True), ("\\boxed{B}<|im_end|>", False)])
    [t] = run_episodes(video_episodes(tokenizer, settings, video), engine, tools(settings.budgets), tokenizer,
                       settings)
    assert not t.visual_operations[0].ok and t.visual_operations[0].error_kind == "frames_out_of_range"
    assert len(t.images) == 16 and t.finish_reason == "stop"


def test_a_video_trajectory_collates_for_the_learner(tokenizer, tiny_model_dir, video):
    """Frames are plain images, so policies.batching expands one pad per frame like any image."""
    from transformers import AutoImageProcessor

    from policies.batching import TrainSample, collate

    settings = EpisodeSettings(max_tool_calls=3, budgets=PixelBudgets())
    engine = ScriptedEngine(tokenizer, [(SELECT_CALL, True), ("\\boxed{A}<|im_end|>", False)])
    [t] = run_episodes(video_episodes(tokenizer, settings, video), engine, tools(settings.budgets), tokenizer,
                       settings)
    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    batch = collate([TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, t.images, 1.0)], processor, pad,
                    tokenizer.pad_token_id or 0)
    grid = batch.inputs["image_grid_thw"]
    assert grid.shape[0] == 18
    assert int((batch.inputs["input_ids"] == pad).sum()) == int(grid.prod(-1).sum()) // 4
    assert float(batch.loss_mask.sum()) == t.num_response_tokens


# --------------------------------------------------------------------------------------------
# Continuous batching: an engine step loop, each episode's next turn submitted once its call is answered
# --------------------------------------------------------------------------------------------

class SteppingEngine:
    """A scripted engine with vLLM's step-loop shape: `script[index][turn]` is (text, stops at a
    tool call, steps the turn takes); a turn finishes `steps` engine steps after it is submitted."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.running: dict[int, list] = {}  # index -> [steps left, turn]
        self.turns = {index: 0 for index in script}
        self.steps = 0
        self.submitted: list[tuple[int, int, int]] = []  # (index, turn, steps run before)
        self.requests: dict[tuple[int, int], object] = {}

    def submit(self, index, request):
        assert index not in self.running, "one turn in flight per episode"
        turn = self.turns[index]
        self.running[index] = [self.script[index][turn][2], turn]
        self.submitted.append((index, turn, self.steps))
        self.requests[index, turn] = request

    def step(self):
        self.steps += 1
        finished = []
        for index in list(self.running):  # reversed below: the driver must not rely on the engine's order
            self.running[index][0] -= 1
            if self.running[index][0] == 0:
                _, turn = self.running.pop(index)
                self.turns[index] += 1
                text, stops_at_tool, _ = self.script[index][turn]
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if stops_at_tool:
                    ids.append(self.tokenizer.convert_tokens_to_ids("</tool_call>"))
                finished.append((index, GenerationResult(ids, [-0.5] * len(ids), text, stops_at_tool,
                                                         "tool_call" if stops_at_tool else "stop")))
        return finished[::-1]


class CountingTools:
    """The real crop code, recording each batched call's size."""

    def __init__(self, budgets):
        self.run, self.batches = tools(budgets), []

    def __call__(self, requests):
        self.batches.append(len(requests))
        return self.run(requests)


ANSWER = ("It is \\boxed{red}.<|im_end|>", False)


def test_continuous_driver_builds_the_same_trajectories_as_the_turn_synchronous_one(tokenizer):
    from policies.episode import run_episodes_continuously

    settings = EpisodeSettings(max_tool_calls=2, budgets=PixelBudgets())
    script = {0: [(CROP_CALL, True, 5), (*ANSWER, 3)], 1: [(CROP_CALL, True, 2), (*ANSWER, 1)]}
    engine = SteppingEngine(tokenizer, script)
    continuous = run_episodes_continuously(episodes(tokenizer, settings), engine.submit, engine.step,
                                           tools(settings.budgets), tokenizer, settings)
    synchronous = run_episodes(episodes(tokenizer, settings),
                               ScriptedEngine(tokenizer, [(CROP_CALL, True), ANSWER]), tools(settings.budgets),
                               tokenizer, settings)
    for a, b in zip(continuous, synchronous, strict=True):
        assert (a.token_ids, a.loss_mask, a.behaviour_logprobs) == (b.token_ids, b.loss_mask, b.behaviour_logprobs)
        assert [image.shape for image in a.images] == [image.shape for image in b.images]
        assert (a.finish_reason, a.response_text, a.visual_operations) == (b.finish_reason, b.response_text,
                                                                           b.visual_operations)
        assert a.policy_version == 3 and a.finish_reason == "stop"
    # a turn's request carries the observation's image, as in the turn-synchronous driver
    assert len(engine.requests[1, 1].images) == 2


def test_a_short_turn_goes_on_while_a_long_one_runs(tokenizer):
    """Episode 1 stops at a tool call after 2 steps: its second turn is submitted right after step 2
    and done at step 3, while episode 0's first turn runs until step 10 (no head-of-line blocking)."""
    from policies.episode import run_episodes_continuously

    settings = EpisodeSettings(max_tool_calls=2, budgets=PixelBudgets())
    script = {0: [(*ANSWER, 10)], 1: [(CROP_CALL, True, 2), (*ANSWER, 1)]}
    engine = SteppingEngine(tokenizer, script)
    long, short = run_episodes_continuously(episodes(tokenizer, settings), engine.submit, engine.step,
                                            tools(settings.budgets), tokenizer, settings)
    assert engine.submitted == [(0, 0, 0), (1, 0, 0), (1, 1, 2)]
    assert short.metadata["engine_steps"] == [(0, 2), (2, 3)]
    assert long.metadata["engine_steps"] == [(0, 10)]
    assert engine.steps == 10  # the turn-synchronous schedule would take 10 + 1
    assert short.visual_operations[0].ok and short.finish_reason == long.finish_reason == "stop"


def test_calls_finished_in_one_step_run_as_one_tool_batch(tokenizer):
    from policies.episode import run_episodes_continuously

    settings = EpisodeSettings(max_tool_calls=2, budgets=PixelBudgets())
    script = {i: [(CROP_CALL, True, 3 if i < 2 else 4), (*ANSWER, 1)] for i in range(3)}
    engine = SteppingEngine(tokenizer, script)
    counting = CountingTools(settings.budgets)
    trajectories = run_episodes_continuously(episodes(tokenizer, settings, group_size=3), engine.submit,
                                             engine.step, counting, tokenizer, settings)
    assert counting.batches == [2, 1]  # step 3 finished two calls, step 4 one
    assert [t.metadata["engine_steps"] for t in trajectories] == [[(0, 3), (3, 4)], [(0, 3), (3, 4)], [(0, 4), (4, 5)]]
    # the two calls of step 3 were answered together, then both next turns were submitted in order
    assert engine.submitted[3:5] == [(0, 1, 3), (1, 1, 3)]


def test_continuous_driver_ends_at_the_tool_limit_and_the_token_budget(tokenizer):
    from policies.episode import run_episodes_continuously

    limit = EpisodeSettings(max_tool_calls=1, budgets=PixelBudgets())
    engine = SteppingEngine(tokenizer, {0: [(CROP_CALL, True, 1), (CROP_CALL, True, 1)]})
    [t] = run_episodes_continuously(episodes(tokenizer, limit, 1), engine.submit, engine.step,
                                    tools(limit.budgets), tokenizer, limit)
    assert t.finish_reason == "tool_limit" and t.num_visual_operations == 1 and engine.steps == 2

    probe = episodes(tokenizer, EpisodeSettings(budgets=PixelBudgets()), 1)[0]
    view = probe.view_images[0]
    expanded_prompt = len(probe.trajectory.token_ids) - 1 + (view.width // 28) * (view.height // 28)
    tight = EpisodeSettings(max_tool_calls=3, max_new_tokens_per_turn=500, max_model_len=expanded_prompt + 40,
                            budgets=PixelBudgets())
    engine = SteppingEngine(tokenizer, {0: [(CROP_CALL, True, 1), (*ANSWER, 1)]})
    [t] = run_episodes_continuously(episodes(tokenizer, tight, 1), engine.submit, engine.step,
                                    tools(tight.budgets), tokenizer, tight)
    assert engine.requests[0, 0].max_tokens == 40
    assert t.finish_reason == "length" and len(engine.submitted) == 1  # no room for a second turn
    assert t.num_visual_operations == 1 and t.metadata["engine_steps"] == [(0, 1)]


def test_continuous_driver_rejects_a_result_for_an_episode_without_a_turn_in_flight(tokenizer):
    from policies.episode import run_episodes_continuously

    settings = EpisodeSettings(max_tool_calls=1, budgets=PixelBudgets())
    result = GenerationResult([1], [-0.5], "x", False, "stop")
    with pytest.raises(RuntimeError, match="none in flight"):
        run_episodes_continuously(episodes(tokenizer, settings, 1), lambda index, request: None,
                                  lambda: [(0, result), (0, result)], tools(settings.budgets), tokenizer, settings)


@pytest.mark.parametrize("num_images", [0, 1, 16])
@pytest.mark.parametrize("question", ["What colour is the square?", " leading space", "x", "", "Two\nlines <b>tag</b>",
                                      "Ünïcödé — 你好?", "ends with a newline\n", "<|im_end|> injected"])
def test_prompt_ids_with_the_cached_prefix_equal_encoding_the_whole_prompt(tokenizer, question, num_images):
    from policies.episode import _prompt_text
    from policies.simulation import FastTokenizer

    for encoder in (tokenizer, FastTokenizer()):
        whole = encoder.encode(_prompt_text(encoder, question, num_images), add_special_tokens=False)
        assert prompt_token_ids(encoder, question, num_images) == whole


def test_the_prompt_prefix_is_cached_only_where_the_tokenizer_splits(tokenizer):
    from policies.episode import _prompt_template

    assert _prompt_template(tokenizer, 1, tokenizer.chat_template) is not None
    assert _prompt_template(tokenizer, 0, tokenizer.chat_template) is None  # the question follows plain text
