"""update_ratio on real runs: a learning rate divided by 1e8: every layer's updates fall below 1e-8 of its weights."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = ("lr_too_low",)


@pytest.mark.parametrize("name", NAMES)
def test_update_ratio_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "update_ratio"
    result = run_scenario(sc)
    assert_caught(result, "update_ratio", allow=sc.allow)


def test_a_learning_rate_collapse_is_reported_within_three_full_reports() -> None:
    result = run_scenario(scenario("lr_too_low"))
    delay = result.steps_to_alert("update_ratio")
    # Full statistics every 10 steps; the median of 5 turns after 3 low reports.
    assert delay is not None and delay <= 30, result.describe()
    alert = result.first("update_ratio")
    assert alert is not None and "too low" in alert.summary and alert.layer is not None
