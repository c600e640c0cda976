"""Interleaved timing rounds: every variant runs one block of steps per round, in alternating order.

Round r runs the variants in the given order when r is even and in reverse when r is odd (ABBA...), so a
drift in the machine's load, or a neighbour's burst, hits every variant alike. Each block records the mean
wall time (time.perf_counter, after waiting for the device's queued work on CUDA) and the mean CPU time of the
training thread (time.thread_time; on CUDA: launching and Python, not the kernels) per step.
CPU time leaves out time the thread waits for a core (the machine is shared) and the work of other threads
and processes (gradwatch's sender thread, its server, wandb's service process, TensorBoard's writer thread):
it is the cost paid on the training thread. Wall time includes everything.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import ModelSpec
from .variants import BenchContext, Session, Variant

__all__ = ["Blocks", "run_model"]

BASE_WARM_STEPS = 5  # once per model, before the first round: allocator and kernel caches


@dataclass
class Blocks:
    """One variant's measurements on one model: per round, the mean seconds per step and what it said."""

    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    process_cpu_s: list[float] = field(default_factory=list)  # every thread of the bench process
    server_cpu_s: list[float] = field(default_factory=list)  # the gradwatch server process
    states: list[dict[str, Any]] = field(default_factory=list)


class _Trainer:
    """One model, its optimizer and its fixed batch, on `device`; forward and loss under bfloat16 autocast
    when `bf16`."""

    def __init__(self, spec: ModelSpec, device: torch.device, bf16: bool, clip: float | None = None) -> None:
        torch.manual_seed(0)
        self.model = spec.build().to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x = spec.batch().to(device)
        self.y = torch.randint(0, 10, (self.x.shape[0],)).to(device)
        self.device, self.bf16, self.clip = device, bf16, clip

    def run(self, steps: int, session: Session) -> None:
        model, optimizer, x, y = self.model, self.optimizer, self.x, self.y
        for _ in range(steps):
            with session.around():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            if self.clip is not None:
                session.clip_fn(model.parameters(), self.clip)
            optimizer.step()
            session.after(loss)

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA), so that wall time covers it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run_model(
    key: str,
    spec: ModelSpec,
    variants: Sequence[Variant],
    ctx: BenchContext,
    *,
    rounds: int,
    steps: int,
    warm_steps: int,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Blocks]:
    """Time `variants` on model `spec` over `rounds` interleaved rounds of `steps` timed steps each."""
    ctx.model_key = key
    trainer = _Trainer(spec, ctx.device, ctx.bf16, ctx.clip)
    trainer.run(BASE_WARM_STEPS, Session())
    results = {v.key: Blocks() for v in variants}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else reversed(variants):
            # Collect before attaching, not between warm-up and timed steps: gradwatch's budget controller would
            # take that pause for one long step and loosen its cadence during the timed block.
            gc.collect()
            session = variant.open(trainer.model, trainer.optimizer, ctx)
            try:
                trainer.run(variant.warm_steps(warm_steps), session)
                trainer.synchronize()
                wall, cpu, process, server = time.perf_counter(), time.thread_time(), time.process_time(), \
                    _process_cpu(ctx.server_pid)
                trainer.run(steps, session)
                trainer.synchronize()
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                process, server = time.process_time() - process, _process_cpu(ctx.server_pid) - server
            finally:
                state = session.close()
            blocks = results[variant.key]
            blocks.wall_s.append(wall / steps)
            blocks.cpu_s.append(cpu / steps)
            blocks.process_cpu_s.append(process / steps)
            blocks.server_cpu_s.append(server / steps)
            blocks.states.append(state)
        progress(f"  {key}: round {r + 1}/{rounds} done")
    return results


def _process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` so far (/proc; 0 where unknown)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
