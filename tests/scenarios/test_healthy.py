"""Healthy runs of common setups raise no warning or critical alert from any registered detector."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_quiet, healthy_runs, run_scenario

HEALTHY = healthy_runs()


def test_the_catalogue_has_at_least_eight_healthy_runs() -> None:
    assert len(HEALTHY) >= 8


@pytest.mark.parametrize("sc", HEALTHY, ids=[s.name for s in HEALTHY])
def test_healthy_run_raises_nothing(sc) -> None:  # type: ignore[no-untyped-def]
    result = run_scenario(sc)
    assert_quiet(result)
    assert result.losses[-1] < result.losses[0], "the healthy run did not learn"
