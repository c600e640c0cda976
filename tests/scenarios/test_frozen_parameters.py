"""frozen_parameters on real runs: a layer left out of the optimizer is reported (info), nothing louder."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = ("frozen_layer",)


@pytest.mark.parametrize("name", NAMES)
def test_frozen_parameters_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "frozen_parameters"
    result = run_scenario(sc)
    assert_caught(result, "frozen_parameters", allow=sc.allow)


def test_the_layer_left_out_of_the_optimizer_is_named_as_never_updated() -> None:
    result = run_scenario(scenario("frozen_layer"))
    alert = result.first("frozen_parameters")
    assert alert is not None and alert.severity == "info" and alert.layer == "0", result.describe()
    assert "1 never updated" in alert.summary
    assert result.unexpected(severities=("warning", "critical")) == [], result.describe()
