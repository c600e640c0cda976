#!/usr/bin/env python3
"""The guard's proof on a small transformer: how much of a corrupted batch's damage does guard="skip" prevent?

A 2-layer causal transformer (CPU, one thread) learns sequences x[t+1] = (x[t] + k) mod V, k per sequence.
Every `--every` steps one batch is corrupted: a quarter of its samples get random targets and a large loss
weight (a mislabelled, over-weighted shard). Three runs see the same batches: clean (no corruption), unguarded
and guarded (gradwatch attached with guard="skip", streaming to an in-process server). The excess loss area
after an injection is the sum, over the `--window` steps after it, of how far the held-out loss of the run
lies above the clean run's (positive part). The NaN run makes one batch's loss weights NaN instead.

    python bench/guard_proof.py [--steps 1000] [--every 200] [--window 100] [--seed 0] [--json out.json]

Prints the excess area per injection for both runs, the reduction (1 - guarded / unguarded, summed over
injections), and for the NaN run whether the weights stayed finite and the final held-out loss against clean.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB, SEQ, BATCH, WIDTH = 16, 24, 32, 48
CORRUPT_FRACTION, CORRUPT_WEIGHT = 0.25, 20.0


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.randn(SEQ, WIDTH) * 0.02)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens) + self.position, mask=self.mask, is_causal=True))


def sequences(generator: torch.Generator, n: int) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (n, 1), generator=generator)
    step = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + step * torch.arange(SEQ + 1)) % VOCAB


@dataclass
class Batch:
    tokens: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    ids: list[str]
    corrupted: list[int] = field(default_factory=list)


def make_batch(step: int, seed: int, fault: str) -> Batch:
    """The batch of `step` (the same in every run); `fault`: "none", "corrupt" or "nan"."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    seq = sequences(g, BATCH)
    tokens, targets = seq[:, :-1], seq[:, 1:].clone()
    weights = torch.ones(BATCH)
    corrupted: list[int] = []
    if fault != "none":
        corrupted = sorted(torch.randperm(BATCH, generator=g)[: int(BATCH * CORRUPT_FRACTION)].tolist())
        if fault == "corrupt":
            targets[corrupted] = torch.randint(0, VOCAB, (len(corrupted), SEQ), generator=g)
            weights[corrupted] = CORRUPT_WEIGHT
        else:
            weights[corrupted] = math.nan
    return Batch(tokens, targets, weights, [f"{step}:{i}" for i in range(BATCH)], corrupted)


def train(
    steps: int,
    seed: int,
    faults: dict[int, str],
    *,
    guard: bool,
    server: str | None = None,
    window_starts: tuple[int, ...] = (),
    window: int = 0,
    run: str = "guard-proof",
) -> dict[str, Any]:
    """One run; returns the held-out loss at every step inside the windows and the final one."""
    import gradwatch

    torch.manual_seed(seed)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    monitor = None
    if guard:
        monitor = gradwatch.attach(model, optimizer, run=run, server=server, guard={"policy": "skip"})
    held_out = sequences(torch.Generator().manual_seed(10_000 + seed), 128)
    watched = {s + d for s in window_starts for d in range(1, window + 1)}
    evals: dict[int, float] = {}

    def evaluate() -> float:
        with torch.no_grad():
            logits = model(held_out[:, :-1])
            return float(nn.functional.cross_entropy(logits.reshape(-1, VOCAB), held_out[:, 1:].reshape(-1)))

    for step in range(1, steps + 1):
        b = make_batch(step, seed, faults.get(step, "none"))
        optimizer.zero_grad()
        logits = model(b.tokens)
        token_loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), b.targets.reshape(-1), reduction="none")
        per_sample = token_loss.reshape(BATCH, SEQ).mean(dim=1) * b.weights
        loss = per_sample.mean()
        loss.backward()
        if monitor is not None:
            monitor.observe_loss(loss)
        optimizer.step()
        if monitor is not None:
            monitor.step(loss, batch_ids=b.ids, sample_losses=per_sample)
        if step in watched:
            evals[step] = evaluate()
    if monitor is not None:
        monitor.close(timeout=10)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"evals": evals, "final": evaluate(), "finite": finite}


def excess_area(run: dict[str, Any], clean: dict[str, Any], start: int, window: int) -> float:
    total = 0.0
    for step in range(start + 1, start + window + 1):
        a, b = run["evals"].get(step, math.nan), clean["evals"][step]
        total += max(0.0, a - b) if math.isfinite(a) else math.inf
    return total


def prove(steps: int, every: int, window: int, seed: int, server: str) -> dict[str, Any]:
    """Both experiments; the dict behind the printed lines and the JSON."""
    injections = tuple(range(every, steps - window + 1, every))
    corrupt = {s: "corrupt" for s in injections}
    kw = {"window_starts": injections, "window": window}
    clean = train(steps, seed, {}, guard=False, **kw)
    unguarded = train(steps, seed, corrupt, guard=False, **kw)
    guarded = train(steps, seed, corrupt, guard=True, server=server, run=f"guard-proof-{seed}", **kw)
    areas = [(excess_area(unguarded, clean, s, window), excess_area(guarded, clean, s, window)) for s in injections]
    total_u, total_g = sum(a for a, _ in areas), sum(g for _, g in areas)
    nan_step = injections[len(injections) // 2]
    nan_unguarded = train(steps, seed, {nan_step: "nan"}, guard=False)
    nan_guarded = train(steps, seed, {nan_step: "nan"}, guard=True, server=server, run=f"guard-proof-nan-{seed}")
    return {
        "injections": list(injections),
        "areas": [{"step": s, "unguarded": u, "guarded": g} for s, (u, g) in zip(injections, areas, strict=True)],
        "reduction": 1.0 - total_g / total_u if total_u > 0 else math.nan,
        "clean_final": clean["final"],
        "nan": {
            "step": nan_step,
            "unguarded_finite": nan_unguarded["finite"],
            "guarded_finite": nan_guarded["finite"],
            "guarded_final": nan_guarded["final"],
            "clean_final": clean["final"],
            "relative_gap": abs(nan_guarded["final"] - clean["final"]) / clean["final"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from gradwatch.server.app import ServerApp
    from gradwatch.server.config import ServerConfig

    app = ServerApp(ServerConfig.local()).start()
    try:
        result = prove(args.steps, args.every, args.window, args.seed, app.grpc_target)
    finally:
        app.stop()
    for area in result["areas"]:
        print(f"injection at step {area['step']:>5}: excess loss area unguarded {area['unguarded']:8.3f}, "
              f"guarded {area['guarded']:8.3f}")  # fmt: skip
    print(f"reduction of the excess loss area with guard='skip': {100 * result['reduction']:.1f} %")
    nan = result["nan"]
    print(f"NaN batch at step {nan['step']}: unguarded weights finite: {nan['unguarded_finite']}; guarded weights "
          f"finite: {nan['guarded_finite']}, final held-out loss {nan['guarded_final']:.4f} vs clean "
          f"{nan['clean_final']:.4f} ({100 * nan['relative_gap']:.2f} % apart)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"command": "python bench/guard_proof.py " + " ".join(sys.argv[1:]), **result}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
