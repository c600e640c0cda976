"""vanishing_gradient on real runs: eight sigmoid layers without normalisation; the first layers get ~1e-5 of
the last ones' relative gradient."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = ("deep_sigmoid",)


@pytest.mark.parametrize("name", NAMES)
def test_vanishing_gradient_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "vanishing_gradient"
    result = run_scenario(sc)
    assert_caught(result, "vanishing_gradient", allow=sc.allow)


def test_the_alert_names_the_first_layer() -> None:
    result = run_scenario(scenario("deep_sigmoid"))
    alert = result.first("vanishing_gradient")
    assert alert is not None and alert.layer == "0", result.describe()
    assert "vanish with depth" in alert.summary
