#!/usr/bin/env python3
"""Cost of the way the agent hooks a model: per-module hooks (stored on the modules, as gradwatch did before
agent/dispatch.py) against process-wide hooks filtered by identity (agent/dispatch.py), on the overhead bench's
models.

Both variants watch the same modules as the agent (layers that own parameters, activation modules, the root's
input) and call the same no-op callbacks, so the difference is the mechanism alone: torch's hook path for
every module call (process-wide hooks run for unwatched modules too) and the lookup. Each forward + backward is
timed in training-thread CPU time (time.thread_time), variants interleaved in rounds; the table gives the
fastest round (the least disturbed by other processes on a shared machine), the median, and the added
microseconds per step and per module call. A first row isolates the per-call cost on a chain of 100 modules
whose forward does nothing (`chain`): there the mechanism is all there is to time.

    python bench/hook_dispatch.py [--models chain,tiny,mlp,cnn,transformer] [--rounds 7] [--steps 20]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from overhead.models import MODELS

from gradwatch.agent import dispatch
from gradwatch.agent.activations import ACTIVATION_TYPES


def _noop(*args: Any) -> None:
    return None


def _watched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if any(True for _ in m.parameters(recurse=False)) or isinstance(m, ACTIVATION_TYPES)]  # fmt: skip


def per_module(model: nn.Module) -> Callable[[], None]:
    handles = [m.register_forward_hook(_noop) for m in _watched(model)]
    handles.append(model.register_forward_pre_hook(_noop))
    return lambda: [h.remove() for h in handles] and None


def process_wide(model: nn.Module) -> Callable[[], None]:
    watches = [dispatch.watch_module(m, post=_noop) for m in _watched(model)]
    watches.append(dispatch.watch_module(model, pre=_noop, post=_noop))
    return lambda: [w.remove() for w in watches] and None


VARIANTS: dict[str, Callable[[nn.Module], Callable[[], None]] | None] = {
    "no hooks": None,
    "per-module hooks": per_module,
    "process-wide (dispatch.py)": process_wide,
}


def _calls_per_step(model: nn.Module, x: torch.Tensor) -> int:
    calls = [0]
    handles = [m.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()]
    model(x)
    for h in handles:
        h.remove()
    return calls[0]


class _Nothing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Chain(nn.Module):
    """100 modules that do nothing, one of them with a parameter (so the chain has a layer), then a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(1, 1)
        self.body = nn.Sequential(*[_Nothing() for _ in range(100)], nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.scale(x))


def run(name: str, rounds: int, steps: int) -> None:
    torch.manual_seed(0)
    if name == "chain":
        label, model, x = "chain of 100 no-op modules", _Chain(), torch.ones(1, 1)
        steps *= 10
    else:
        spec = MODELS[name]
        label, model, x = spec.label, spec.build(), spec.batch()
    for _ in range(3):
        model(x).float().sum().backward()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            install = VARIANTS[variant]
            remove = install(model) if install is not None else None
            started = time.thread_time()
            for _ in range(steps):
                model(x).float().sum().backward()
            samples[variant].append((time.thread_time() - started) / steps)
            if remove is not None:
                remove()
    calls = _calls_per_step(model, x)
    base = min(samples["no hooks"])
    print(f"{label} ({name}): {calls} module calls per forward, {len(_watched(model)) + 1} watched")
    for variant, values in samples.items():
        best, med = min(values), statistics.median(values)
        added_us = (best - base) * 1e6
        print(f"  {variant:28s} fastest {best * 1e3:9.4f} ms/step (median {med * 1e3:.4f})"
              f"  added {added_us:8.1f} us/step  {added_us / calls:6.2f} us/module call")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="chain,tiny,mlp,cnn,transformer")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps")
    for name in args.models.split(","):
        run(name, args.rounds, args.steps)


if __name__ == "__main__":
    main()
