"""non_finite on a real run: a NaN input at step k pages at step k, naming the input batch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_nan_input_is_caught_at_the_same_step() -> None:
    result = run_scenario(scenario("nan"))
    assert_caught(result, "non_finite", within=0)
    alert = result.first("non_finite")
    assert alert is not None and alert.severity == "critical"
    assert "input batch" in alert.summary
