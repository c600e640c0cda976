"""bench/ingest_throughput.py runs end to end against a real `gradwatch serve` (structure, never speed)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_ingest_throughput_small_run_prints_one_row_per_stream_count() -> None:
    command = [sys.executable, str(ROOT / "bench" / "ingest_throughput.py"), "--streams", "1,3", "--reports", "40",
               "--layers", "4", "--full-every", "5"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("40 reports per stream, 4 layers, full columns every 5")
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "40"), ("3", "120")]  # every report acknowledged
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0 and row[5].endswith("%")


@pytest.mark.parametrize("flags", [(), ("--no-detectors",)])
def test_bench_ingest_in_process_prints_one_row_per_layer_count(flags: tuple[str, ...]) -> None:
    command = [sys.executable, str(ROOT / "bench" / "ingest_throughput.py"), "--in-process", "4,16", "--reports", "40"]
    done = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"detectors {'off' if flags else 'on'}" in done.stdout.splitlines()[0]
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [row[0] for row in rows] == ["4", "16"]
    assert all(float(row[1]) > 0 and float(row[-1].replace(",", "")) > 0 for row in rows)
