#!/usr/bin/env python3
"""The guard's own cost per optimizer step: training-thread CPU time inside its step pre- and post-hooks.

For each overhead-bench model (bench/overhead/models.py; CPU, one thread, SGD with momentum, the bench's fixed
batch) a Guard with the default settings is hooked beside the agent's optimizer tap (hooks.OptimizerTap on
every-step statistics, as the Monitor installs it; its own time is not counted: the agent spends it with or
without a guard), and the thread CPU time of each guard hook call is recorded; medians after 50 warm-up steps.
Two variants, interleaved round by round: `own` (the guard computes its own foreach norm over the gradients,
what it did before sharing) and `shared` (it judges the per-parameter norms the tap computed in the same step:
Guard.share_norms, what attach() sets up). The pre-hook holds the verdict (the norm, the windows' medians); the
post-hook the bookkeeping (nothing is copied on an accepted step).

    python bench/guard_cost.py [--models tiny,mlp,cnn] [--steps 300] [--rounds 3]
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from overhead.models import MODELS

from gradwatch.agent.guard import Guard
from gradwatch.agent.guard_config import check_guard
from gradwatch.agent.hooks import OptimizerTap
from gradwatch.agent.schema import build_layout
from gradwatch.agent.stats import StatsEngine

WARM = 50


def measure(key: str, steps: int, shared: bool) -> tuple[float, float, int, int]:
    """(pre-hook median µs, post-hook median µs, skipped steps, steps judged from the tap's norms)."""
    spec = MODELS[key]
    torch.manual_seed(0)
    model = spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = spec.batch()
    y = torch.randint(0, 10, (x.shape[0],))
    tap = OptimizerTap(optimizer, StatsEngine(build_layout(model)), lambda: False, lambda seconds: None)
    guard = Guard(check_guard("guard", "skip"), optimizer, torch.device("cpu"), world_size=1,
                  submit_event=lambda *args: None)  # fmt: skip
    if shared:
        guard.share_norms(tap.step_grad_norms)
    guard.remove()  # re-hooked below through timers (the same hook methods, in the same order)
    guard._active = True
    pre: list[int] = []
    post: list[int] = []

    def timed(hook: Callable[..., None], into: list[int]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            started = time.thread_time_ns()
            hook(*args)
            into.append(time.thread_time_ns() - started)

        return run

    handles = [optimizer.register_step_pre_hook(timed(guard._before_step, pre)),
               optimizer.register_step_post_hook(timed(guard._after_step, post))]  # fmt: skip
    skipped = 0
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reasons, _ = guard.take()
        tap.take()
        skipped += int(reasons is not None and float(reasons) > 0)
    for handle in handles:
        handle.remove()
    tap.remove()
    return statistics.median(pre[WARM:]) / 1e3, statistics.median(post[WARM:]) / 1e3, skipped, guard.shared_norm_steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mlp,cnn")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for key in args.models.split(","):
        pres: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for shared in (False, True):
                pre, post, skipped, from_tap = measure(key, args.steps, shared)
                pres[shared].append(pre)
                variant = "shared" if shared else "own"
                print(f"  {key} {variant}: pre-hook {pre:.0f} µs, post-hook {post:.0f} µs ({skipped} skipped, "
                      f"{from_tap} steps judged from the tap's norms)")  # fmt: skip
        own, shared_ = statistics.median(pres[False]), statistics.median(pres[True])
        print(f"{MODELS[key].label} ({key}): guard pre-hook, median of {args.rounds} rounds: own norm pass "
              f"{own:.0f} µs ({min(pres[False]):.0f}–{max(pres[False]):.0f}), shared norms {shared_:.0f} µs "
              f"({min(pres[True]):.0f}–{max(pres[True]):.0f}); saving {own - shared_:.0f} µs per step")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
