"""Simulated engines and learners: the time model (pure), the engine stand-in driving the real
workflow, and the real RLPipeline over simulated actors in sync and async modes (integration)."""
import math
import random
import statistics

import numpy as np
import pytest
from PIL import Image

from policies import visual_ops
from policies.episode import EpisodeSettings, GenerationRequest, prompt_token_ids, run_episodes, start_episodes
from policies.protocol import CropCall, parse_tool_call
from policies.simulation import (
    SPECIAL_TOKENS, FastTokenizer, SimulatedEngine, SimulationConfig, generation_seconds, modelled_tokens,
    plan_turn, sample_turn_tokens, smart_resize, train_seconds,
)
from policies.visual_ops import PixelBudgets, run_turn


def draws(config: SimulationConfig, count: int = 4000) -> list[int]:
    rng = random.Random(0)
    return [sample_turn_tokens(rng, config) for _ in range(count)]


@pytest.mark.parametrize("distribution", ["lognormal", "pareto"])
def test_turn_lengths_have_the_configured_median_and_a_long_tail(distribution):
    config = SimulationConfig(length_distribution=distribution, median_tokens_per_turn=100, sigma=1.0, pareto_alpha=1.5)
    lengths = draws(config)
    assert 90 <= statistics.median(lengths) <= 110
    assert np.percentile(lengths, 99) > 5 * statistics.median(lengths)  # the long tail
    assert min(lengths) >= 1


def test_constant_lengths_and_the_minimum():
    assert set(draws(SimulationConfig(length_distribution="constant", median_tokens_per_turn=7), 50)) == {7}
    config = SimulationConfig(median_tokens_per_turn=2, sigma=2.0, min_tokens_per_turn=5)
    assert min(draws(config)) == 5


def test_generation_time_is_prefill_per_request_plus_lockstep_decode_to_the_longest():
    config = SimulationConfig(prefill_s_per_request=0.5, decode_s_per_token=0.01)
    assert generation_seconds(config, [10, 300, 20]) == pytest.approx(3 * 0.5 + 300 * 0.01)
    assert generation_seconds(config, []) == 0.0
    assert generation_seconds(SimulationConfig(), [10_000]) == 0.0  # zero-cost engines


def test_train_time_is_per_step_plus_per_token():
    config = SimulationConfig(train_s_per_step=1.0, train_s_per_token=1e-3)
    assert train_seconds(config, 2000) == pytest.approx(3.0)
    assert train_seconds(SimulationConfig(), 10**6) == 0.0


def test_learner_counts_prompts_and_observations_at_the_modelled_sizes():
    # prompt 5, turn 3, observation 4, turn 2, observation 1, turn 1, 2 untrained at the end
    mask = [0] * 5 + [1] * 3 + [0] * 4 + [1] * 2 + [0] + [1] + [0] * 2
    assert modelled_tokens(SimulationConfig(), mask) == len(mask)  # unset: the sample's own tokens
    assert modelled_tokens(SimulationConfig(prompt_tokens=600), mask) == 600 + 6 + 5 + 2
    assert modelled_tokens(SimulationConfig(prompt_tokens=600, observation_tokens=80), mask) == 600 + 6 + 2 * 80 + 2
    assert modelled_tokens(SimulationConfig(prompt_tokens=600, observation_tokens=80), [0] * 7) == 600
    assert modelled_tokens(SimulationConfig(observation_tokens=80), [0] * 7) == 7
    # an array mask (a TrainSample may hold one) counts the same as the list
    assert modelled_tokens(SimulationConfig(prompt_tokens=600, observation_tokens=80),
                           np.asarray(mask, np.int8)) == 600 + 6 + 2 * 80 + 2


def test_turn_plans_are_seeded_cut_at_max_tokens_and_follow_the_tool_probability():
    config = SimulationConfig(tool_call_probability=0.5)
    assert plan_turn(123, config, 96) == plan_turn(123, config, 96)
    long = SimulationConfig(length_distribution="constant", median_tokens_per_turn=500)
    assert plan_turn(1, long, 96).kind == "length" and plan_turn(1, long, 96).tokens == 96
    short = SimulationConfig(length_distribution="constant", median_tokens_per_turn=5, tool_call_probability=1.0)
    assert {plan_turn(s, short, 96).kind for s in range(50)} == {"tool_call"}
    never = short.model_copy(update={"tool_call_probability": 0.0})
    assert {plan_turn(s, never, 96).kind for s in range(50)} == {"answer"}
    kinds = [plan_turn(s, config.model_copy(update={"median_tokens_per_turn": 5.0}), 96).kind for s in range(2000)]
    assert 0.45 < kinds.count("tool_call") / len(kinds) < 0.55


