"""Real runs beyond the catalogue (tests/scenarios/test_catalogue.py runs every catalogue scenario): variations
that pin a detector's boundary, each built here from the catalogue's models and data."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from harness import StepContext, assert_caught, run_training
from torch import nn

from gradwatch.scenarios.base import classification_data, mlp, regression_data


def test_classifier_wrecked_in_its_first_steps_is_not_blamed_on_its_initialisation() -> None:
    """Adam at lr 10 on a ReLU classifier: the weights explode with depth by the second full report, which
    poor_weight_init used to call a bad initialisation; the runaway pages instead."""
    torch.manual_seed(0)
    model = mlp(16, 64, 5, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=10.0)
    result = run_training(
        model, optimizer, classification_data(16, 5, 64, 0), nn.functional.cross_entropy,
        steps=60, fault_step=1, run="wrecked-classifier",
    )  # fmt: skip
    critical = [a for a in result.alerts if a.severity == "critical" and a.step <= 6]
    assert {a.detector for a in critical} >= {"loss_divergence"}, result.describe()
    assert not result.fired("poor_weight_init"), result.describe()


def test_the_same_jump_after_warm_up_is_still_caught_by_the_baseline() -> None:
    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.scale_lr(1000.0)

    torch.manual_seed(0)
    model = mlp(16, 64, 5, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    result = run_training(
        model, optimizer, classification_data(16, 5, 64, 0), nn.functional.cross_entropy,
        steps=120, fault=fault, fault_step=80, run="late-jump",
    )  # fmt: skip
    allow = ("loss_divergence", "loss_spike", "update_ratio", "dead_relu", "output_collapse", "frozen_parameters")
    assert_caught(result, "exploding_gradient", within=6, allow=allow)


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


@pytest.mark.parametrize("std", [1.5, 3.0])
def test_tanh_mlp_initialised_too_large_is_saturated_from_the_start(std: float) -> None:
    torch.manual_seed(0)
    model = mlp(16, 128, 5, depth=3)  # three tanh hidden layers of 128
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    result = run_training(model, optimizer, classification_data(16, 5, 64, 0), nn.functional.cross_entropy,
                          steps=60, fault_step=1, run=f"tanh-std-{std}")  # fmt: skip
    # min_reports 1 and consecutive 3 at the default cadence of 10: full reports 20, 30 and 40.
    assert_caught(result, "saturated_activation", within=40, allow=("poor_weight_init", "vanishing_gradient",
                  "loss_not_decreasing", "activation_not_centered", "output_collapse"))  # fmt: skip
    alert = result.first("saturated_activation")
    assert alert is not None and alert.layer in {"1", "3", "5"}, result.describe()
