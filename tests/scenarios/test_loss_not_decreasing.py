"""loss_not_decreasing on real runs: a learning rate of zero from the first step: the loss never moves."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = ("lr_zero",)


@pytest.mark.parametrize("name", NAMES)
def test_loss_not_decreasing_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "loss_not_decreasing"
    result = run_scenario(sc)
    assert_caught(result, "loss_not_decreasing", allow=sc.allow)


def test_a_flat_loss_is_reported_after_one_window() -> None:
    result = run_scenario(scenario("lr_zero"))
    alert = result.first("loss_not_decreasing")
    assert alert is not None and alert.severity == "warning"
    # The default window is 200 reports, judged 10 times in a row.
    assert alert.step <= 220, result.describe()
    assert "not decreasing" in alert.summary


def test_a_steady_fall_towards_a_high_floor_is_progress() -> None:
    """The shape of pytorch/examples' word_language_model (Transformer, lr 5: 9.1 → 6.35 over one epoch): the
    cross-entropy falls every stretch of the window, by less than 5 % between its halves, far from zero."""
    result = run_scenario(scenario("healthy_language_model"))
    assert result.losses[-1] < 0.85 * result.losses[0], result.losses[::40]  # it did learn, steadily
    assert not result.fired("loss_not_decreasing"), result.describe()
