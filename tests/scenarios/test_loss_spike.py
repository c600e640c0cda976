"""loss_spike on real runs: one batch of garbage targets makes the loss jump once; the run recovers."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = ("spike",)


@pytest.mark.parametrize("name", NAMES)
def test_loss_spike_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "loss_spike"
    result = run_scenario(sc)
    assert_caught(result, "loss_spike", allow=sc.allow)


def test_a_spike_that_recovers_is_not_a_divergence() -> None:
    result = run_scenario(scenario("spike"))
    assert result.steps_to_alert("loss_spike") == 0, result.describe()
    assert not result.fired("loss_divergence") and not result.fired("exploding_gradient"), result.describe()
    assert result.losses[-1] < 2 * min(result.losses[:99]) + 0.05, "the run did not recover"
