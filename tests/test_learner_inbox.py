"""The learners' inbox: shares received ahead, trained on by key (no Ray needed)."""
import pytest

from actors.learner_inbox import ShareInbox


class RecordingLearner(ShareInbox):
    def __init__(self):
        self.trained = []

    def train_step(self, samples, filler, global_tokens):
        self.trained.append((samples, filler, global_tokens))
        return {"tokens": float(global_tokens)}


def test_a_received_share_is_trained_once_by_its_key():
    learner = RecordingLearner()
    assert learner.receive(7, ["a", "b"], "filler7") == 2
    assert learner.receive(8, ["c"], "filler8") == 1  # the next step's share, while 7 is pending
    assert learner.train_received(7, 40) == {"tokens": 40.0}
    assert learner.trained == [(["a", "b"], "filler7", 40)]
    with pytest.raises(KeyError, match="staged step 7 .*have \\[8\\]"):
        learner.train_received(7, 40)  # popped: a share never trains twice
    learner.train_received(8, 10)
    assert [t[0] for t in learner.trained] == [["a", "b"], ["c"]]


def test_each_actor_has_its_own_inbox():
    first, second = RecordingLearner(), RecordingLearner()
    first.receive(1, ["x"], None)
    with pytest.raises(KeyError):
        second.train_received(1, 1)
