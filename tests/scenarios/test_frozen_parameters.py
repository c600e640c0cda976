"""frozen_parameters and gradients_not_applied on real runs: a layer left out of the optimizer (gradients
computed, never applied) is a warning; a deliberate freeze (requires_grad=False) is information only."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from harness import assert_caught, run_scenario, run_training, scenario
from torch import nn

from gradwatch.scenarios.base import mlp, regression_data


def test_the_layer_left_out_of_the_optimizer_is_a_warning_naming_it() -> None:
    sc = scenario("frozen_layer")
    assert sc.expect == "gradients_not_applied"
    result = run_scenario(sc)
    assert_caught(result, "gradients_not_applied", within=40, allow=sc.allow)
    alert = result.first("gradients_not_applied")
    assert alert is not None and alert.severity == "warning" and alert.layer == "0", result.describe()
    assert [a.detector for a in result.unexpected(severities=("warning", "critical"))] == ["gradients_not_applied"]
    info = result.first("frozen_parameters")
    assert info is not None and info.severity == "info" and "1 never updated" in info.summary, result.describe()


@pytest.mark.parametrize("optimizer_gets", ["all parameters", "trainable parameters"])
def test_a_deliberate_freeze_is_information_only(optimizer_gets: str) -> None:
    """requires_grad=False on the first layer: no gradient is computed, so nothing is left unapplied, whether
    the optimizer was given every parameter or only the trainable ones."""
    torch.manual_seed(0)
    model = mlp(32, 64, 1, depth=2)
    model[0].requires_grad_(False)
    params = [p for p in model.parameters() if optimizer_gets == "all parameters" or p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    result = run_training(model, optimizer, regression_data(32, 64, 0), nn.functional.mse_loss, steps=80,
                          run="deliberate-freeze")  # fmt: skip
    info = result.first("frozen_parameters")
    assert info is not None and info.severity == "info" and info.layer == "0", result.describe()
    assert result.unexpected(severities=("warning", "critical")) == [], result.describe()
