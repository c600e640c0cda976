"""saturated_activation on a tanh MLP whose weights were drawn far too large: most units sit at ±1 for most inputs
from the first step, while each still meets a few inputs near the middle of its range in every batch."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

import torch
from harness import assert_caught, run_training
from torch import nn

from gradwatch.scenarios.base import classification_data, mlp


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
