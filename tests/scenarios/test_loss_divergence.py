"""loss_divergence on real runs: a learning-rate jump that wrecks Adam's weights, and labels misaligned with
their inputs: the loss climbs and stays high."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from harness import assert_caught, run_scenario, scenario

NAMES = (
    "diverge",
    "shuffled_labels",
)


@pytest.mark.parametrize("name", NAMES)
def test_loss_divergence_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "loss_divergence"
    result = run_scenario(sc)
    assert_caught(result, "loss_divergence", allow=sc.allow)


def test_misaligned_labels_diverge_within_ten_steps_without_a_gradient_alarm() -> None:
    result = run_scenario(scenario("shuffled_labels"))
    delay = result.steps_to_alert("loss_divergence")
    assert delay is not None and delay <= 10, result.describe()
    assert not result.fired("exploding_gradient"), result.describe()
