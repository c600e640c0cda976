"""Healthy runs of common setups raise no warning or critical alert from any registered detector."""

from __future__ import annotations

import statistics

import pytest

pytest.importorskip("torch")

from harness import Scenario, assert_quiet, healthy_runs, run_scenario

HEALTHY = healthy_runs()


def test_the_catalogue_has_at_least_eight_healthy_runs() -> None:
    assert len(HEALTHY) >= 8


@pytest.mark.parametrize("sc", HEALTHY, ids=[s.name for s in HEALTHY])
def test_healthy_run_raises_nothing(sc: Scenario) -> None:
    result = run_scenario(sc)
    assert_quiet(result)
    # It really trained: the median of its last ten losses is well below that of its first ten.
    assert statistics.median(result.losses[-10:]) < 0.8 * statistics.median(result.losses[:10]), result.losses[::25]
