"""Faults seen in what the model computes and is fed: dead and saturated units, off-centre activations,
unnormalised inputs, poor initialisations, a collapsed output, imbalanced labels. One `Scenario` each, named
after the fault (the demo's --fault). A fault built into the setup (the architecture, the initialisation, the
data) is present from step 1: its `fault_step` is 1 and its setup needs no fault function.

Three healthy runs (`expect` None) probe these detectors' traps: a binary classifier whose output sigmoid
saturates as it gets confident (not a hidden layer), a 6-layer tanh net with Xavier initialisation (depth
without a vanishing signal), and a plain CNN without normalisation on small batches (sparse ReLU channels)."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.scenarios.base import Scenario, Setup, classification_data, cnn, image_data, mlp, regression_data
from gradwatch.scenarios.harness import DataFn, StepContext

__all__ = ["SCENARIOS"]

FEATURES = 16
CLASSES = 5


def _relu_classifier(seed: int) -> Setup:
    model = mlp(FEATURES, 64, CLASSES, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = classification_data(FEATURES, CLASSES, 64, seed)
    return Setup(model, optimizer, data, nn.functional.cross_entropy, labels=True)


def _dead_relu(seed: int) -> Setup:
    setup = _relu_classifier(seed)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:  # a bad update drives 3/4 of the first layer's biases far negative
            with torch.no_grad():
                ctx.model[0].bias[:48] -= 30.0  # type: ignore[index]

    setup.fault = fault
    return setup


def _saturated_tanh(seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=2, act=nn.Tanh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def fault(ctx: StepContext) -> None:
        if ctx.at_onset:  # before the first forward: 3/4 of the second tanh layer's units start saturated
            with torch.no_grad():
                bias = ctx.model[2].bias  # type: ignore[index]
                signs = torch.sign(torch.randn(48, generator=torch.Generator().manual_seed(7)))
                bias[:48] += 12.0 * signs

    return Setup(model, optimizer, regression_data(32, 64, seed), nn.functional.mse_loss, fault=fault)


def _sigmoid_hidden(seed: int) -> Setup:
    model = mlp(FEATURES, 64, CLASSES, depth=2, act=nn.Sigmoid)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = classification_data(FEATURES, CLASSES, 64, seed)
    return Setup(model, optimizer, data, nn.functional.cross_entropy, labels=True)


def _raw_pixels(seed: int) -> Setup:
    model = cnn(1, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    images = image_data(4, 32, seed)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = images(step)
        return (x * 40.0 + 128.0).clamp(0.0, 255.0), y  # 8-bit pixel values: the Normalize step was left out

    return Setup(model, optimizer, data, nn.functional.cross_entropy, labels=True)


def _deep_tanh(std: float | None, constant: float | None, seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=5, act=nn.Tanh)
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                if std is not None:
                    nn.init.normal_(module.weight, 0.0, std)
                if constant is not None:
                    nn.init.constant_(module.weight, constant)
                nn.init.zeros_(module.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return Setup(model, optimizer, regression_data(32, 64, seed), nn.functional.mse_loss)


def _tiny_init(seed: int) -> Setup:
    return _deep_tanh(0.01, None, seed)  # N(0, 0.01²) in a 5-layer tanh net: the signal shrinks ~12× per layer


def _constant_init(seed: int) -> Setup:
    return _deep_tanh(None, 0.02, seed)  # every row identical: the units of each layer stay clones


def _stuck_batch(seed: int) -> Setup:
    setup = _relu_classifier(seed)
    blobs = setup.data

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = blobs(step)
        return x[:1].expand_as(x).contiguous(), y  # a loader bug: every row of the batch is the first sample

    setup.data = data
    return setup


def _skewed_labels(features: int, classes: int, batch: int, seed: int) -> DataFn:
    """Gaussian blobs where class 0 is 95 % of the labels and the others share the rest; the majority's blob sits
    at the origin, so the inputs stay centred (only the labels are at fault)."""
    gen = torch.Generator().manual_seed(seed + 6000)
    centres = torch.randn(classes, features, generator=gen) * 1.5
    centres -= centres[0].clone()
    weights = torch.tensor([0.95] + [0.05 / (classes - 1)] * (classes - 1))

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.multinomial(weights, batch, replacement=True, generator=gen)
        return centres[y] + 0.5 * torch.randn(batch, features, generator=gen), y

    return data


def _class_imbalance(seed: int) -> Setup:
    setup = _relu_classifier(seed)
    setup.data = _skewed_labels(FEATURES, CLASSES, 64, seed)
    return setup


def _binary_sigmoid_head(seed: int) -> Setup:
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 7000)
    centre = torch.randn(FEATURES, generator=gen)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (64, 1), generator=gen).float()
        return (2.0 * y - 1.0) * centre + 0.5 * torch.randn(64, FEATURES, generator=gen), y

    return Setup(model, optimizer, data, nn.functional.binary_cross_entropy)


def _deep_tanh_xavier(seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=6, act=nn.Tanh)
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Setup(model, optimizer, regression_data(32, 64, seed), nn.functional.mse_loss)


def _plain_cnn(seed: int) -> Setup:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 4),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return Setup(model, optimizer, image_data(4, 8, seed), nn.functional.cross_entropy, labels=True)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="dead_relu",
        description="a bad update drives 3/4 of a ReLU layer's biases far negative: those units never fire again",
        build=_dead_relu,
        steps=120,
        fault_step=60,
        expect="dead_relu",
        allow=("loss_spike", "loss_not_decreasing", "frozen_parameters", "vanishing_gradient"),
    ),
    Scenario(
        name="saturated_tanh",
        description="biases of ±12 on 3/4 of a tanh layer's units (a bias-init bug) hold them deep in saturation",
        build=_saturated_tanh,
        steps=80,
        fault_step=1,
        expect="saturated_activation",
        allow=("loss_spike", "loss_not_decreasing", "vanishing_gradient", "frozen_parameters"),
    ),
    Scenario(
        name="sigmoid_hidden",
        description="hidden sigmoid layers: every input of the next layer is positive",
        build=_sigmoid_hidden,
        steps=100,
        fault_step=1,
        expect="activation_not_centered",
        allow=("loss_not_decreasing", "vanishing_gradient"),
    ),
    Scenario(
        name="raw_pixels",
        description="images fed as 8-bit pixel values (0..255): the Normalize step was left out",
        build=_raw_pixels,
        steps=60,
        fault_step=1,
        expect="input_not_normalized",
        allow=("loss_not_decreasing", "loss_spike"),
    ),
    Scenario(
        name="tiny_init",
        description="a 5-layer tanh net initialised with N(0, 0.01²) weights: activations vanish with depth",
        build=_tiny_init,
        steps=60,
        fault_step=1,
        expect="poor_weight_init",
        allow=("vanishing_gradient", "loss_not_decreasing", "output_collapse", "update_ratio"),
    ),
    Scenario(
        name="constant_init",
        description="a 5-layer tanh net with every weight set to 0.02: the units of each layer are clones",
        build=_constant_init,
        steps=60,
        fault_step=1,
        expect="poor_weight_init",
        allow=("vanishing_gradient", "loss_not_decreasing", "update_ratio"),
    ),
    Scenario(
        name="stuck_batch",
        description="a data-loader bug repeats one sample across the batch: the model answers the same for all",
        build=_stuck_batch,
        steps=80,
        fault_step=1,
        expect="output_collapse",
        allow=("loss_not_decreasing",),
    ),
    Scenario(
        name="class_imbalance",
        description="95 % of the labels are class 0; four rare classes share the rest",
        build=_class_imbalance,
        steps=100,
        fault_step=1,
        expect="class_imbalance",
    ),
    Scenario(
        "healthy_binary_sigmoid_head", "ReLU classifier, sigmoid output, BCE, Adam", _binary_sigmoid_head, steps=240
    ),
    Scenario("healthy_deep_tanh_xavier", "6-layer tanh MLP, Xavier init, SGD momentum", _deep_tanh_xavier, steps=240),
    Scenario("healthy_plain_cnn", "CNN without normalisation on batches of 8, SGD momentum", _plain_cnn, steps=240),
)
