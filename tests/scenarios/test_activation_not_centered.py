"""activation_not_centered on a real run: hidden sigmoid layers feed one-signed inputs to the next layer."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_hidden_sigmoid_layers_are_caught_naming_one_of_them() -> None:
    sc = scenario("sigmoid_hidden")
    result = run_scenario(sc)
    # Three warm-up reports, then five in a row over the threshold (a report every 10 steps).
    assert_caught(result, "activation_not_centered", within=90, allow=sc.allow)
    alert = result.first("activation_not_centered")
    assert alert is not None and alert.layer in ("1", "3") and "Sigmoid" in alert.summary, result.describe()
