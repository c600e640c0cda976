"""The benchmark's models: one tiny model and three whose step takes >= 10 ms on one CPU thread, plus a
GPT-2-small-sized transformer for accelerators.

Every model maps a batch to 10 class logits, so one training step (cross entropy, SGD with momentum) fits
them all. Sizes were picked on a 2-core AMD EPYC: MLP ~35 ms, CNN ~19 ms, transformer ~27 ms, tiny ~0.2 ms.
`gpt2s` has GPT-2 small's shape (12 layers, width 768, 12 heads, 1024 positions, a 50257-token vocabulary:
about 124 M parameters with the 10-class head) and a batch of 8 sequences; it is for `--device cuda` (with
`--bf16`) and is left out of the default model list on a CPU, where one step takes minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a display name, how to build it and one fixed input batch."""

    label: str
    build: Callable[[], nn.Module]
    batch: Callable[[], torch.Tensor]
    large: bool  # sized for a step >= 10 ms on one CPU thread (the targets apply)
    accelerator_only: bool = False  # not in the default list on a CPU


def _mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


class TokenClassifier(nn.Module):
    """Token embedding + learned positions, an nn.TransformerEncoder, mean pooling, a linear head."""

    def __init__(self, vocab: int, seq: int, width: int, heads: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(seq, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


VOCAB, SEQ = 1000, 64
GPT2_VOCAB, GPT2_SEQ, GPT2_BATCH = 50257, 1024, 8

MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny MLP 2x64, batch 32", lambda: _mlp(64, 2), lambda: torch.randn(32, 64), large=False),
    "mlp": ModelSpec("MLP 4x1024, batch 128", lambda: _mlp(1024, 4), lambda: torch.randn(128, 1024), large=True),
    "cnn": ModelSpec("CNN 2 conv + 2 fc, 32x32, batch 32", _cnn, lambda: torch.randn(32, 3, 32, 32), large=True),
    "transformer": ModelSpec(
        f"transformer 3 layers d128 4 heads, {SEQ} tokens, batch 8",
        lambda: TokenClassifier(VOCAB, SEQ, 128, 4, 3),
        lambda: torch.randint(0, VOCAB, (8, SEQ)),
        large=True,
    ),
    "gpt2s": ModelSpec(
        f"GPT-2-small-sized transformer (12 layers d768 12 heads), {GPT2_SEQ} tokens, batch {GPT2_BATCH}",
        lambda: TokenClassifier(GPT2_VOCAB, GPT2_SEQ, 768, 12, 12),
        lambda: torch.randint(0, GPT2_VOCAB, (GPT2_BATCH, GPT2_SEQ)),
        large=True,
        accelerator_only=True,
    ),
}
