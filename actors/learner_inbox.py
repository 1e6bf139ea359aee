"""Learner actors' inbox: a step's shares delivered while the step before trains (no torch here,
so the simulated learner can share it).

`LearnerGroup.stage` sends each rank its share of a coming step with `receive`; Ray fetches and
deserializes the arguments before a task starts, so doing that in a call of its own, beside the
running step (the learners are threaded actors), takes it off the serial learner stage:
`train_received` then starts at once. On the 64-engine simulation that fetch took 0.2-0.8 s per
step on the loaded host (README, "Status")."""
from __future__ import annotations

import threading
from typing import Any


class ShareInbox:
    """Mixin for learner actor classes that have `train_step(samples, filler, global_tokens)`."""

    _inbox_guard = threading.Lock()  # class-wide: one actor per process, and it only guards a dict

    def receive(self, key: int, samples: list, filler: Any) -> int:
        """Hold this rank's share of staged step `key`; returns how many samples it has."""
        with self._inbox_guard:
            vars(self).setdefault("_inbox", {})[key] = (samples, filler)
        return len(samples)

    def train_received(self, key: int, global_tokens: int) -> dict:
        """`train_step` on the share of step `key` (the driver waits for its `receive` first)."""
        with self._inbox_guard:
            inbox = vars(self).get("_inbox", {})
            if key not in inbox:
                raise KeyError(f"no share received for staged step {key} (have {sorted(inbox)})")
            samples, filler = inbox.pop(key)
        return self.train_step(samples, filler, global_tokens)
