"""What a scenario is, and the small models and data streams the catalogue builds them from.

A `Scenario` is a named, seeded recipe: `build(seed)` returns a fresh `Setup` (model, optimizer, per-step
data function, loss, optional fault, scheduler) and `run_scenario` trains it under the harness. `expect` is
the detector the fault must raise (None for a healthy run, which must raise no warning or critical alert);
`allow` lists detectors that may also fire because they describe the same fault from another angle.
Everything runs on one CPU thread in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradwatch.scenarios.harness import DataFn, FaultFn, LossFn, RunResult, run_training

__all__ = [
    "Scenario",
    "Setup",
    "classification_data",
    "cnn",
    "mlp",
    "recurrent",
    "regression_data",
    "run_scenario",
    "sequence_data",
    "transformer",
    "warmup_cosine",
]


@dataclass
class Setup:
    """Everything one run needs; built fresh for each run by `Scenario.build(seed)`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: DataFn
    loss_fn: LossFn
    fault: FaultFn | None = None
    scheduler: Any = None
    labels: bool = False


@dataclass(frozen=True)
class Scenario:
    """A named training run, healthy (`expect` None) or with a fault injected at `fault_step`."""

    name: str
    description: str
    build: Callable[[int], Setup]
    steps: int
    expect: str | None = None
    fault_step: int | None = None
    allow: tuple[str, ...] = ()
    attach_options: Mapping[str, Any] = field(default_factory=dict)
    detectors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.expect is None) != (self.fault_step is None):
            raise ValueError(f"scenario {self.name!r}: a fault scenario needs both expect and fault_step")

    @property
    def healthy(self) -> bool:
        return self.expect is None


def run_scenario(scenario: Scenario, seed: int = 0, **hooks: Any) -> RunResult:
    """Build and train `scenario` (one CPU thread) under the harness; `hooks`: run_training's on_step and
    on_alert."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    setup = scenario.build(seed)
    if setup.fault is not None and scenario.fault_step is None:
        raise ValueError(f"scenario {scenario.name!r}: a fault needs a fault_step")
    return run_training(
        setup.model,
        setup.optimizer,
        setup.data,
        setup.loss_fn,
        steps=scenario.steps,
        fault=setup.fault,
        fault_step=scenario.fault_step,
        scheduler=setup.scheduler,
        labels=setup.labels,
        run=f"{scenario.name}-{seed}",
        attach_options=scenario.attach_options,
        detectors=scenario.detectors,
        **hooks,
    )


# ------------------------------------------------------------------ models


def mlp(features: int, hidden: int, out: int, depth: int = 2, act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear/activation stack with `depth` hidden layers."""
    layers: list[nn.Module] = []
    width = features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def cnn(channels: int = 1, classes: int = 4) -> nn.Sequential:
    """Two conv blocks with batch normalisation, pooled into a linear head (8×8 inputs)."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class _Transformer(nn.Module):
    """Embedding, one pre-norm encoder layer, mean pooling, linear head."""

    def __init__(self, vocab: int, dim: int, classes: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(h.mean(dim=1))


def transformer(vocab: int = 16, dim: int = 32, classes: int = 4, length: int = 8) -> nn.Module:
    return _Transformer(vocab, dim, classes, length)


class _Recurrent(nn.Module):
    """A one-layer GRU over a sequence; the last hidden state feeds a linear head."""

    def __init__(self, features: int, hidden: int, out: int) -> None:
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        return self.head(h[:, -1])


def recurrent(features: int = 4, hidden: int = 32, out: int = 1) -> nn.Module:
    return _Recurrent(features, hidden, out)


# ------------------------------------------------------------------ data


def regression_data(features: int, batch: int, seed: int, noise: float = 0.05) -> DataFn:
    """Fresh standard-normal inputs each step; targets from a fixed smooth teacher plus noise."""
    gen = torch.Generator().manual_seed(seed + 1000)
    teacher = torch.randn(features, 1, generator=gen) / math.sqrt(features)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, features, generator=gen)
        y = torch.tanh(2.0 * x @ teacher) + noise * torch.randn(batch, 1, generator=gen)
        return x, y

    return data


def classification_data(features: int, classes: int, batch: int, seed: int, noise: float = 0.5) -> DataFn:
    """Gaussian blobs around fixed class centres; balanced labels."""
    gen = torch.Generator().manual_seed(seed + 2000)
    centres = torch.randn(classes, features, generator=gen) * 1.5

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (batch,), generator=gen)
        x = centres[y] + noise * torch.randn(batch, features, generator=gen)
        return x, y

    return data


def image_data(classes: int, batch: int, seed: int) -> DataFn:
    """8×8 one-channel images: a class-specific pattern plus noise."""
    gen = torch.Generator().manual_seed(seed + 3000)
    patterns = torch.randn(classes, 1, 8, 8, generator=gen)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (batch,), generator=gen)
        x = patterns[y] + 0.7 * torch.randn(batch, 1, 8, 8, generator=gen)
        return x, y

    return data


def token_data(vocab: int, classes: int, length: int, batch: int, seed: int) -> DataFn:
    """Token sequences classified by the bucket of their first token (balanced classes): the model must
    learn to attend to one position."""
    gen = torch.Generator().manual_seed(seed + 4000)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, vocab, (batch, length), generator=gen)
        return tokens, tokens[:, 0] * classes // vocab

    return data


def sequence_data(features: int, length: int, batch: int, seed: int) -> DataFn:
    """Random sequences; the target is a smooth function of their running sum."""
    gen = torch.Generator().manual_seed(seed + 5000)
    weights = torch.randn(features, generator=gen) / math.sqrt(features)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(batch, length, features, generator=gen)
        y = torch.tanh((x @ weights).sum(dim=1, keepdim=True) / math.sqrt(length))
        return x, y

    return data


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 10 % by `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
