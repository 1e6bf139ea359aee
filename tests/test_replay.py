import math
import pickle
import random
from dataclasses import dataclass

import numpy as np
import pytest
from pydantic import ValidationError

from policies.batching import TrainSample
from policies.replay import (
    ReplayBuffer,
    ReplayConfig,
    fill_batch,
    load_replay_state,
    replay_target_size,
    save_replay_state,
)


@dataclass
class S:
    name: str
    advantage: float


def names(samples):
    return [s.name for s in samples]


def test_config_defaults_and_unknown_keys():
    config = ReplayConfig()
    assert (config.enabled, config.capacity, config.max_age_steps, config.fill_to_batch) == (False, 1024, 8, True)
    with pytest.raises(ValidationError):
        ReplayConfig(capcity=3)
    with pytest.raises(ValidationError):
        ReplayConfig(capacity=0)
    buffer = ReplayBuffer.from_config(ReplayConfig(capacity=5, max_age_steps=2))
    assert (buffer.capacity, buffer.max_age_steps) == (5, 2)


def test_zero_advantage_samples_are_refused_and_nan_fails():
    buffer = ReplayBuffer()
    assert buffer.add([S("a", 0.5), S("zero", 0.0), S("tiny", 1e-12), S("b", -0.25)], step=0) == 2
    assert len(buffer) == 2
    assert sorted(names(buffer.draw(10, random.Random(0)))) == ["a", "b"]
    with pytest.raises(ValueError, match="finite"):
        buffer.add([S("nan", float("nan"))], step=0)


def test_first_pick_is_proportional_to_abs_advantage_plus_epsilon():
    advantages = {"a": 0.1, "b": -0.2, "c": 0.3, "d": -0.4}
    buffer = ReplayBuffer()
    buffer.add([S(n, a) for n, a in advantages.items()], step=0)
    total = sum(abs(a) + 1e-4 for a in advantages.values())
    assert buffer.probabilities() == pytest.approx([(abs(a) + 1e-4) / total for a in advantages.values()])
    rng, trials = random.Random(1234), 20000
    counts = dict.fromkeys(advantages, 0)
    for _ in range(trials):
        counts[buffer.draw(1, rng)[0].name] += 1
    for name, advantage in advantages.items():
        p = (abs(advantage) + 1e-4) / total
        sigma = math.sqrt(p * (1 - p) / trials)
        assert abs(counts[name] / trials - p) < 4 * sigma, (name, counts)


def test_draw_is_without_replacement_with_successive_proportional_picks():
    buffer = ReplayBuffer()
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    buffer.add([S(n, w) for n, w in weights.items()], step=0)
    rng = np.random.default_rng(7)  # numpy generators work too
    full = buffer.draw(5, rng)
    assert sorted(names(full)) == ["a", "b", "c"]  # all of them, each once
    # inclusion probability of "a" in a draw of 2 under successive sampling:
    # 1 - P(a not picked) = 1 - sum over first pick x != a of w_x/W * (W - w_x - w_a)/(W - w_x)
    total = sum(weights.values())
    missing = sum(w / total * (total - w - 1.0) / (total - w) for n, w in weights.items() if n != "a")
    trials = 20000
    hits = sum("a" in names(buffer.draw(2, rng)) for _ in range(trials))
    p = 1 - missing
    assert abs(hits / trials - p) < 4 * math.sqrt(p * (1 - p) / trials)
    assert buffer.draw(0, rng) == [] and len(buffer) == 3  # drawing does not remove


def test_capacity_evicts_oldest_first():
    buffer = ReplayBuffer(capacity=3, max_age_steps=100)
    buffer.add([S("s0a", 1.0), S("s0b", 1.0)], step=0)
    buffer.add([S("s1a", 1.0), S("s1b", 1.0)], step=1)
    assert len(buffer) == 3
    assert sorted(names(buffer.draw(3, random.Random(0)))) == ["s0b", "s1a", "s1b"]
    buffer.add([S(f"s2{i}", 1.0) for i in range(5)], step=2)  # more than capacity in one add
    assert sorted(names(buffer.draw(9, random.Random(0)))) == ["s22", "s23", "s24"]


def test_age_limit_drops_old_samples_on_add_and_draw():
    buffer = ReplayBuffer(capacity=100, max_age_steps=2)
    buffer.add([S("s0", 1.0)], step=0)
    buffer.add([S("s1", 1.0)], step=1)
    assert sorted(names(buffer.draw(9, random.Random(0), step=2))) == ["s0", "s1"]  # age 2: kept
    assert names(buffer.draw(9, random.Random(0), step=3)) == ["s1"]  # s0 is 3 steps old
    buffer.add([], step=4)  # an add with nothing to keep still moves the clock
    assert len(buffer) == 0 and buffer.clock == 4
    with pytest.raises(ValueError, match="before"):
        buffer.add([S("late", 1.0)], step=3)


