#!/usr/bin/env python3
"""Where the agent's every-step cost lands in a step: training-thread CPU of the forward, the backward, the
loop's clip (`--clip`), the optimizer step and `monitor.step()`, measured apart, without the agent, with it at
defaults and with `forward_hooks=False` (no activation statistics, no NaN provenance), in interleaved rounds in
one process; and, per step of each variant's timed block, the CPU of the process's other threads (the agent's
sender and gRPC threads) and of the co-located `gradwatch serve` process (/proc), so the agent's own training-
thread cost is read apart from what runs beside it.

`--model gpt2` (default): a small GPT-2 (transformers, randomly initialised, nothing downloaded), batch 8 × 64
tokens, AdamW. `--model mlp|cnn|transformer|tiny`: the overhead bench's models and loop (bench/overhead/models.py,
SGD with momentum, cross entropy). One thread. The agent streams to a real `gradwatch serve`; a full-statistics
interval longer than the run and `overhead_budget=0` keep the timed steps ordinary ones (update-ratio steps, every
8th, and checksum steps, every 32nd, included in the medians' population), and the server's FULL_STATS commands
are ignored (the synthetic run is not a diagnosis). With `--clip` the loop clips to norm 1 (torch's
clip_grad_norm_ without the agent, gradwatch's drop-in with it).

    python bench/agent_phases.py [--model gpt2] [--clip] [--rounds 3] [--steps 24] [--layers 4] [--width 256]
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

import gradwatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/overhead/
from overhead.models import MODELS
from overhead.rounds import _process_cpu

from paging_support import gradwatch_server

PHASES = ("forward", "backward", "clip", "optimizer", "monitor.step")
VARIANTS = {"none": None, "defaults": {}, "forward_hooks=False": {"forward_hooks": False}}
_RUNS = itertools.count()


class Loop:
    """One model, its optimizer and batch: `loss()` is the forward (and loss), the rest of a step follows it."""

    def __init__(self, opts: argparse.Namespace) -> None:
        torch.manual_seed(0)
        self.clip = opts.clip
        if opts.model == "gpt2":
            import transformers

            config = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=opts.width,
                                             n_layer=opts.layers, n_head=4)  # fmt: skip
            self.model: torch.nn.Module = transformers.GPT2LMHeadModel(config)
            self.model.train()
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
            ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
            self.loss = lambda: self.model(input_ids=ids, labels=ids).loss
            self.label = f"GPT-2 {opts.layers} layers x {opts.width}, batch 8 x 64, AdamW"
            return
        spec = MODELS[opts.model]
        self.model = spec.build()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        x = spec.batch()
        y = torch.randint(0, 10, (x.shape[0],))
        self.loss = lambda: torch.nn.functional.cross_entropy(self.model(x), y)
        self.label = f"{spec.label}, SGD with momentum"

    def measure(self, steps: int, monitor: Any) -> list[float]:
        """Median ms of each phase over `steps` steps."""
        clip = torch.nn.utils.clip_grad_norm_ if monitor is None else gradwatch.clip_grad_norm_
        spent: list[list[float]] = [[] for _ in PHASES]
        for _ in range(steps):
            marks = [time.thread_time()]
            loss = self.loss()
            marks.append(time.thread_time())
            loss.backward()
            marks.append(time.thread_time())
            if self.clip:
                clip(self.model.parameters(), 1.0)
            marks.append(time.thread_time())
            self.optimizer.step()
            self.optimizer.zero_grad()
            marks.append(time.thread_time())
            if monitor is not None:
                monitor.step(loss)
            marks.append(time.thread_time())
            for i in range(len(PHASES)):
                spent[i].append(marks[i + 1] - marks[i])
        return [statistics.median(s) * 1e3 for s in spent]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", choices=("gpt2", *MODELS))
    parser.add_argument("--clip", action="store_true", help="the loop clips gradients to norm 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    loop = Loop(opts)
    results: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    beside: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}  # (other threads, server) ms/step
    with tempfile.TemporaryDirectory() as tmp, gradwatch_server(pathlib.Path(tmp) / "server") as (server, pid):
        loop.measure(4, None)  # warm-up
        for r in range(opts.rounds):
            order = list(VARIANTS)
            for name in order[r % 3 :] + order[: r % 3]:  # each variant first in some round
                options = VARIANTS[name]
                monitor = None
                if options is not None:
                    monitor = gradwatch.attach(loop.model, loop.optimizer, server=server, run=f"phases-{next(_RUNS)}",
                                               overhead_budget=0, full_stats_interval=100_000, **options)  # fmt: skip
                    monitor._sender._on_command = lambda steps, reason: None  # type: ignore[attr-defined]
                    loop.measure(20, monitor)  # past the update ratio's every-step start
                try:
                    process, thread, served = time.process_time(), time.thread_time(), _process_cpu(pid)
                    results[name].append(loop.measure(opts.steps, monitor))
                    others = (time.process_time() - process) - (time.thread_time() - thread)
                    beside[name].append((others / opts.steps * 1e3, (_process_cpu(pid) - served) / opts.steps * 1e3))
                finally:
                    if monitor is not None:
                        monitor.close(timeout=10)
    print(f"{loop.label}{', the loop clips' if opts.clip else ''}, {opts.steps} steps x {opts.rounds} rounds; "
          "training-thread CPU ms per step, median over rounds of the per-round medians; beside it, CPU ms per "
          "step of the process's other threads and of the gradwatch server (medians over rounds)")  # fmt: skip
    base = [statistics.median(r[i] for r in results["none"]) for i in range(len(PHASES))]
    print(f"{'variant':<22}" + "".join(f"{p:>14}" for p in PHASES) + f"{'total':>10}{'added':>9}"
          f"{'others':>9}{'server':>9}")  # fmt: skip
    for name, rounds in results.items():
        row = [statistics.median(r[i] for r in rounds) for i in range(len(PHASES))]
        others = statistics.median(b[0] for b in beside[name])
        served = statistics.median(b[1] for b in beside[name])
        print(f"{name:<22}" + "".join(f"{x:>14.3f}" for x in row) + f"{sum(row):>10.2f}{sum(row) - sum(base):>+9.2f}"
              f"{others:>9.2f}{served:>9.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
