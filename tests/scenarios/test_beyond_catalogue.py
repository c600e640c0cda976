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


def _bn_mlp(seed: int, zero_head: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64),
                          nn.ReLU(), nn.Linear(64, 4))  # fmt: skip
    if zero_head:  # a zero-initialised output layer: its first updates are all of its weights
        nn.init.zeros_(model[6].weight)
        nn.init.zeros_(model[6].bias)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_adam_far_too_fast_for_a_batch_norm_mlp_is_flagged_in_its_first_steps(seed: int) -> None:
    """Adam at lr 0.3: every weight moves by about 0.3 per step, several times a default-initialised layer's
    weights, but only for the first few steps (the weights grow until batch norm absorbs the rate). The
    update ratio is measured on every step at the start of a run and judged on its absolute scale, so the
    first reports show it, long before the first full-statistics report or any baseline."""
    model = _bn_mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.3)
    result = run_training(model, optimizer, classification_data(16, 4, 32, seed), nn.functional.cross_entropy,
                          steps=40, fault_step=1, run=f"adam-0.3-bn-{seed}")  # fmt: skip
    alert = result.first("update_ratio")
    assert alert is not None and alert.step <= 5, result.describe()
    assert "too high" in alert.summary and alert.layer is not None, alert.summary


@pytest.mark.parametrize("zero_head", [False, True])
def test_the_same_mlp_at_a_usual_rate_is_quiet_even_with_a_zero_initialised_layer(zero_head: bool) -> None:
    """Adam at 1e-3 moves weights by about 1e-3 (ratios near 1e-2); a layer initialised at zero has no scale in
    its first steps (ratio 1, 1/2, 1/3 ...) and is left out of the absolute rule until it has one."""
    model = _bn_mlp(0, zero_head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    result = run_training(model, optimizer, classification_data(16, 4, 32, 0), nn.functional.cross_entropy,
                          steps=40, run=f"adam-bn-zero-{zero_head}")  # fmt: skip
    assert not result.fired("update_ratio"), result.describe()