def test_state_round_trip_gives_identical_draws():
    def build():
        buffer = ReplayBuffer(capacity=6, max_age_steps=3)
        rng = random.Random(5)
        for step in range(5):
            buffer.add([S(f"{step}-{i}", rng.uniform(-1, 1)) for i in range(3)], step)
        return buffer

    original = build()
    state = pickle.loads(pickle.dumps(original.state_dict()))  # as a checkpoint would
    restored = ReplayBuffer(capacity=6, max_age_steps=3)
    restored.load_state_dict(state)
    assert len(restored) == len(original) == 6 and restored.clock == original.clock == 4
    rng_a, rng_b = random.Random(99), random.Random(99)
    for step in range(5, 9):
        a = fill_batch([S(f"f{step}", 0.5)], original, 4, rng_a, step=step)
        b = fill_batch([S(f"f{step}", 0.5)], restored, 4, rng_b, step=step)
        assert names(a) == names(b)
    # a resumed run with a smaller capacity keeps the newest samples
    smaller = ReplayBuffer(capacity=2, max_age_steps=3)
    smaller.load_state_dict(state)
    assert sorted(names(smaller.draw(9, random.Random(0)))) == ["4-1", "4-2"]
    with pytest.raises(ValueError, match="format"):
        smaller.load_state_dict({"format": 0})


def test_fill_batch_sizes_and_order():
    buffer = ReplayBuffer()
    rng = random.Random(0)
    fresh = [S("f1", 1.0), S("f2", -1.0)]
    assert names(fill_batch(fresh, buffer, 8, rng, step=0)) == ["f1", "f2"]  # empty buffer: nothing to add
    assert len(buffer) == 2  # the fresh samples went in after the draw
    batch = fill_batch([S("g1", 1.0)], buffer, 8, rng, step=1)
    assert names(batch)[0] == "g1" and sorted(names(batch)[1:]) == ["f1", "f2"]  # buffer holds only 2
    buffer.add([S(f"x{i}", 0.5) for i in range(10)], step=1)
    batch = fill_batch([S("h1", 1.0), S("h2", 1.0)], buffer, 8, rng, step=2)
    assert len(batch) == 8 and names(batch)[:2] == ["h1", "h2"]
    assert len(set(map(id, batch))) == 8  # no duplicates within a batch
    many = [S(f"m{i}", 1.0) for i in range(10)]
    assert fill_batch(many, buffer, 8, rng) == many  # never truncates the fresh samples
    # without a step only the draw happens: the caller adds the fresh samples
    size = len(buffer)
    assert len(fill_batch([S("k", 1.0)], buffer, 4, rng)) == 4 and len(buffer) == size


def test_replay_target_size():
    assert replay_target_size(5, 16) == 16
    assert replay_target_size(20, 16) == 20
    assert replay_target_size(5, 16, granularity=4, fill_to_batch=False) == 8
    assert replay_target_size(8, 16, granularity=4, fill_to_batch=False) == 8
    assert replay_target_size(15, 16, granularity=6, fill_to_batch=False) == 16  # capped at the batch
    assert replay_target_size(0, 16, granularity=4, fill_to_batch=False) == 0


def test_works_with_the_pipelines_train_samples():
    buffer = ReplayBuffer()
    sample = TrainSample([1, 2], [0, 1], [0.0, -0.5], [np.zeros((2, 2, 3), np.uint8)], advantage=0.75)
    buffer.add([sample, TrainSample([1], [1], [-0.1], [], advantage=0.0)], step=0)
    (drawn,) = buffer.draw(3, random.Random(0))
    assert drawn is sample
    restored = ReplayBuffer()
    restored.load_state_dict(pickle.loads(pickle.dumps(buffer.state_dict())))
    assert restored.draw(1, random.Random(0))[0].token_ids == [1, 2]


def test_state_file_round_trip(tmp_path):
    buffer = ReplayBuffer(capacity=4, max_age_steps=2)
    buffer.add([S("a", 0.3), S("b", -0.9)], step=3)
    path = tmp_path / "replay.pkl"
    save_replay_state(path, buffer)
    assert [p.name for p in tmp_path.iterdir()] == ["replay.pkl"]  # no temporary left behind
    restored = ReplayBuffer(capacity=4, max_age_steps=2)
    load_replay_state(path, restored)
    assert restored.clock == 3
    assert names(restored.draw(2, random.Random(3))) == names(buffer.draw(2, random.Random(3)))
