"""Steps waiting for every rank's value, fed a batch of reports at once with the same outcome as one at a time.

Cross-rank detectors (rank_divergence, throughput_drop) and the run's global gradient norm keep, per step, the
values of the ranks reported so far in a bounded insertion-ordered dict: a report of a new step adds it (the
oldest is dropped beyond `capacity`), a step is complete when `size` distinct ranks reported it, and is then
judged and removed. `plan()` works out, for a batch of reports (arrays, in arrival order), what feeding them one
by one would do: which reports each step takes, where each step completes (the index of the report that
completed it: complete steps are judged in that order) and which held steps are dropped. It returns None where
one-by-one feeding would do something a batch cannot reproduce (a step dropped and then reported again within
the batch, a report of a step after the step completed within the batch): the caller then feeds one at a time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["StepPlan", "plan"]


@dataclass
class StepPlan:
    """For each step of the batch (first-seen order): its key, the indices (into the batch) of the reports it
    takes, whether it is new, and the batch index of the report that completed it (-1: still incomplete)."""

    keys: list[Hashable]
    taken: list[np.ndarray]
    new: list[bool]
    completed_at: list[int]
    #: Held steps dropped to make room, oldest first.
    dropped: list[Hashable]

    def completions(self) -> list[int]:
        """Positions (into `keys`) of the steps completed, in the order the batch completed them."""
        done = [i for i, at in enumerate(self.completed_at) if at >= 0]
        return sorted(done, key=lambda i: self.completed_at[i])


def plan(
    held: collections.OrderedDict[Hashable, object],
    keys: np.ndarray,
    ranks: np.ndarray,
    size: int,
    capacity: int,
    reported: Callable[[object, np.ndarray], np.ndarray],
    *,
    first_wins: bool,
    fits: Callable[[object], bool] = lambda _: True,
) -> StepPlan | None:
    """What feeding the reports (`keys[i]`: their step key, `ranks[i]`: their rank) one at a time would do.

    `reported(state, ranks)`: which of `ranks` a held step's state already has; `fits(state)`: False where a held
    state would be replaced by a new one (it was sized for another world size). `first_wins`: a rank's first
    report of a step counts and later ones are ignored (else the latest replaces it; it counts once either way).
    """
    if keys.size == 0:
        return StepPlan([], [], [], [], [])
    unique, first = np.unique(keys, return_index=True)
    order = np.argsort(first, kind="stable")
    step_keys: list[Hashable] = [unique[i].item() for i in order]
    taken, new, created, completed_at = [], [], [], []
    for key in step_keys:
        idx = np.flatnonzero(keys == key)
        state = held.get(key)
        fresh = state is None or not fits(state)
        r = ranks[idx]
        # Reports of ranks the step had already: ignored (first_wins) or replacing a value (counted once).
        seen = np.zeros(idx.size, dtype=bool) if fresh else reported(state, r)
        _, firsts = np.unique(r, return_index=True)
        first_of_rank = np.zeros(idx.size, dtype=bool)
        first_of_rank[firsts] = True
        counted = np.flatnonzero(first_of_rank & ~seen)
        need = max(size - (0 if fresh else _count(state)), 1)
        done = int(idx[counted[need - 1]]) if need <= counted.size else -1
        if done >= 0 and (idx > done).any():
            return None  # a report of the step after it completed: one at a time it would start the step again
        taken.append(idx[counted] if first_wins else idx)
        new.append(fresh)
        created.append(state is None)  # a state replaced for another world size keeps its place
        completed_at.append(done)
    firsts_at = [int(first[i]) for i in order]
    dropped = _dropped(held, step_keys, created, firsts_at, completed_at, capacity)
    if dropped is None:
        return None
    return StepPlan(step_keys, taken, new, completed_at, dropped)


def _count(state: object) -> int:
    """Ranks a held step has: `len()` of a dict, or the count a (values, [count]) pair carries."""
    if isinstance(state, dict):
        return len(state)
    return int(state[1][0])  # type: ignore[index]


def _dropped(
    held: collections.OrderedDict[Hashable, object],
    keys: Sequence[Hashable],
    created: Sequence[bool],
    created_at: Sequence[int],
    completed_at: Sequence[int],
    capacity: int,
) -> list[Hashable] | None:
    """Held steps dropped as the batch's new steps arrive; None when a dropped step is one the batch reports."""
    creations = sorted((created_at[i], keys[i]) for i in range(len(keys)) if created[i])
    if len(held) + len(creations) <= capacity:
        return []  # the usual case: room for every new step
    events = sorted([(at, 0, key) for at, key in creations] +
                    [(completed_at[i], 1, keys[i]) for i in range(len(keys)) if completed_at[i] >= 0])  # fmt: skip
    queue = collections.OrderedDict((k, None) for k in held)
    batch = set(keys)
    dropped = []
    for _, kind, key in events:
        if kind == 1:
            queue.pop(key, None)
            continue
        queue[key] = None
        while len(queue) > capacity:
            oldest, _ = queue.popitem(last=False)
            if oldest in batch:
                return None
            dropped.append(oldest)
    return dropped
