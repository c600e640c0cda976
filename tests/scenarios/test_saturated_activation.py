"""saturated_activation on a real run: tanh units held deep in saturation by large biases; the alert names the
layer, and the output module (not saturated) is not blamed."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_tanh_units_stuck_in_saturation_are_caught() -> None:
    sc = scenario("saturated_tanh")
    result = run_scenario(sc)
    assert_caught(result, "saturated_activation", within=50, allow=sc.allow)
    alert = result.first("saturated_activation")
    assert alert is not None and alert.layer == "3" and "Tanh" in alert.summary, result.describe()
    assert not result.fired("dead_relu") and not result.fired("activation_not_centered")
