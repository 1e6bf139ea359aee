"""Continuous batching on the real vLLM engine: a RolloutWorker's trajectories, and a scripted
tool-calling engine that shows a short turn going on while a long one runs (integration)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

pytestmark = pytest.mark.integration

CROP_CALL = '<tool_call>\n{"name": "crop_image", "arguments": {"bbox_2d": [0.3, 0.3, 0.7, 0.7], "target_image": 1}}\n'


@pytest.fixture(scope="module")
def tasks(ray_cluster, tmp_path_factory):
    import ray
    from PIL import Image

    from actors.rollout import PromptTask
    from policies.data import read_rl_parquet
    from policies.synthetic import SyntheticZoomSpec, ensure_synthetic_zoom

    data = ensure_synthetic_zoom(SyntheticZoomSpec(num_train=2, num_eval=0), tmp_path_factory.mktemp("data"))
    return [PromptTask(r.qid, r.question, ray.put(np.asarray(Image.open(r.media_paths[0]).convert("RGB"))), r.answers)
            for r in read_rl_parquet(data["train"])]


def _config(*overrides):
    from cluster.config import load_config

    return load_config(None, ["rollout.max_new_tokens_per_turn=24", "tools.pool_size=1", *overrides])


def _options(config) -> dict:
    from cluster.runtime import run_env_vars

    return {"num_cpus": 1, "runtime_env": {"env_vars": run_env_vars(config)}}


@pytest.fixture(scope="module")
def worker(ray_cluster, tiny_model_dir):
    import ray

    from actors.rollout import RolloutWorker

    config = _config()
    assert config.rollout.continuous_batching  # the default driver
    worker = RolloutWorker.options(**_options(config)).remote(tiny_model_dir, config.rollout, config.tools,
                                                               "float32", 0)
    ray.get(worker.ready.remote())
    yield worker
    ray.kill(worker)


def test_continuous_rollout_is_well_formed_and_reproducible(worker, tasks):
    import ray

    group_size = 3
    first, stats = ray.get(worker.rollout.remote(tasks, group_size, seed=11))
    again, _ = ray.get(worker.rollout.remote(tasks, group_size, seed=11))
    version = ray.get(worker.ready.remote())["policy_version"]

    assert Counter((t.qid, t.sample_index) for t in first) == Counter(
        {(task.qid, i): 1 for task in tasks for i in range(group_size)})  # every prompt x G exactly once
    for t in first:
        assert t.policy_version == version
        assert len(t.token_ids) == len(t.loss_mask) == len(t.behaviour_logprobs) and t.num_response_tokens > 0
        assert t.finish_reason in {"stop", "length", "tool_limit"}
        turns = t.metadata["engine_steps"]
        assert len(turns) >= 1 and all(added < finished for added, finished in turns)
        # each later turn joined the batch right after the step that finished the one before
        assert all(later[0] == earlier[1] for earlier, later in zip(turns, turns[1:]))
    assert stats["generated_tokens"] == sum(t.num_response_tokens for t in first)
    assert 0 < stats["generation_s"] <= stats["rollout_s"]
    # same seed, same tokens (and log-probs)
    assert [t.token_ids for t in again] == [t.token_ids for t in first]
    assert [t.behaviour_logprobs for t in again] == [t.behaviour_logprobs for t in first]
    # per-request seeds: the turn-synchronous driver samples the very same trajectories
    synchronous, _ = ray.get(worker.rollout.remote(tasks, group_size, seed=11, continuous_batching=False))
    assert [t.token_ids for t in synchronous] == [t.token_ids for t in first]
    assert all("engine_steps" not in t.metadata for t in synchronous)


def _scripted_engine_actor():
    """Defined in a function so that Ray ships the class by value (test modules are not importable
    in workers)."""
    import ray

    @ray.remote
    class ScriptedToolCalls:
        """The real VLLMEngine, ToolPool and continuous driver, with a script: the first two turns
        of the chosen samples are forced to end at once with </tool_call> (a logit bias), and the
        tool reads every call as a crop of the centre, so those samples get real crops back."""

        def __init__(self, model_path: str, config):
            from actors.rollout import VLLMEngine
            from actors.tools import ToolPool
            from policies.episode import EpisodeSettings

            class ForcedCalls(VLLMEngine):
                forced_seeds: set = set()

                def sampling_params(self, request, temperature, top_p):
                    params = super().sampling_params(request, temperature, top_p)
                    if request.seed in self.forced_seeds:
                        params.logit_bias = {**params.logit_bias, self.tool_call_end: 100.0}
                    return params

            self.engine = ForcedCalls(model_path, config.rollout, "float32", 0, max_images=8)
            self.engine.tool_call_end = self.engine.tokenizer.convert_tokens_to_ids("</tool_call>")
            self.tools = ToolPool(config.tools)
            self.settings = EpisodeSettings.from_config(config.rollout, config.tools.budgets)

        def rollout(self, tasks: list, group_size: int, seed: int, forced_samples: set, continuous: bool = True):
            from PIL import Image

            from actors.tools import ToolRequest
            from policies.episode import derive_seed, run_episodes, start_episodes

            episodes = []
            for task in tasks:
                episodes.extend(start_episodes(self.engine.tokenizer, task.qid, task.question,
                                               Image.fromarray(ray.get(task.image_ref)), task.answers, group_size,
                                               self.settings, 0, tool_source=task.image_ref, seed=seed))
            self.engine.forced_seeds = {derive_seed(e.seed, turn) for e in episodes
                                        if e.trajectory.sample_index in forced_samples for turn in (0, 1)}

            def run_tools(requests):
                return self.tools.run([ToolRequest(CROP_CALL + text, sources) for text, sources in requests])

            if continuous:
                return self.engine.run_episodes_continuously(episodes, run_tools, self.settings, 1.0, 1.0)[0]
            return run_episodes(episodes, lambda requests: self.engine.generate(requests, 1.0, 1.0), run_tools,
                                self.engine.tokenizer, self.settings)

    return ScriptedToolCalls


@pytest.fixture(scope="module")
def scripted(ray_cluster, tiny_model_dir):
    import ray

    config = _config("rollout.max_new_tokens_per_turn=40", "rollout.max_tool_calls=3")
    actor = _scripted_engine_actor().options(**_options(config)).remote(tiny_model_dir, config)
    yield actor
    ray.kill(actor)


def test_a_trajectory_that_calls_a_tool_goes_on_while_a_long_first_turn_runs(scripted, tasks, tiny_model_dir):
    """Samples 0 and 1 of each prompt make two calls at once; the others generate a long first
    turn. The callers' second turns are generated, and finished, before the longest first turn
    finishes: nobody waits for it (no head-of-line blocking), and the crops are in the trajectories."""
    import ray
    from transformers import AutoTokenizer

    forced = {0, 1}
    trajectories = ray.get(scripted.rollout.remote(tasks, 4, 5, forced))
    callers = [t for t in trajectories if t.sample_index in forced]
    others = [t for t in trajectories if t.sample_index not in forced]
    longest_first_turn = max(t.metadata["engine_steps"][0][1] for t in others)
    print(f"callers' turns (submitted, finished at engine step): {[t.metadata['engine_steps'] for t in callers]}; "
          f"longest first turn of the others finished at step {longest_first_turn}")
    assert longest_first_turn > 10  # the random model rarely ends a turn within a few tokens
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).convert_tokens_to_ids("<|image_pad|>")
    for t in callers:
        (added0, done0), (added1, done1), (added2, _) = t.metadata["engine_steps"][:3]
        assert added0 == 0 and added1 == done0 and added2 == done1  # each next turn joined at once
        assert done1 < longest_first_turn  # ... while the long first turns were still running
        assert [op.ok for op in t.visual_operations[:2]] == [True, True]
        assert [op.name for op in t.visual_operations[:2]] == ["crop_image", "crop_image"]
        # one image per successful operation (a later sampled call may fail: an error observation, no image)
        assert t.token_ids.count(pad) == len(t.images) == 1 + sum(op.ok for op in t.visual_operations) >= 3
        assert len(t.token_ids) == len(t.loss_mask) == len(t.behaviour_logprobs)
    for t in others:
        assert t.metadata["engine_steps"][0][0] == 0

    again = ray.get(scripted.rollout.remote(tasks, 4, 5, forced))
    assert [t.token_ids for t in again] == [t.token_ids for t in trajectories]  # tools between steps: same schedule
    synchronous = ray.get(scripted.rollout.remote(tasks, 4, 5, forced, continuous=False))
    assert [t.token_ids for t in synchronous] == [t.token_ids for t in trajectories]
