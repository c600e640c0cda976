#!/usr/bin/env python3
"""What the agent adds to the training thread, as a GPU would feel it: device operations launched per step, and
training-thread CPU time per step, on MLPs of 10, 100 and 1,000 modules.

Device operations: a TorchDispatchMode counts every aten operation dispatched on the training thread during one
whole step (forward, loss, backward, optimizer step, `monitor.step()`), with and without the agent; the
difference is what the agent launches. On a GPU each is (at least) one kernel launch and a few µs of host time.
Counted on ordinary steps and on full-statistics steps separately (the step's kind is fixed before it runs). On
the CPU the report vector is joined on the sender thread (agent/snapshot.py); on an accelerator that join (one
stack per list of scalars, one cat) runs on the training thread: it is counted separately ("join").

CPU time: `time.thread_time()` around blocks of steps, no agent and agent in the same process, interleaved in
rounds; the agent's first `--early` steps after attach (the overhead budget controller's warm-up: agent/budget.py)
are reported apart from the steps after them. The agent streams to a real `gradwatch serve` in its own process;
its FULL_STATS commands are ignored (`_ignore_commands`).
Added µs per step are compared with the target 50 µs + 0.5 µs per hooked module (module calls that reach the
agent's callbacks: layers, activations and the root).

    python bench/agent_ops.py [--modules 10,100,1000] [--rounds 3] [--early 300] [--steps 300] [--clip]
                              [--width 32] [--batch 16] [--device cpu|cuda] [--json out.json]

On CUDA the counts are the same kind of figure (aten operations dispatched by the training thread, each at least
one kernel launch or a host-side view); CPU time is then the launch side only.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import json
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
from gradwatch.agent import dispatch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
from paging_support import gradwatch_serve


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active (this thread, and autograd's for its backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def build_mlp(modules: int, width: int) -> nn.Sequential:
    """An MLP of exactly `modules` modules below the root: Linear and ReLU alternating (a Linear first)."""
    layers: list[nn.Module] = [nn.Linear(width, width) if i % 2 == 0 else nn.ReLU() for i in range(modules)]
    return nn.Sequential(*layers)


class Loop:
    """One model, its optimizer and one fixed batch; `step(monitor)` is one training iteration."""

    def __init__(self, modules: int, width: int, batch: int, clip: bool, device: str = "cpu") -> None:
        torch.manual_seed(0)
        self.model = build_mlp(modules, width).to(device)
        for m in self.model.modules():  # keep 1,000 layers' activations in range
            if isinstance(m, nn.Linear):
                nn.init.orthogonal_(m.weight)
                nn.init.zeros_(m.bias)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.x = torch.randn(batch, width, device=device)
        self.y = torch.randint(0, width, (batch,), device=device)
        self.clip = clip
        self.clip_fn: Callable[..., Any] = torch.nn.utils.clip_grad_norm_

    def step(self, monitor: Any) -> None:
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            self.clip_fn(self.model.parameters(), 1.0)
        self.optimizer.step()
        if monitor is not None:
            monitor.step(loss)


def _clip_function(agent: bool) -> Callable[..., Any]:
    """The loop's clip: gradwatch's drop-in when the agent is on and this gradwatch has one, else torch's."""
    if agent and hasattr(gradwatch, "clip_grad_norm_"):
        return gradwatch.clip_grad_norm_  # type: ignore[no-any-return]
    return torch.nn.utils.clip_grad_norm_


