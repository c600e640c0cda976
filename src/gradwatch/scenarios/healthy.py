"""Healthy runs: common architectures, optimizers and schedules, trained correctly. None may raise a
warning or a critical alert from any registered detector."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.scenarios.base import (
    Scenario,
    Setup,
    classification_data,
    cnn,
    image_data,
    mlp,
    recurrent,
    regression_data,
    sequence_data,
    token_data,
    transformer,
    warmup_cosine,
)

__all__ = ["SCENARIOS"]


def _mlp_sgd_momentum(seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Setup(model, optimizer, regression_data(32, 64, seed), nn.functional.mse_loss)


def _mlp_adam_classifier(seed: int) -> Setup:
    model = mlp(16, 64, 5, depth=2, act=nn.ReLU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return Setup(model, optimizer, classification_data(16, 5, 64, seed), nn.functional.cross_entropy, labels=True)


def _cnn_sgd_step_decay(seed: int) -> Setup:
    model = cnn(1, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    return Setup(
        model, optimizer, image_data(4, 32, seed), nn.functional.cross_entropy, scheduler=scheduler, labels=True
    )


def _transformer_adamw_warmup(seed: int) -> Setup:
    model = transformer(vocab=16, dim=32, classes=4, length=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, warmup=30, total=240)
    data = token_data(16, 4, 8, 32, seed)
    return Setup(model, optimizer, data, nn.functional.cross_entropy, scheduler=scheduler, labels=True)


def _gru_adam(seed: int) -> Setup:
    model = recurrent(4, 32, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    return Setup(model, optimizer, sequence_data(4, 12, 32, seed), nn.functional.mse_loss)


def _noisy_small_batches(seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=2, act=nn.ReLU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    return Setup(model, optimizer, regression_data(32, 4, seed, noise=0.3), nn.functional.mse_loss)


def _mlp_adam_cosine(seed: int) -> Setup:
    model = mlp(32, 64, 1, depth=3, act=nn.GELU)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=300)
    return Setup(model, optimizer, regression_data(32, 64, seed), nn.functional.mse_loss, scheduler=scheduler)


def _deep_residual_free_sgd_warmup(seed: int) -> Setup:
    model = mlp(16, 48, 3, depth=4, act=nn.ReLU)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    scheduler = warmup_cosine(optimizer, warmup=50, total=300)
    return Setup(
        model,
        optimizer,
        classification_data(16, 3, 32, seed),
        nn.functional.cross_entropy,
        scheduler=scheduler,
        labels=True,
    )


class _TokenModel(nn.Module):
    """Embedding and a linear read-out to the vocabulary: next-token logits, flattened over positions."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(tokens)).reshape(-1, self.vocab)


def _language_model(seed: int) -> Setup:
    """Next-token prediction on Zipf-distributed tokens (vocabulary 2000, entropy 5.6 nats): the cross-entropy
    starts at log(2000) = 7.6 and falls steadily towards the data's entropy, never near zero, so its relative
    progress across a window stays small (the shape of pytorch/examples' word_language_model)."""
    vocab = 2000
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    probs /= probs.sum()
    gen = torch.Generator().manual_seed(seed + 6000)

    def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.multinomial(probs, 20 * 36, replacement=True, generator=gen).view(20, 36)
        return tokens[:, :-1], tokens[:, 1:].reshape(-1)

    model = _TokenModel(vocab, 32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return Setup(model, optimizer, data, nn.functional.cross_entropy)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("healthy_mlp_sgd", "tanh MLP regression, SGD with momentum", _mlp_sgd_momentum, steps=300),
    Scenario("healthy_mlp_adam", "ReLU MLP classifier, Adam", _mlp_adam_classifier, steps=300),
    Scenario("healthy_cnn", "small CNN with batch norm, SGD momentum, step decay", _cnn_sgd_step_decay, steps=240),
    Scenario(
        "healthy_transformer", "one-layer transformer, AdamW, warm-up + cosine", _transformer_adamw_warmup, steps=240
    ),
    Scenario("healthy_gru", "GRU sequence regression, Adam", _gru_adam, steps=240),
    Scenario(
        "healthy_noisy_batches", "ReLU MLP on batches of 4 with noisy targets, SGD", _noisy_small_batches, steps=300
    ),
    Scenario("healthy_mlp_cosine", "GELU MLP, Adam with cosine decay", _mlp_adam_cosine, steps=300),
    Scenario(
        "healthy_deep_warmup",
        "4-layer ReLU MLP classifier, Nesterov SGD, warm-up + cosine",
        _deep_residual_free_sgd_warmup,
        steps=300,
    ),
    Scenario(
        "healthy_language_model",
        "next-token model on Zipf tokens, SGD: cross-entropy falls steadily towards the data's entropy",
        _language_model,
        steps=310,
    ),
)
