"""The Trajectory record's token columns: typed arrays that grow like lists and pickle as bytes."""
import pickle
from array import array

import numpy as np
import pytest

from policies.batching import TrainSample
from policies.trajectory import Trajectory, token_array


def test_columns_are_typed_arrays_and_segments_append_in_order():
    t = Trajectory(qid="q", sample_index=0, answers=("a",))
    t.extend(token_array([1, 2, 3]), trainable=False)  # a shared prompt, as the workflow passes it
    t.extend([4, 5], trainable=True, logprobs=[-0.25, -1.5])
    t.extend(np.array([6], dtype=np.int64), trainable=False)  # any int sequence is accepted
    assert (t.token_ids.typecode, t.loss_mask.typecode, t.behaviour_logprobs.typecode) == ("i", "b", "f")
    assert t.token_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert t.loss_mask.tolist() == [0, 0, 0, 1, 1, 0]
    assert t.behaviour_logprobs.tolist() == [0.0, 0.0, 0.0, -0.25, -1.5, 0.0]  # exact in float32
    assert t.num_response_tokens == 2


def test_a_trainable_segment_needs_a_logprob_per_token():
    t = Trajectory(qid="q", sample_index=0, answers=())
    with pytest.raises(ValueError, match="log-prob per token"):
        t.extend([1, 2], trainable=True, logprobs=[-0.5])
    assert len(t.token_ids) == len(t.loss_mask) == len(t.behaviour_logprobs) == 0  # nothing half-appended


def test_columns_given_as_lists_become_arrays():
    t = Trajectory(qid="q", sample_index=0, answers=(), token_ids=[7, 8], loss_mask=[0, 1], behaviour_logprobs=[0.0, -2.0])
    assert isinstance(t.token_ids, array) and t.token_ids.tolist() == [7, 8]
    assert t.loss_mask.tolist() == [0, 1] and t.behaviour_logprobs.tolist() == [0.0, -2.0]


def test_token_array_shares_nothing_with_what_extends_from_it():
    prompt = token_array([1, 2])
    first, second = (Trajectory(qid="q", sample_index=i, answers=()) for i in range(2))
    first.extend(prompt, trainable=False)
    second.extend(prompt, trainable=False)
    first.extend([3], trainable=True, logprobs=[-1.0])
    assert prompt.tolist() == [1, 2] and second.token_ids.tolist() == [1, 2]


def test_pickled_columns_are_bytes_not_one_object_per_token():
    t = Trajectory(qid="q", sample_index=0, answers=())
    t.extend(list(range(100_000, 101_000)), trainable=True, logprobs=[-0.5] * 1000)
    as_lists = pickle.dumps((t.token_ids.tolist(), t.loss_mask.tolist(), t.behaviour_logprobs.tolist()), protocol=5)
    as_arrays = pickle.dumps((t.token_ids, t.loss_mask, t.behaviour_logprobs), protocol=5)
    assert len(as_arrays) < 9 * 1000 + 500 < len(as_lists)  # 4 + 1 + 4 bytes a token, plus headers
    restored = pickle.loads(pickle.dumps(t, protocol=5))
    assert restored.token_ids == t.token_ids and restored.loss_mask == t.loss_mask
    assert restored.behaviour_logprobs == t.behaviour_logprobs


def test_a_train_sample_takes_the_arrays_as_they_are():
    t = Trajectory(qid="q", sample_index=0, answers=(), token_ids=[1, 2, 3], loss_mask=[0, 1, 1],
                   behaviour_logprobs=[0.0, -1.0, -0.5])
    sample = TrainSample(t.token_ids, t.loss_mask, t.behaviour_logprobs, [], 1.0)
    assert sample.num_trained_tokens == 2
    np.testing.assert_array_equal(np.asarray(sample.behaviour_logprobs), np.float32([0.0, -1.0, -0.5]))
