#!/usr/bin/env python3
"""Server cost of the cross-rank detectors: microseconds per report and milliseconds per tick, by world size.

Feeds hand-built reports of a synchronous run (every rank reports every step; a parameter checksum every other
step) straight into a run's RankTable and the registered cross-rank detectors with their default settings, as
the ingest thread does, then times their 1 s tick. No gRPC, no store: only what the cross-rank detectors add on
the server's ingest thread. Prints one line per world size.

    python bench/cross_rank_cost.py [--worlds 8 1024 16384] [--reports 40000]
"""

from __future__ import annotations

import argparse
import time

from gradwatch.server.detectors import REGISTRY
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport


def measure(world: int, steps: int, ticks: int = 5) -> tuple[float, float]:
    """(seconds per report, seconds per tick) for a run of `world` ranks."""
    table = RankTable(world)
    for rank in range(world):
        table.join(rank, world, f"host-{rank // 8}", 0, world, 0.0)
    detectors = [spec.create(spec.config_type()) for spec in REGISTRY if spec.scope == "run"]
    reports = 0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        for rank in range(world):
            report = RankReport(run="bench", rank=rank, step=step, wall_time=0.0, step_duration_s=0.1,
                                loss=1.0 + 0.01 * (rank % 7), grad_norm=1.0, non_finite_flags=0, columns={},
                                layer_names=(), non_finite_kinds=(), non_finite_layer=None, received_at=float(step),
                                pre_forward_s=0.01, param_checksum=12345 if step % 2 == 0 else None)  # fmt: skip
            table.report(rank, step, report.step_duration_s, report.pre_forward_s, report.received_at)
            for detector in detectors:
                detector.observe(report, table)  # type: ignore[call-arg]
            reports += 1
    per_report = (time.perf_counter() - started) / reports
    started = time.perf_counter()
    for k in range(ticks):
        for detector in detectors:
            detector.tick(table, steps + 1.0 + k)  # type: ignore[union-attr]
    return per_report, (time.perf_counter() - started) / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 1024, 16384])
    parser.add_argument("--reports", type=int, default=40000, help="reports per world size (at least 4 steps)")
    args = parser.parse_args()
    for world in args.worlds:
        measure(world, 2)  # warm up numpy's first calls
        per_report, per_tick = measure(world, max(4, args.reports // world))
        print(f"world {world:6d}: {per_report * 1e6:7.1f} µs per report, {per_tick * 1e3:7.2f} ms per tick "
              f"({per_tick * 100:.1f} % of the ingest thread at one tick per second)")  # fmt: skip


if __name__ == "__main__":
    main()
