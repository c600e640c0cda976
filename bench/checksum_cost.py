#!/usr/bin/env python3
"""Cost of the parameter checksum and of the update ratio on their own cadences, apart from the full statistics.

The agent takes an exact parameter checksum (one integer sum per parameter, `StatsEngine.checksum`) every
`ChecksumCadence.interval` steps (32 on steps under ~1 s) besides full-statistics steps, and measures the update
ratio (`StatsEngine.weight_sample` before the optimizer step, `update_stats` after it) on every step up to
`update_cadence.WARM_STEPS`, then every `EVERY_STEPS` steps. For each model this times, in one process and
interleaved: a plain training step (forward, backward, SGD step), the checksum alone and the update measurement
alone (each with a host read of its result, so the work is done), and their per-step shares at their intervals.
CPU thread time (`time.thread_time`), medians over `--repeats` rounds; one thread.

    python bench/checksum_cost.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from gradwatch.agent.checksum_cadence import ChecksumCadence
from gradwatch.agent.schema import build_layout
from gradwatch.agent.stats import CADENCE_SAMPLE_ELEMENTS, StatsEngine
from gradwatch.agent.update_cadence import EVERY_STEPS

MODELS = {
    "mlp 16-64-4 (1.4k params)": (lambda: nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)), (32, 16)),
    "mlp 512x4 (0.8M params)": (
        lambda: nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(512, 512), nn.ReLU())], nn.Linear(512, 10)),
        (64, 512),
    ),
    "mlp 2048x4 (12.6M params)": (
        lambda: nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(2048, 2048), nn.ReLU())], nn.Linear(2048, 10)),
        (64, 2048),
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    interval = ChecksumCadence().interval
    print(f"torch {torch.__version__}, 1 thread, CPU thread time, median of {args.repeats} rounds\n")
    print(f"| model | training step | checksum | checksum / step | per-step share at interval {interval} "
          f"| update ratio | update / step | per-step share at interval {EVERY_STEPS} |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, (build, shape) in MODELS.items():
        model = build()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        engine = StatsEngine(build_layout(model, 1))
        x = torch.randn(*shape)
        steps, sums, updates = [], [], []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            t1 = time.thread_time()
            [float(piece) for piece in engine.checksum()]
            t2 = time.thread_time()
            # The pre-hook's copy and the post-hook's measurement on a cadence step, around no update here: the
            # work is the same whatever the update is.
            before = engine.weight_sample(CADENCE_SAMPLE_ELEMENTS)
            [float(v) for v in engine.update_stats(before, CADENCE_SAMPLE_ELEMENTS)]
            t3 = time.thread_time()
            steps.append(t1 - t0)
            sums.append(t2 - t1)
            updates.append(t3 - t2)
        step, cost = statistics.median(steps), statistics.median(sums)
        update = statistics.median(updates)
        print(
            f"| {name} | {step * 1e3:.3f} ms | {cost * 1e3:.3f} ms | {cost / step:.1%} | {cost / step / interval:.2%} "
            f"| {update * 1e3:.3f} ms | {update / step:.1%} | {update / step / EVERY_STEPS:.2%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
