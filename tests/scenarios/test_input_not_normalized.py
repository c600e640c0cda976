"""input_not_normalized on real runs: 8-bit pixel values fed to a CNN, and NaN in an input batch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario


def test_raw_pixel_inputs_are_caught_as_off_scale() -> None:
    sc = scenario("raw_pixels")
    result = run_scenario(sc)
    assert_caught(result, "input_not_normalized", within=40, allow=sc.allow)
    alert = result.first("input_not_normalized")
    assert alert is not None and alert.layer == "input" and "off-scale" in alert.summary, result.describe()


def test_nan_in_the_input_batch_is_caught_at_that_step() -> None:
    result = run_scenario(scenario("nan"))
    assert result.steps_to_alert("input_not_normalized") == 0, result.describe()
    alert = result.first("input_not_normalized")
    assert alert is not None and "NaN or Inf" in alert.summary
