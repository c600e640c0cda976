"""update_ratio on real runs: a learning rate divided by 1e8 (every layer's updates fall below 1e-8 of its weights),
and Adam far too fast for a batch-norm MLP from its first step (updates several times the weights)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from harness import assert_caught, run_scenario, run_training, scenario
from torch import nn

from gradwatch.scenarios.base import classification_data

NAMES = ("lr_too_low",)


@pytest.mark.parametrize("name", NAMES)
def test_update_ratio_fault_is_caught(name: str) -> None:
    sc = scenario(name)
    assert sc.expect == "update_ratio"
    result = run_scenario(sc)
    assert_caught(result, "update_ratio", allow=sc.allow)


def test_a_learning_rate_collapse_is_reported_within_three_full_reports() -> None:
    result = run_scenario(scenario("lr_too_low"))
    delay = result.steps_to_alert("update_ratio")
    # Full statistics every 10 steps; the median of 5 turns after 3 low reports.
    assert delay is not None and delay <= 30, result.describe()
    alert = result.first("update_ratio")
    assert alert is not None and "too low" in alert.summary and alert.layer is not None


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
