#!/usr/bin/env python3
"""Agent overhead: training step time with the agent at default settings vs. without.

Measured side by side in one process on one CPU thread: blocks of steps without
the agent and with it alternate, so drift in the machine's load hits both
alike. The agent streams to a real `gradwatch serve` in a separate process.
Prints, per model, the median step time of each arm, their ratio and the added
microseconds per step.

    python bench/agent_overhead.py [--blocks 15] [--steps 60] [--full-stats-interval N] [--no-forward-hooks]
                                   [--warm-steps 60]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

import gradwatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
from paging_support import gradwatch_serve


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
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "tiny MLP (2x64, batch 32)": (lambda: _mlp(64, 2), lambda: torch.randn(32, 64)),
    "MLP (4x1024, batch 256)": (lambda: _mlp(1024, 4), lambda: torch.randn(256, 1024)),
    "CNN (2 conv + 2 fc, 32x32, batch 64)": (_cnn, lambda: torch.randn(64, 3, 32, 32)),
}


def _block(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           steps: int, monitor: object | None) -> float:
    """Mean seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss)  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / steps


def measure(
    name: str, server: str, blocks: int, steps: int, warm_steps: int = 5, **options: object
) -> dict[str, float]:
    make_model, make_input = MODELS[name]
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = make_input()
    y = torch.randint(0, 10, (x.shape[0],))
    _block(model, opt, x, y, steps, None)  # warm-up
    bare: list[float] = []
    agent: list[float] = []
    for i in range(blocks):
        order = (False, True) if i % 2 == 0 else (True, False)
        for with_agent in order:
            if with_agent:
                monitor = gradwatch.attach(model, opt, run=f"bench-{os.getpid()}", server=server, **options)
                _block(model, opt, x, y, warm_steps, monitor)  # let the sender connect (and the budget settle)
                agent.append(_block(model, opt, x, y, steps, monitor))
                monitor.close(timeout=5)
            else:
                bare.append(_block(model, opt, x, y, steps, None))
    b, a = statistics.median(bare), statistics.median(agent)
    return {"bare_ms": b * 1e3, "agent_ms": a * 1e3, "ratio": a / b, "added_us": (a - b) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=15, help="alternating blocks per arm (default 15)")
    parser.add_argument("--steps", type=int, default=60, help="steps per block (default 60)")
    parser.add_argument("--full-stats-interval", type=int, default=None, help="agent option (default: its own)")
    parser.add_argument("--no-forward-hooks", action="store_true", help="attach with forward_hooks=False")
    parser.add_argument("--overhead-budget", type=float, default=None, help="agent option (0: no controller)")
    parser.add_argument("--warm-steps", type=int, default=5,
                        help="untimed agent steps per block first (>= 60 lets the overhead budget settle)")
    args = parser.parse_args()
    options: dict[str, object] = {}
    if args.full_stats_interval is not None:
        options["full_stats_interval"] = args.full_stats_interval
    if args.no_forward_hooks:
        options["forward_hooks"] = False
    if args.overhead_budget is not None:
        options["overhead_budget"] = args.overhead_budget
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, gradwatch {gradwatch.__version__}, 1 CPU thread, "
          f"{args.blocks} blocks x {args.steps} steps per arm, medians of block means, agent options {options}")
    print(f"{'model':<40} {'no agent ms':>12} {'agent ms':>10} {'ratio':>7} {'added us':>9}")
    with tempfile.TemporaryDirectory() as tmp, gradwatch_serve(pathlib.Path(tmp)) as server:
        for name in MODELS:
            r = measure(name, server, args.blocks, args.steps, args.warm_steps, **options)
            print(f"{name:<40} {r['bare_ms']:>12.3f} {r['agent_ms']:>10.3f} {r['ratio']:>7.3f} "
                  f"{r['added_us']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
