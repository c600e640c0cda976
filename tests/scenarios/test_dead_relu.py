"""dead_relu on a real run: a bad update kills 3/4 of a ReLU layer's units; the alert names that layer."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_units_killed_by_a_bad_update_are_caught_naming_the_relu() -> None:
    sc = scenario("dead_relu")
    result = run_scenario(sc)
    # Three full-statistics reports in a row (every 10 steps) after the warm-up: at most ~4 reports.
    assert_caught(result, "dead_relu", within=40, allow=sc.allow)
    alert = result.first("dead_relu")
    assert alert is not None and alert.severity == "warning" and alert.layer == "1", result.describe()
    assert "75%" in alert.summary
