"""A run catastrophic from its first steps pages critical within the warm-up and blames the runaway, not the
initialisation; the same fault later in a run is still caught by the baseline rules."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from harness import StepContext, assert_caught, run_scenario, run_training, scenario
from torch import nn

from gradwatch.scenarios.base import classification_data, mlp


@pytest.mark.parametrize("seed", [0, 1])
def test_learning_rate_far_too_high_from_step_one_pages_within_the_warm_up(seed: int) -> None:
    sc = scenario("broken_from_start")
    result = run_scenario(sc, seed)
    # Step 1's norm is the reference; steps 2 and 3 are the first two over it (consecutive = 2).
    assert_caught(result, "exploding_gradient", within=5, allow=sc.allow)
    assert result.first("exploding_gradient").severity == "critical"
    assert "first norm" in result.first("exploding_gradient").summary, result.describe()
    assert not result.fired("poor_weight_init"), result.describe()


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