def test_engine_results_look_like_vllm_results():
    config = SimulationConfig(median_tokens_per_turn=20, decode_s_per_token=0.01, prefill_s_per_request=0.1,
                              answer_correct_probability=1.0)
    engine = SimulatedEngine(config)
    requests = [GenerationRequest(token_ids=[1, 2, 3], images=[], max_tokens=64, seed=seed) for seed in range(40)]
    results, seconds = engine.generate(requests, golds=lambda seed: ("red",))
    assert seconds == pytest.approx(generation_seconds(config, [len(r.token_ids) for r in results]))
    kinds = {r.finish_reason for r in results}
    assert kinds <= {"tool_call", "stop", "length"} and "tool_call" in kinds and "stop" in kinds
    for result in results:
        assert len(result.token_ids) == len(result.logprobs) <= 64
        if result.stopped_at_tool_call:
            assert result.token_ids[-1] == SPECIAL_TOKENS["</tool_call>"]
            assert isinstance(parse_tool_call(result.text + "</tool_call>"), CropCall)
        elif result.finish_reason == "stop":
            assert result.token_ids[-1] == SPECIAL_TOKENS["<|im_end|>"] and "\\boxed{red}" in result.text


def test_fast_tokenizer_keeps_the_special_tokens_the_workflow_relies_on():
    tokenizer = FastTokenizer()
    prompt = prompt_token_ids(tokenizer, "What colour is the square?")
    assert prompt.count(SPECIAL_TOKENS["<|image_pad|>"]) == 1
    assert prompt[0] == SPECIAL_TOKENS["<|im_start|>"]
    assert tokenizer.encode("<|im_end|>\n<|im_start|>user\n")[0] == SPECIAL_TOKENS["<|im_end|>"]
    assert 100 < len(prompt) < 600  # the tool system prompt is a few hundred tokens, like BPE
    assert tokenizer.encode("a red square") == tokenizer.encode("a red square")


def test_smart_resize_copy_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    rng = random.Random(0)
    for _ in range(300):
        height, width = rng.randint(10, 4000), rng.randint(10, 4000)
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in ((4 * 784, 64 * 784), (256 * 784, 1280 * 784)):
            assert smart_resize(height, width, 28, min_pixels, max_pixels) == reference(
                height, width, 28, min_pixels, max_pixels)


def test_the_real_workflow_runs_multi_turn_episodes_on_the_simulated_engine(monkeypatch):
    monkeypatch.setattr(visual_ops, "_smart_resize", lambda: smart_resize)  # as the simulated actors do
    tokenizer = FastTokenizer()
    budgets = PixelBudgets()
    settings = EpisodeSettings(max_tool_calls=3, max_new_tokens_per_turn=64, budgets=budgets)
    engine = SimulatedEngine(SimulationConfig(median_tokens_per_turn=12, tool_call_probability=0.6), tokenizer)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8))
    episodes = start_episodes(tokenizer, "q", "What colour?", image, ("red",), 16, settings, 5, seed=7)
    trajectories = run_episodes(episodes, lambda requests: engine.generate(requests)[0],
                                lambda calls: [run_turn(text, sources, budgets) for text, sources in calls],
                                tokenizer, settings)
    pad = SPECIAL_TOKENS["<|image_pad|>"]
    assert sum(t.num_visual_operations for t in trajectories) > 0
    assert {t.finish_reason for t in trajectories} <= {"stop", "length", "tool_limit"}
    for t in trajectories:
        assert len(t.token_ids) == len(t.loss_mask) == len(t.behaviour_logprobs)
        assert t.token_ids.count(pad) == len(t.images) == 1 + sum(op.ok for op in t.visual_operations)
        assert t.num_visual_operations <= 3 and t.policy_version == 5
        assert all(op.ok for op in t.visual_operations)  # the engine's boxes are always croppable


# --- integration: the real pipeline over simulated actors ---------------------------------------------

def _records(folder, count):
    from policies.data import PromptRecord

    records = []
    for index in range(count):
        path = folder / f"image{index}.png"
        Image.new("RGB", (112, 112), (20 * index, 100, 200)).save(path)
        records.append(PromptRecord(f"q{index}", "What colour is the square? Answer in \\boxed{}.", (str(path),),
                                    False, (["red", "blue", "green"][index % 3],)))
    return records


