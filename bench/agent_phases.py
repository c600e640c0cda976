#!/usr/bin/env python3
"""Where the agent's every-step cost lands in a transformer's step: training-thread CPU of the forward, the
backward, the optimizer step and `monitor.step()`, measured apart, without the agent, with it at defaults and
with `forward_hooks=False` (no activation statistics, no NaN provenance), in interleaved rounds in one process.

A small GPT-2 (transformers, randomly initialised, nothing downloaded), batch 8 × 64 tokens, AdamW, one thread.
The agent streams to a real `gradwatch serve`; a full-statistics interval longer than the run and
`overhead_budget=0` keep the timed steps ordinary ones (update-ratio steps, every 8th, included in the medians'
population), and the server's FULL_STATS commands are ignored (the synthetic run is not a diagnosis).

    python bench/agent_phases.py [--rounds 3] [--steps 24] [--layers 4] [--width 256]
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import transformers

import gradwatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
from paging_support import gradwatch_serve

PHASES = ("forward", "backward", "optimizer", "monitor.step")
VARIANTS = {"none": None, "defaults": {}, "forward_hooks=False": {"forward_hooks": False}}
_RUNS = itertools.count()


def measure(model: Any, optimizer: Any, ids: torch.Tensor, steps: int, monitor: Any) -> list[float]:
    """Median ms of each phase over `steps` steps."""
    spent: list[list[float]] = [[] for _ in PHASES]
    for _ in range(steps):
        marks = [time.thread_time()]
        out = model(input_ids=ids, labels=ids)
        marks.append(time.thread_time())
        out.loss.backward()
        marks.append(time.thread_time())
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.thread_time())
        if monitor is not None:
            monitor.step(out.loss)
        marks.append(time.thread_time())
        for i in range(len(PHASES)):
            spent[i].append(marks[i + 1] - marks[i])
    return [statistics.median(s) * 1e3 for s in spent]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=opts.width, n_layer=opts.layers,
                                     n_head=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    results: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp, gradwatch_serve(pathlib.Path(tmp) / "server") as server:
        measure(model, optimizer, ids, 4, None)  # warm-up
        for r in range(opts.rounds):
            order = list(VARIANTS)
            for name in order[r % 3 :] + order[: r % 3]:  # each variant first in some round
                options = VARIANTS[name]
                monitor = None
                if options is not None:
                    monitor = gradwatch.attach(model, optimizer, server=server, run=f"phases-{next(_RUNS)}",
                                               overhead_budget=0, full_stats_interval=100_000, **options)  # fmt: skip
                    monitor._sender._on_command = lambda steps, reason: None  # type: ignore[attr-defined]
                    measure(model, optimizer, ids, 20, monitor)  # past the update ratio's every-step start
                try:
                    results[name].append(measure(model, optimizer, ids, opts.steps, monitor))
                finally:
                    if monitor is not None:
                        monitor.close(timeout=10)
    print(f"GPT-2 {opts.layers} layers x {opts.width}, batch 8 x 64, {opts.steps} steps x {opts.rounds} rounds; "
          "training-thread CPU ms per step, median over rounds of the per-round medians")  # fmt: skip
    base = [statistics.median(r[i] for r in results["none"]) for i in range(len(PHASES))]
    print(f"{'variant':<22}" + "".join(f"{p:>14}" for p in PHASES) + f"{'total':>10}{'added':>9}")
    for name, rounds in results.items():
        row = [statistics.median(r[i] for r in rounds) for i in range(len(PHASES))]
        print(f"{name:<22}" + "".join(f"{x:>14.2f}" for x in row) + f"{sum(row):>10.2f}{sum(row) - sum(base):>+9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
