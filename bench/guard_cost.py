#!/usr/bin/env python3
"""The guard's own cost per optimizer step: training-thread CPU time inside its step pre- and post-hooks.

For each overhead-bench model (bench/overhead/models.py; CPU, one thread, SGD with momentum, the bench's fixed
batch) a Guard with the default settings is hooked alone (no Monitor, no server) and the thread CPU time of
each hook call is recorded; medians after 50 warm-up steps. The pre-hook holds the verdict (one foreach norm
over the gradients, the windows' medians); the post-hook the bookkeeping (nothing is copied on an accepted step).

    python bench/guard_cost.py [--models tiny,mlp,cnn] [--steps 300]
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

WARM = 50


def measure(key: str, steps: int) -> tuple[float, float, int]:
    """(pre-hook median µs, post-hook median µs, skipped steps) for model `key`."""
    spec = MODELS[key]
    torch.manual_seed(0)
    model = spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = spec.batch()
    y = torch.randint(0, 10, (x.shape[0],))
    guard = Guard(check_guard("guard", "skip"), optimizer, torch.device("cpu"), world_size=1,
                  submit_event=lambda *args: None)  # fmt: skip
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

    optimizer.register_step_pre_hook(timed(guard._before_step, pre))
    optimizer.register_step_post_hook(timed(guard._after_step, post))
    skipped = 0
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        reasons, _ = guard.take()
        skipped += int(reasons is not None and float(reasons) > 0)
    return statistics.median(pre[WARM:]) / 1e3, statistics.median(post[WARM:]) / 1e3, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,mlp,cnn")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for key in args.models.split(","):
        pre, post, skipped = measure(key, args.steps)
        print(f"{MODELS[key].label} ({key}): pre-hook {pre:.0f} µs, post-hook {post:.0f} µs of thread CPU time per "
              f"optimizer step (median; {skipped} steps skipped)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
