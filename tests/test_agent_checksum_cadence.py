"""The checksum cadence on its own: within 50 steps or 30 s whatever the step time, and nested across replicas."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gradwatch.agent.checksum_cadence import MAX_SECONDS, MAX_STEPS, ChecksumCadence

step_times = st.floats(min_value=1e-5, max_value=600.0, allow_nan=False)


@given(step_s=step_times)
def test_a_steady_job_is_checked_within_50_steps_and_30_seconds(step_s: float) -> None:
    cadence = ChecksumCadence()
    for _ in range(50):
        cadence.observe(step_s)
    interval = cadence.interval
    assert interval & (interval - 1) == 0 and 1 <= interval <= MAX_STEPS
    assert interval == 1 or interval * step_s <= MAX_SECONDS * 1.0001
    due = [s for s in range(1, 201) if cadence.due(s)]
    assert all(b - a == interval for a, b in itertools.pairwise(due)) and due[0] == interval


@given(a=step_times, b=step_times)
def test_replicas_with_different_step_estimates_share_every_step_the_slower_cadence_checks(a: float, b: float) -> None:
    first, second = ChecksumCadence(), ChecksumCadence()
    first.observe(a)
    second.observe(b)
    wider = max(first.interval, second.interval)
    shared = [s for s in range(1, 257) if first.due(s) and second.due(s)]
    assert shared == list(range(wider, 257, wider))


def test_unknown_step_times_leave_the_step_cadence() -> None:
    cadence = ChecksumCadence()
    for value in (0.0, float("nan"), float("inf"), -1.0):
        cadence.observe(value)
    assert cadence.interval == 32