@pytest.mark.integration
@pytest.mark.parametrize("overlap_export", [False, True])
def test_pipeline_with_simulated_engines_bounds_staleness_and_keeps_every_prompt(ray_cluster, tmp_path, overlap_export):
    """Also with the export overlapped (the engines' updates take its future): the same bounds."""
    from cluster.config import PixelRayConfig
    from cluster.pipeline import PromptStream, RLPipeline

    config = PixelRayConfig.model_validate({
        "prompts_per_step": 3,
        "rollout": {"engine": "simulated", "num_workers": 2, "num_cpus": 0, "group_size": 4, "max_tool_calls": 2},
        "trainer": {"num_cpus_per_learner": 0, "num_learners": 2, "drop_zero_variance_groups": False,
                    "overlap_weight_export": overlap_export},
        "reward": {"num_cpus": 0},
        "simulation": {"median_tokens_per_turn": 16, "decode_s_per_token": 0.002, "train_s_per_step": 0.05,
                       "weight_load_s": 0.01, "export_s": 0.05},
    })
    records = _records(tmp_path, 6)
    pipeline = RLPipeline(config, "unused", records)
    try:
        sync = list(pipeline.run(0, 4))
        pipeline.config.max_staleness = 1
        async_ = list(pipeline.run(4, 9))
    finally:
        pipeline.shutdown()

    for result in sync:  # max_staleness 0: every trajectory from the policy being trained
        assert result.metrics["rollout/staleness_max"] == 0
        assert {t.policy_version for t in result.trajectories} == {result.step}
    staleness = [result.metrics["rollout/staleness_max"] for result in async_]
    assert max(staleness) <= 1 and staleness[1:] == [1] * 4  # generated one version behind, never more
    for result in async_:
        assert all(result.step - t.policy_version in (0, 1) for t in result.trajectories)

    expected = PromptStream(records, config.data.shuffle, config.seed)
    for result in sync + async_:  # every prompt of the stream, each exactly once, all G samples
        wanted = [r.qid for r in expected.take(3)]
        got = sorted((t.qid, t.sample_index) for t in result.trajectories)
        assert got == sorted((qid, i) for qid in wanted for i in range(4)), result.step
        assert result.metrics["train/samples"] == 12 and result.metrics["train/trained_tokens"] > 0
        assert result.metrics["rollout/trajectories"] == 12
    assert async_[-1].metrics["policy_version"] == 9
    assert any(t.num_visual_operations for r in sync + async_ for t in r.trajectories)


def test_continuous_batching_clock_lets_short_turns_leave_a_long_one_behind():
    import asyncio
    import time

    from actors.simulated import ContinuousBatchClock

    async def main():
        clock = ContinuousBatchClock(SimulationConfig(prefill_s_per_request=0.01, decode_s_per_token=0.001))

        async def turn(tokens, after):
            await asyncio.sleep(after)
            started = time.perf_counter()
            await clock.generate(tokens)
            return time.perf_counter() - started

        return await asyncio.gather(turn(100, 0.0), turn(300, 0.0), turn(50, 0.05))

    short, long, late = asyncio.run(main())
    # both prefills stall the batch (0.02), the late turn's prefill stalls it again (0.01)
    assert short == pytest.approx(0.13, abs=0.015)
    assert long == pytest.approx(0.33, abs=0.015)
    assert late == pytest.approx(0.06, abs=0.015)  # joins the running batch: no wait for the long turn


def test_balance_gives_prompts_to_the_workers_with_the_fewest_trajectories_in_flight(monkeypatch):
    import ray

    from cluster.config import PixelRayConfig
    from cluster.pipeline import RLPipeline

    pipeline = object.__new__(RLPipeline)
    pipeline.config = PixelRayConfig.model_validate({"rollout": {"group_size": 4}})
    pipeline.workers = ["w0", "w1", "w2"]
    pipeline._in_flight = []
    even = pipeline._balance(list("abcdef"))
    assert even == [("w0", ["a", "d"]), ("w1", ["b", "e"]), ("w2", ["c", "f"])]  # idle: round robin

    # w0 still runs 3 prompts (12 trajectories), w1 one (4), w2's call has returned
    pipeline._in_flight = [("w0", 12, "f0"), ("w1", 4, "f1"), ("w2", 8, "f2")]
    monkeypatch.setattr(ray, "wait", lambda futures, **kw: (["f2"], [f for f in futures if f != "f2"]))
    shares = dict(pipeline._balance(list("abcdef")))
    # loads 12 / 4 / 0: w2 first, then w1 and w2 alternate, the last prompt levels all three at 12
    assert shares == {"w2": ["a", "c", "e"], "w1": ["b", "d"], "w0": ["f"]}
    assert [entry[0] for entry in pipeline._in_flight] == ["w0", "w1"]  # returned calls are forgotten


