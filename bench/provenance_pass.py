#!/usr/bin/env python3
"""What the per-forward NaN provenance pass reads and costs on an ordinary step (agent/activations.py).

Per model: the bytes the agent's reductions read in one ordinary forward (a TorchDispatchMode sums the input
bytes of every `_foreach_norm` and `sum` in that forward (the model's own call, its hooks and the
end-of-forward flush), with the agent minus without: deterministic), then
training-thread CPU of the forward (time.thread_time) without the agent and with it at defaults, and the part of
it spent in the end-of-forward reduction (`ActivationTap._flush`, timed by a wrapper), in interleaved rounds in
one process; the agent streams to a real `gradwatch serve`, full statistics are kept out of the timed steps.

Models: the GPT-2 of bench/agent_phases.py (4 layers x 256, vocabulary 512, batch 8 x 64), the MLP and CNN of
bench/agent_overhead.py, its transformer (its root owns a parameter: a watched container handing on its head's
output), and residual blocks shaped like torchvision's BasicBlock (conv, batch norm, one in-place ReLU instance
called twice per block, the second time after the residual add).

    python bench/provenance_pass.py [--models gpt2,mlp,cnn,transformer,resblocks] [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.agent import activations

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
from overhead.models import MODELS

from paging_support import gradwatch_serve

_RUNS = itertools.count()
Step = Callable[[], torch.Tensor]  # one forward, returning the loss


class _Block(nn.Module):
    """torchvision's BasicBlock shape: conv, bn, relu (in place), conv, bn, += input, the same relu again."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def _resblocks() -> tuple[nn.Module, Step]:
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), *[_Block(32) for _ in range(4)], nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))  # fmt: skip
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    return model, lambda: nn.functional.cross_entropy(model(x), y)


def _gpt2() -> tuple[nn.Module, Step]:
    import transformers

    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=4, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def _overhead(name: str) -> Callable[[], tuple[nn.Module, Step]]:
    def build() -> tuple[nn.Module, Step]:
        spec = MODELS[name]
        model, x = spec.build(), spec.batch()
        y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
        return model, lambda: nn.functional.cross_entropy(model(x), y)

    return build


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Step]]] = {
    "gpt2": _gpt2, "mlp": _overhead("mlp"), "cnn": _overhead("cnn"), "transformer": _overhead("transformer"),
    "resblocks": _resblocks,
}  # fmt: skip


class _ReadBytes(TorchDispatchMode):
    """Input bytes of every reduction the provenance pass may launch."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in ("_foreach_norm", "sum"):
            first = args[0]
            tensors = first if isinstance(first, list | tuple) else [first]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return func(*args, **(kwargs or {}))


def _attach(model: nn.Module, optimizer: torch.optim.Optimizer, server: str) -> Any:
    monitor = gradwatch.attach(model, optimizer, server=server, run=f"prov-{next(_RUNS)}", overhead_budget=0,
                               full_stats_interval=100_000)  # fmt: skip
    monitor._sender._on_command = lambda steps, reason: None  # the synthetic run is not a diagnosis
    return monitor


def _step(forward: Step, optimizer: torch.optim.Optimizer, monitor: Any, count: _ReadBytes | None = None) -> float:
    """One training step; returns the forward's thread CPU seconds (`count`: around the forward only)."""
    started = time.thread_time()
    if count is None:
        loss = forward()
    else:
        with count:
            loss = forward()
    spent = time.thread_time() - started
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if monitor is not None:
        monitor.step(loss)
    return spent


def run(name: str, rounds: int, steps: int, server: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model, forward = BUILDERS[name]()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    flush_spent = [0.0]
    original = activations.ActivationTap._flush

    def timed_flush(self: Any, capture: Any) -> None:
        started = time.thread_time()
        original(self, capture)
        flush_spent[0] += time.thread_time() - started

    for _ in range(3):
        _step(forward, optimizer, None)
    bare = _ReadBytes()
    _step(forward, optimizer, None, bare)
    forward_ms: dict[str, list[float]] = {"none": [], "agent": []}
    flush_ms: list[float] = []
    agent_bytes = 0
    activations.ActivationTap._flush = timed_flush  # type: ignore[method-assign]
    try:
        for r in range(rounds):
            for variant in ("none", "agent") if r % 2 == 0 else ("agent", "none"):
                monitor = _attach(model, optimizer, server) if variant == "agent" else None
                try:
                    for _ in range(20 if monitor is not None else 2):  # past the learning report and warm-up
                        _step(forward, optimizer, monitor)
                    if monitor is not None and not agent_bytes:
                        counted = _ReadBytes()
                        _step(forward, optimizer, monitor, counted)
                        agent_bytes = counted.bytes - bare.bytes
                    flush_spent[0] = 0.0
                    spent = [_step(forward, optimizer, monitor) for _ in range(steps)]
                    forward_ms[variant].append(statistics.median(spent) * 1e3)
                    if monitor is not None:
                        flush_ms.append(flush_spent[0] / steps * 1e3)
                finally:
                    if monitor is not None:
                        monitor.close(timeout=10)
    finally:
        activations.ActivationTap._flush = original  # type: ignore[method-assign]
    return {"model": name, "agent_reduction_bytes": agent_bytes, "forward_ms": forward_ms, "flush_ms": flush_ms}


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,mlp,cnn,transformer,resblocks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, gradwatch_serve(pathlib.Path(tmp) / "server") as server:
        results = [run(name, opts.rounds, opts.steps, server) for name in opts.models.split(",")]
    print("ordinary step, one thread; forward thread CPU ms: median of per-round medians (range over rounds)")
    print(f"{'model':<12}{'agent reads MB':>15}{'forward, none':>24}{'forward, agent':>24}{'of it: flush':>24}")
    for r in results:
        fwd = r["forward_ms"]
        print(f"{r['model']:<12}{r['agent_reduction_bytes'] / 1e6:>15.3f}{_fmt(fwd['none']):>24}"
              f"{_fmt(fwd['agent']):>24}{_fmt(r['flush_ms']):>24}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
