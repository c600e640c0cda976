"""poor_weight_init on real runs: a tiny Gaussian initialisation (activations vanish with depth) and a constant
one (symmetric units), both caught within the first full reports and naming a layer."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_tiny_gaussian_init_is_caught_as_vanishing_with_depth() -> None:
    sc = scenario("tiny_init")
    result = run_scenario(sc)
    assert_caught(result, "poor_weight_init", within=30, allow=sc.allow)
    alert = result.first("poor_weight_init")
    assert alert is not None and "vanishes with depth" in alert.summary and alert.layer is not None, result.describe()


def test_constant_init_is_caught_as_symmetric_units_in_the_first_layer() -> None:
    sc = scenario("constant_init")
    result = run_scenario(sc)
    assert_caught(result, "poor_weight_init", within=30, allow=sc.allow)
    alert = result.first("poor_weight_init")
    assert alert is not None and alert.layer == "0" and "same value" in alert.summary, result.describe()