@pytest.mark.integration
def test_continuous_and_turn_batching_give_the_same_trajectories_and_continuous_is_faster(ray_cluster, tmp_path):
    import time

    import ray

    from actors.rollout import PromptTask
    from actors.simulated import SimulatedRolloutWorker
    from cluster.config import PixelRayConfig
    from cluster.pipeline import load_image_array

    config = PixelRayConfig.model_validate({"rollout": {"max_tool_calls": 3, "max_new_tokens_per_turn": 256}})
    tasks = [PromptTask(r.qid, r.question, ray.put(load_image_array(r.media_paths[0])), r.answers)
             for r in _records(tmp_path, 2)]
    results = {}
    for batching in ("turn", "continuous"):
        simulation = SimulationConfig(median_tokens_per_turn=40, sigma=1.0, decode_s_per_token=0.002,
                                      prefill_s_per_request=0.001, tool_s=0.02, tool_call_probability=0.6,
                                      batching=batching)
        worker = SimulatedRolloutWorker.options(num_cpus=0).remote("unused", config.rollout, config.tools,
                                                                   "float32", 0, simulation)
        ray.get(worker.ready.remote())
        started = time.perf_counter()
        trajectories, stats = ray.get(worker.rollout.remote(tasks, 8, 1234))
        results[batching] = (time.perf_counter() - started, trajectories)
        ray.kill(worker)

    def key(t):
        return (t.qid, t.sample_index, tuple(t.token_ids), tuple(t.loss_mask), t.finish_reason, t.response_text)

    assert sorted(map(key, results["turn"][1])) == sorted(map(key, results["continuous"][1]))
    assert results["continuous"][0] < results["turn"][0]


def _engine_learner_and_tasks(tmp_path):
    """One simulated engine, one simulated learner (set up), one prompt task of a real image."""
    import ray

    from actors.rollout import PromptTask
    from actors.simulated import SimulatedLearner, SimulatedRolloutWorker
    from cluster.config import PixelRayConfig
    from cluster.pipeline import load_image_array

    config = PixelRayConfig()
    simulation = SimulationConfig(median_tokens_per_turn=20, decode_s_per_token=0.005, weight_load_s=0.05)
    worker = SimulatedRolloutWorker.options(num_cpus=0).remote("unused", config.rollout, config.tools, "float32", 0,
                                                               simulation)
    learner = SimulatedLearner.options(num_cpus=0).remote()
    ray.get(learner.setup.remote("unused", config.trainer, 1.0, "cpu", 0, 1, ("", 0), 1, None, simulation))
    tasks = [PromptTask(r.qid, r.question, ray.put(load_image_array(r.media_paths[0])), r.answers)
             for r in _records(tmp_path, 1)]
    return worker, learner, tasks


@pytest.mark.integration
def test_a_simulated_update_waits_for_earlier_calls_and_later_calls_wait_for_it(ray_cluster, tmp_path):
    import ray

    worker, learner, tasks = _engine_learner_and_tasks(tmp_path)
    update = ray.get(learner.export_weights.remote(1))
    try:
        # sent in this order: call 0 (version 0), the update (after 1 call), call 1 (needs version 1)
        first = worker.rollout.remote(tasks, 4, 1, call_index=0, min_version=0)
        updated = worker.update_weights.remote(update, after_calls=1)
        second = worker.rollout.remote(tasks, 4, 2, call_index=1, min_version=1)
        assert {t.policy_version for t in ray.get(first)[0]} == {0}
        assert ray.get(updated)["policy_version"] == 1
        assert {t.policy_version for t in ray.get(second)[0]} == {1}
    finally:
        ray.kill(worker)
        ray.kill(learner)


@pytest.mark.integration
def test_two_simulated_updates_released_together_load_in_order_and_never_take_the_version_back(ray_cluster, tmp_path):
    """Two updates waiting for the same call: the older one's weights arrive late. They load one
    after the other, so the engine ends on the newer version (loaded side by side, the older one
    finished last and set the version back: a rollout needing the newer version waited forever)."""
    import dataclasses
    import time

    import ray

    @ray.remote(num_cpus=0)
    def late_bucket():
        time.sleep(1.0)
        return np.zeros(1024, dtype=np.uint8)

    worker, learner, tasks = _engine_learner_and_tasks(tmp_path)
    exported = ray.get(learner.export_weights.remote(1))
    older = dataclasses.replace(exported, version=1, buckets=[late_bucket.remote()])
    newer = dataclasses.replace(exported, version=2)
    try:
        first = worker.rollout.remote(tasks, 4, 1, call_index=0, min_version=0)
        updates = [worker.update_weights.remote(older, after_calls=1), worker.update_weights.remote(newer, after_calls=1)]
        ray.get(first)
        older_report, newer_report = ray.get(updates)
        # the older one loads first when both wait for the call; if the call was done before they
        # arrived, either may go first, and the engine stays on version 2 either way
        assert older_report["policy_version"] in (1, 2) and newer_report["policy_version"] == 2
        later = worker.rollout.remote(tasks, 4, 2, call_index=1, min_version=2)
        assert {t.policy_version for t in ray.get(later, timeout=60)[0]} == {2}
    finally:
        ray.kill(worker)
        ray.kill(learner)
