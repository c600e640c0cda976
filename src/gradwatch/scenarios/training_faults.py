"""Faults of the optimisation itself: non-finite values, exploding and vanishing gradients, loss trouble,
bad learning rates, frozen parameters. One `Scenario` each, named after the fault (the demo's --fault)."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.scenarios.base import Scenario, Setup, classification_data, mlp, regression_data
from gradwatch.scenarios.harness import StepContext

__all__ = ["SCENARIOS"]

FEATURES = 32


def _tanh_regression(seed: int, lr: float = 0.05) -> Setup:
    model = mlp(FEATURES, 64, 1, depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return Setup(model, optimizer, regression_data(FEATURES, 64, seed), nn.functional.mse_loss)


def _adam_classifier(seed: int, lr: float = 1e-3) -> Setup:
    model = mlp(16, 64, 5, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return Setup(model, optimizer, classification_data(16, 5, 64, seed), nn.functional.cross_entropy, labels=True)


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


def _adam_lr_jump(seed: int) -> Setup:
    """Adam's steps are bounded by its learning rate, so a 300× jump wrecks the weights without overflowing."""
    setup = _adam_classifier(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.scale_lr(300.0)

    setup.fault = fault
    return setup


def _shuffled_labels(seed: int) -> Setup:
    """From the onset the labels are shuffled within each batch (inputs and labels misaligned)."""
    setup = _adam_classifier(seed)
    gen = torch.Generator().manual_seed(seed + 77)

    def fault(ctx: StepContext) -> None:
        ctx.y = ctx.y[torch.randperm(ctx.y.numel(), generator=gen)]

    setup.fault = fault
    return setup


def _bad_batch(seed: int) -> Setup:
    """One batch whose targets are garbage (a corrupt shard record): the loss jumps for one step."""
    setup = _tanh_regression(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.y = ctx.y + 2.0 * torch.randn_like(ctx.y)

    setup.fault = fault
    return setup


def _lr_zero(seed: int) -> Setup:
    """A schedule that starts (and stays) at a learning rate of zero: nothing is learned."""
    setup = _adam_classifier(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.scale_lr(0.0)

    setup.fault = fault
    return setup


def _deep_sigmoid(seed: int) -> Setup:
    """Eight sigmoid layers, no normalisation, no residuals: the early layers get ~1e-5 of the gradient."""
    model = mlp(FEATURES, 64, 1, depth=8, act=nn.Sigmoid)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, optimizer, regression_data(FEATURES, 64, seed), nn.functional.mse_loss)


def _lr_too_low(seed: int) -> Setup:
    """A decay that divides the learning rate by 1e8: every update becomes ~1e-11 of the weights."""
    setup = _tanh_regression(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:
            ctx.scale_lr(1e-8)

    setup.fault = fault
    return setup


def _broken_from_start(seed: int) -> Setup:
    """Adam at a learning rate of 10 from the first step on a ReLU MLP: every weight moves by ~10 per step, so
    the loss reaches 1e9 within a few steps and stays there, finite (Adam's step is bounded by its rate)."""
    model = mlp(FEATURES, 64, 1, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=10.0)
    return Setup(model, optimizer, regression_data(FEATURES, 64, seed), nn.functional.mse_loss)


def _layer_not_in_optimizer(seed: int) -> Setup:
    """The first layer was left out of the optimizer: it has gradients but never changes."""
    model = mlp(FEATURES, 64, 1, depth=2)
    optimizer = torch.optim.SGD(list(model[2].parameters()) + list(model[4].parameters()), lr=0.05, momentum=0.9)
    return Setup(model, optimizer, regression_data(FEATURES, 64, seed), nn.functional.mse_loss)


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
    Scenario(
        name="diverge",
        description="Adam's learning rate jumps 300×: the loss climbs and stays high, without overflowing",
        build=_adam_lr_jump,
        steps=200,
        fault_step=100,
        expect="loss_divergence",
        # The wrecked weights also get huge gradients: exploding_gradient pages for both (it inhibits this one).
        allow=("loss_spike", "update_ratio", "exploding_gradient", "loss_not_decreasing"),
    ),
    Scenario(
        name="shuffled_labels",
        description="labels shuffled against their inputs from the onset (a data pipeline bug)",
        build=_shuffled_labels,
        steps=200,
        fault_step=100,
        expect="loss_divergence",
        allow=("loss_spike", "loss_not_decreasing"),
    ),
    Scenario(
        name="spike",
        description="one batch with garbage targets (a corrupt record): the loss jumps once and recovers",
        build=_bad_batch,
        steps=160,
        fault_step=100,
        expect="loss_spike",
    ),
    Scenario(
        name="lr_zero",
        description="the learning rate is zero from the first step: the loss never moves",
        build=_lr_zero,
        steps=240,
        fault_step=1,
        expect="loss_not_decreasing",
        allow=("frozen_parameters",),
    ),
    Scenario(
        name="deep_sigmoid",
        description="eight sigmoid layers without normalisation or residuals: gradients vanish with depth",
        build=_deep_sigmoid,
        steps=80,
        fault_step=1,
        expect="vanishing_gradient",
        # The same fault seen from other angles: saturated sigmoids, one-signed activations, a flat output, and
        # first layers that barely move.
        allow=(
            "loss_not_decreasing",
            "saturated_activation",
            "activation_not_centered",
            "poor_weight_init",
            "output_collapse",
            "update_ratio",
        ),
    ),
    Scenario(
        name="lr_too_low",
        description="the learning rate is divided by 1e8 (a decay gone wrong): updates stop mattering",
        build=_lr_too_low,
        steps=160,
        fault_step=60,
        expect="update_ratio",
        allow=("loss_not_decreasing",),
    ),
    Scenario(
        name="broken_from_start",
        description="Adam at learning rate 10 from the first step: catastrophic before any baseline forms",
        build=_broken_from_start,
        steps=60,
        fault_step=1,
        expect="exploding_gradient",
        # The same runaway seen from the loss, the updates, and the units it killed; never the initialisation.
        allow=("loss_divergence", "loss_spike", "update_ratio", "dead_relu", "output_collapse", "frozen_parameters"),
    ),
    Scenario(
        name="frozen_layer",
        description="the first layer is left out of the optimizer: it gets gradients but never changes",
        build=_layer_not_in_optimizer,
        steps=80,
        fault_step=1,
        expect="gradients_not_applied",
        allow=("frozen_parameters",),
    ),
)
