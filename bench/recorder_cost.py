#!/usr/bin/env python3
"""Flight recorder cost on the ingest path: per-report apply time with and without the recorder, and the time
to freeze and store one incident window.

Frames are built by hand (no torch, no network) and applied through the real Ingestor of a ServerApp that is
never started, so the numbers are the server's own CPU work. Each report carries every per-layer column of
`--layers` layers (a full-statistics step, the expensive case) and activation columns for as many modules.
Prints the median apply time per report for both configurations and their ratio, then the median time of
one incident write (window of `--ranks` ranks × 80 reports, compressed, into SQLite on disk).

    python bench/recorder_cost.py [--layers 256] [--reports 2000] [--ranks 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

from gradwatch.server.alerts import Alert
from gradwatch.server.app import ServerApp
from gradwatch.server.config import RecorderConfig, StorageConfig
from gradwatch.server.recorder import ACTIVATION_COLUMNS
from gradwatch.server.report import COLUMN_NAMES, COLUMN_WIDTHS
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import columns, hello, report_frame, server_config


def frames(layers: int, count: int) -> list[pb.AgentFrame]:
    rng = np.random.default_rng(0)
    out = []
    for seq in range(1, count + 1):
        layer_stats = columns(layers, **{n: 0.0 for n in COLUMN_NAMES if n not in COLUMN_WIDTHS})
        layer_stats.grad_norm = rng.random(layers, dtype=np.float32).astype("<f4").tobytes()
        layer_stats.grad_log2_histogram = np.ones(layers * 32, dtype="<f4").tobytes()
        frame = report_frame(seq, layers=layer_stats, grad_norm=1.0)
        acts = {n: np.zeros(layers * COLUMN_WIDTHS.get(n, 1), dtype="<f4").tobytes() for n in ACTIVATION_COLUMNS}
        frame.report.activations.CopyFrom(pb.ActivationStats(**acts))
        out.append(frame)
    return out


def apply_times(recording: bool, layers: int, reports: list[pb.AgentFrame], data_dir: str) -> list[float]:
    config = dataclasses.replace(
        server_config(), storage=StorageConfig(data_dir=data_dir), recorder=RecorderConfig(enabled=recording)
    )
    app = ServerApp(config)
    modules = pb.LayerSchema(names=[f"m{i}" for i in range(layers)], module_types=["Linear"] * layers)
    session = app.ingestor.open(hello(layers=layers, activation_schema=modules))
    times = []
    for frame in reports:
        start = time.perf_counter()
        app.ingestor.apply(session, frame, "report")
        times.append(time.perf_counter() - start)
    return times


def incident_times(layers: int, ranks: int, data_dir: str, trials: int) -> tuple[list[float], list[float]]:
    config = dataclasses.replace(server_config(), storage=StorageConfig(data_dir=data_dir))
    app = ServerApp(config)
    modules = pb.LayerSchema(names=[f"m{i}" for i in range(layers)], module_types=["Linear"] * layers)
    reports = frames(layers, 80)
    for rank in range(ranks):
        session = app.ingestor.open(hello(rank=rank, world_size=ranks, layers=layers, activation_schema=modules))
        for frame in reports:
            app.ingestor.apply(session, frame, "report")
    times, stored = [], []
    for trial in range(trials):
        alert = Alert.from_json(
            {
                "id": f"a{trial}",
                "run": "run-a",
                "ranks": [0],
                "detector": "non_finite",
                "severity": "critical",
                "state": "firing",
                "started_at": float(trial),
                "resolved_at": None,
                "step": 70,
                "last_step": 70,
                "layer": None,
                "value": None,
                "summary": "bench",
                "runbook": "docs/runbooks/non_finite.md",
            }
        )
        start = time.perf_counter()
        app.recorder.on_alert(alert)  # opens the incident: snapshots the window before the alert
        times.append(time.perf_counter() - start)
        assert app.recorder.flush()  # the writer thread packs and stores it
        stored.append(time.perf_counter() - start)
    return times, stored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=256)
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument("--ranks", type=int, default=8)
    args = parser.parse_args()
    reports = frames(args.layers, args.reports)
    with tempfile.TemporaryDirectory() as tmp:
        off = apply_times(False, args.layers, reports, f"{tmp}/off")
        on = apply_times(True, args.layers, reports, f"{tmp}/on")
        snapshots, writes = incident_times(args.layers, args.ranks, f"{tmp}/incidents", trials=10)
    off_us, on_us = statistics.median(off) * 1e6, statistics.median(on) * 1e6
    print(
        f"apply per report, {args.layers} layers, full statistics: without recorder {off_us:.1f} µs, "
        f"with {on_us:.1f} µs, ratio {on_us / off_us:.2f}"
    )
    print(
        f"incident, {args.ranks} ranks × 80 reports × {args.layers} layers: on the ingest thread (snapshot) median "
        f"{statistics.median(snapshots) * 1e3:.2f} ms, max {max(snapshots) * 1e3:.2f} ms; until stored (writer "
        f"thread: pack, compress, SQLite) median {statistics.median(writes) * 1e3:.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