def count_ops(loop: Loop, server: str, warm: int, probe: int) -> dict[str, Any]:
    """Operations of one step without the agent, and of ordinary and full steps with it (medians over `probe`)."""
    loop.clip_fn = _clip_function(False)
    for _ in range(3):
        loop.step(None)
    bare = []
    for _ in range(3):
        with OpCounter() as counter:
            loop.step(None)
        bare.append(counter.ops)
    base = bare[-1]
    loop.clip_fn = _clip_function(True)
    monitor = gradwatch.attach(loop.model, loop.optimizer, run=f"ops-{id(loop)}", server=server)
    hooked = sum(1 for e in dispatch._modules.values() if e.ref() is not None)
    ordinary: list[collections.Counter[str]] = []
    full: list[collections.Counter[str]] = []
    joins: list[int] = []
    submitted: list[Any] = []
    submit = monitor._sender.submit

    def keep(item: Any) -> None:  # the report's segments, before the sender thread joins them
        values = getattr(getattr(item, "payload", None), "values", None)
        submitted[:] = [getattr(values, "_segments", None)]
        submit(item)

    monitor._sender.submit = keep
    _ignore_commands(monitor)
    try:
        for _ in range(warm):
            loop.step(monitor)
        for _ in range(probe):
            is_full = monitor._begin_step()
            with OpCounter() as counter:
                loop.step(monitor)
            (full if is_full else ordinary).append(counter.ops)
            joins.append(_join_ops(submitted[0] if submitted else None))
        if not full:  # the budget stretched the cadence: ask for two full steps as a server command would
            monitor._full_until = monitor._step_count + 2
            for _ in range(2):
                monitor._begin_step()
                with OpCounter() as counter:
                    loop.step(monitor)
                full.append(counter.ops)
    finally:
        monitor.close(timeout=10.0)

    def added(counts: list[collections.Counter[str]]) -> dict[str, Any]:
        if not counts:
            return {"added": None}
        totals = [sum(c.values()) - sum(base.values()) for c in counts]
        pick = counts[totals.index(sorted(totals)[len(totals) // 2])]
        delta = collections.Counter(pick)
        delta.subtract(base)
        return {"added": statistics.median(totals), "range": [min(totals), max(totals)],
                "by_op": {k: v for k, v in delta.most_common() if v}}  # fmt: skip

    return {
        "hooked_modules": hooked,
        "bare_step_ops": sum(base.values()),
        "ordinary": added(ordinary),
        "full": added(full),
        "join_ops_max": max(joins) if joins else None,
    }


def _ignore_commands(monitor: Any) -> None:
    """Detectors fire on these synthetic nets (a deep narrow MLP at a small learning rate barely learns) and the
    server then asks for full statistics for a while: a diagnosis the user wants, not the agent's running cost.
    The bench's monitors ignore such commands, so that both figures are of the agent at its own cadence."""
    monitor._sender._on_command = lambda steps, reason: None


def _join_ops(segments: list[Any] | None) -> int:
    """Operations the accelerator path's join would launch on the training thread for a report (on the CPU the
    sender thread does it): one stack per run of scalar lists, one cat."""
    if not segments:
        return 0
    stacks, pending, parts = 0, False, 0
    for segment in segments:
        if isinstance(segment, list):
            pending = True
            continue
        stacks += pending
        pending = False
        parts += 1
    stacks += pending
    return stacks + (1 if stacks + parts > 1 else 0)


def time_cpu(loop: Loop, server: str, rounds: int, early: int, steps: int, full_probe: int = 20) -> dict[str, Any]:
    """Training-thread CPU per step: no agent, the agent's first `early` steps (mean, full steps included), the
    `steps` after them (mean, and the median of the ordinary steps alone against the median step without agent),
    and the median of `full_probe` full-statistics steps asked for after them, against the same."""
    none_s: list[float] = []
    early_s: list[float] = []
    steady_s: list[float] = []
    none_steps: list[float] = []
    ordinary_steps: list[float] = []
    fulls: list[float] = []  # full steps at the agent's own cadence among the timed ones
    full_steps: list[float] = []  # full steps asked for after them
    for r in range(rounds):
        for variant in ("none", "agent") if r % 2 == 0 else ("agent", "none"):
            gc.collect()
            if variant == "none":
                loop.clip_fn = _clip_function(False)
                started = time.thread_time()
                for _ in range(steps):
                    at = time.thread_time()
                    loop.step(None)
                    none_steps.append(time.thread_time() - at)
                none_s.append((time.thread_time() - started) / steps)
                continue
            loop.clip_fn = _clip_function(True)
            monitor = gradwatch.attach(loop.model, loop.optimizer, run=f"cpu-{id(loop)}-{r}", server=server)
            _ignore_commands(monitor)
            try:
                started = time.thread_time()
                for _ in range(early):
                    loop.step(monitor)
                middle = time.thread_time()
                for _ in range(steps):
                    full = monitor._begin_step()
                    at = time.thread_time()
                    loop.step(monitor)
                    (fulls if full else ordinary_steps).append(time.thread_time() - at)
                ended = time.thread_time()
                # Full-statistics steps alone, asked for as a server command would (the budget may have stretched
                # the cadence past the timed steps): each timed like an ordinary one.
                monitor._full_until = monitor._step_count + full_probe
                for _ in range(full_probe):
                    monitor._begin_step()
                    at = time.thread_time()
                    loop.step(monitor)
                    full_steps.append(time.thread_time() - at)
            finally:
                monitor.close(timeout=10.0)
            early_s.append((middle - started) / max(1, early))
            steady_s.append((ended - middle) / steps)
    base = statistics.median(none_s)
    return {
        "none_ms": [s * 1e3 for s in none_s],
        "early_added_us": [(s - base) * 1e6 for s in early_s],
        "steady_added_us": [(s - base) * 1e6 for s in steady_s],
        "ordinary_added_us": (statistics.median(ordinary_steps) - statistics.median(none_steps)) * 1e6,
        "full_steps_after_early": len(fulls),
        "full_added_us": (statistics.median(full_steps) - statistics.median(none_steps)) * 1e6 if full_steps else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--modules", default="10,100,1000")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--early", type=int, default=300, help="steps after attach reported apart (default 300)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per block after the early ones")
    parser.add_argument("--clip", action="store_true", help="the loop clips gradients (gradwatch's drop-in)")
    parser.add_argument("--no-cpu", action="store_true", help="count operations only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    document: dict[str, Any] = {
        "command": " ".join(["python", "bench/agent_ops.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": str(torch.__version__),
        "models": {},
    }
    print(f"torch {torch.__version__}, one training thread, MLP width {args.width}, batch {args.batch}, "
          f"clip={'gradwatch' if args.clip else 'no'}, device {args.device}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gradwatch-ops-") as tmp, gradwatch_serve(pathlib.Path(tmp)) as server:
        for modules in (int(m) for m in args.modules.split(",")):
            loop = Loop(modules, args.width, args.batch, args.clip, args.device)
            ops = count_ops(loop, server, warm=30, probe=20)
            result: dict[str, Any] = {"ops": ops}
            line = (f"MLP of {modules} modules ({ops['hooked_modules']} hooked): step without agent "
                    f"{ops['bare_step_ops']} ops; agent adds {ops['ordinary']['added']} on ordinary steps "
                    f"(range {ops['ordinary'].get('range')}), {ops['full']['added']} on full steps; "
                    f"accelerator join +{ops['join_ops_max']}")  # fmt: skip
            print(line, flush=True)
            print(f"  ordinary-step ops added by kind: {ops['ordinary'].get('by_op')}", flush=True)
            print(f"  full-step ops added by kind: {ops['full'].get('by_op')}", flush=True)
            if not args.no_cpu:
                cpu = time_cpu(loop, server, args.rounds, args.early, args.steps)
                result["cpu"] = cpu
                target = 50 + 0.5 * ops["hooked_modules"]
                med = statistics.median
                print(f"  CPU: no agent {med(cpu['none_ms']):.3f} ms/step; added first {args.early} steps "
                      f"{med(cpu['early_added_us']):.1f} us (range {min(cpu['early_added_us']):.1f}..."
                      f"{max(cpu['early_added_us']):.1f}), after {med(cpu['steady_added_us']):.1f} us (range "
                      f"{min(cpu['steady_added_us']):.1f}...{max(cpu['steady_added_us']):.1f}) with "
                      f"{cpu['full_steps_after_early']} full steps; an ordinary step alone (medians per step) "
                      f"{cpu['ordinary_added_us']:.1f} us; target {target:.0f} us; a full-statistics step alone "
                      f"{cpu['full_added_us'] or 0:.1f} us", flush=True)  # fmt: skip
            document["models"][str(modules)] = result
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
