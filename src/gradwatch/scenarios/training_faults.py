"""Faults of the optimisation itself: non-finite values, exploding and vanishing gradients, loss trouble,
bad learning rates, frozen parameters. One `Scenario` each, named after the fault (the demo's --fault)."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.scenarios.base import Scenario, Setup, mlp, regression_data
from gradwatch.scenarios.harness import StepContext

__all__ = ["SCENARIOS"]

FEATURES = 32


def _tanh_regression(seed: int, lr: float = 0.05) -> Setup:
    model = mlp(FEATURES, 64, 1, depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Setup(model, optimizer, regression_data(FEATURES, 64, seed), nn.functional.mse_loss)


def _nan_input(seed: int) -> Setup:
    setup = _tanh_regression(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.x = ctx.x.clone()
            ctx.x[0, 0] = float("nan")

    setup.fault = fault
    return setup


def _lr_blow_up(seed: int) -> Setup:
    setup = _tanh_regression(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.scale_lr(30.0)

    setup.fault = fault
    return setup


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="nan",
        description="one input value of the batch becomes NaN (a corrupt sample)",
        build=_nan_input,
        steps=120,
        fault_step=80,
        expect="non_finite",
    ),
    Scenario(
        name="explode",
        description="the learning rate is multiplied by 30 (a bad schedule): gradients grow until they overflow",
        build=_lr_blow_up,
        steps=140,
        fault_step=80,
        expect="exploding_gradient",
        allow=("loss_divergence", "loss_spike", "update_ratio", "non_finite"),
    ),
)
