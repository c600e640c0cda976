#!/usr/bin/env python3
"""Server ingest throughput: step reports per second and server CPU per report, by number of streams.

For each stream count S a fresh `gradwatch serve` runs in its own process (default detectors, persistence in a
temporary folder, nothing else). S client streams, each a run of its own with an L-layer schema, send R step
reports as fast as the server acknowledges them (every Nth with full per-layer columns, as an agent at the
default cadence does) and wait for the acknowledgement of the last one. Prints reports/s over the wall time
from the first report to the last acknowledgement, the server process's CPU time per report, and its CPU
utilisation (near 100 % of one CPU: the server is the bound; well under: the clients, one Python process with
S threads, may be). Speed, not correctness: the tests check what the server does with these frames.
bench/loadgen.py is the paced counterpart: thousands of ranks at a set step rate, with alert latency.

    python bench/ingest_throughput.py [--streams 1,4,16] [--reports 2000] [--layers 32] [--full-every 10]

`--in-process L1,L2,...` measures instead what the ingest thread spends per report without gRPC: agent-shaped
frames (bench/loadgen.py's) parsed, validated and applied by an Ingestor with every detector and the flight
recorder, 4 ranks, CPU time of this thread; at the default cadence and with full statistics on every report
(which gives layer-records per second per core). Three repetitions each; median and range. With
`--no-detectors` every detector is disabled: what is left is the ingest bookkeeping (parse, validation, report
decoding, store, flight recorder, counters). With `--profile` it prints, for the first layer count at the
cadence of `--full-every` (default 10, the agent's), where that time goes: each detector's `observe` and each
ingest stage (parse, validation, report decoding, store, flight recorder), timed by wrappers around them (µs
per report, over every rank's reports; the wrappers' own cost, about 0.2 µs per call, is included in each line
and in the total).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import pathlib
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers

from loadgen import FrameFactory, hello_bytes, process_usage

from gradwatch.server.app import ServerApp
from gradwatch.server.config import load_config
from gradwatch.server.detectors import REGISTRY
from gradwatch.server.validate import StreamValidator, parse_agent_frame
from gradwatch.v1 import gradwatch_pb2 as pb
from paging_support import gradwatch_server
from server_support import AgentStream, columns, hello_frame, report_frame


def _cpu_s(pid: int) -> float:
    return process_usage(pid)["cpu_s"]


def _client(target: str, index: int, reports: int, layers: int, full_every: int, errors: list[str]) -> None:
    stream = AgentStream(target)
    try:
        stream.send(hello_frame(run=f"bench-{index}", session=f"s-{index}", layers=layers))
        welcome = stream.recv()
        if not isinstance(welcome, pb.ServerFrame) or welcome.WhichOneof("body") != "welcome":
            errors.append(f"stream {index}: no Welcome ({welcome!r})")
            return
        full = columns(layers, grad_norm=1.0, grad_max_abs=0.5, weight_norm=2.0, grad_non_finite=0.0)
        for seq in range(1, reports + 1):
            step_layers = full if seq % full_every == 0 else None
            stream.send(report_frame(seq, grad_norm=1.0 + 0.01 * (seq % 7), loss=1.0 / seq, layers=step_layers))
        stream.recv_ack(reports, timeout=600)
    except Exception as exc:  # reported by the caller, not raised from a thread
        errors.append(f"stream {index}: {exc!r}")
    finally:
        stream.close()


def measure(streams: int, reports: int, layers: int, full_every: int) -> dict[str, float]:
    # A data directory of its own: a server restoring the previous measurement's runs would take these streams
    # for resumed sessions (Welcome.acked_seq) and the measurement would not be of fresh ingest.
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp)
        with gradwatch_server(workdir, "--data-dir", str(workdir / "data")) as (target, pid):
            return _measure(target, pid, streams, reports, layers, full_every)


def _measure(target: str, pid: int, streams: int, reports: int, layers: int, full_every: int) -> dict[str, float]:
    errors: list[str] = []
    threads = [
        threading.Thread(target=_client, args=(target, i, reports, layers, full_every, errors), daemon=True)
        for i in range(streams)
    ]
    cpu_before, started = _cpu_s(pid), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - started, _cpu_s(pid) - cpu_before
    if errors:
        raise SystemExit("\n".join(errors))
    total = streams * reports
    return {
        "reports": total,
        "wall_s": wall,
        "reports_per_s": total / wall,
        "server_cpu_us_per_report": cpu / total * 1e6,
        "server_cpu_share": cpu / wall,
    }


def _timed(fn, times: dict[str, float], label: str):  # type: ignore[no-untyped-def]
    """`fn` wrapped to add its wall time (this process is single-threaded here) to times[label]."""
    clock = time.perf_counter

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        started = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label] += clock() - started

    return wrapper


def _instrument(app: ServerApp, times: dict[str, float]) -> None:
    """Time the ingest stages and every detector's observe of `app` (see --profile in the docstring)."""
    ingestor = app.ingestor
    ingestor._store.record_report = _timed(ingestor._store.record_report, times, "store.record_report")
    if ingestor._on_report is not None:
        ingestor._on_report = _timed(ingestor._on_report, times, "recorder.observe")
    original, timed = ingestor._detectors_for, set()

    def detectors_for(run_id: str):  # type: ignore[no-untyped-def]
        detectors = original(run_id)
        if run_id not in timed:  # a run's detectors, just made: time each one's observe
            timed.add(run_id)
            pairs = getattr(detectors, "pairs", detectors)  # (an older Ingestor kept a plain list of pairs)
            for spec, detector in pairs:
                detector.observe = _timed(detector.observe, times, f"detector {spec.name}")  # type: ignore[method-assign]
            if pairs is not detectors:  # the bound calls are taken when the dispatch is made: make it again
                detectors = ingestor._detectors[run_id] = type(detectors).of(pairs)
        return detectors

    ingestor._detectors_for = detectors_for  # type: ignore[method-assign]


def in_process_us(layers: int, full_every: int, reports: int, ranks: int = 4, *, detectors: bool = True,
                  times: dict[str, float] | None = None) -> float:  # fmt: skip
    """Thread CPU µs per report through parse, validation and Ingestor.apply (no gRPC); see the docstring.
    With `times`, the stages and detectors are timed into it (seconds, steady state only)."""
    off = {} if detectors else {"detectors": {spec.name: {"enabled": False} for spec in REGISTRY}}
    app = ServerApp(load_config(off))
    warm_times: dict[str, float] = collections.defaultdict(float)
    if times is not None:
        _instrument(app, warm_times)
        import gradwatch.server.ingest as ingest_module

        ingest_module.build_report = _timed(ingest_module.build_report, warm_times, "build_report")  # type: ignore[attr-defined]
    limits, factory = app.config.limits, FrameFactory(layers, full_every)
    streams = []
    for rank in range(ranks):
        validator = StreamValidator(limits)
        hello = parse_agent_frame(hello_bytes("cost", rank, ranks, layers, full_every), limits)
        validator.check(hello)
        streams.append((validator, app.ingestor.open(hello.hello)))
    frames = [factory.report(seq, seq) for seq in range(1, reports + 1)]
    warm = reports // 4  # detector warm-ups (baselines filling) are not the steady state
    started = 0.0
    parse, check = parse_agent_frame, (lambda v, f: v.check(f))
    if times is not None:
        parse, check = _timed(parse, warm_times, "parse"), _timed(check, warm_times, "validate")
    try:
        for i, raw in enumerate(frames):
            if i == warm:
                started = time.thread_time()
                warm_times.clear()
            for validator, session in streams:
                frame = parse(raw, limits)
                app.ingestor.apply(session, frame, check(validator, frame))
        elapsed = time.thread_time() - started
    finally:
        if times is not None:
            ingest_module.build_report = ingest_module.build_report.__wrapped__  # type: ignore[attr-defined]
    if times is not None:
        for label, seconds in warm_times.items():
            times[label] += seconds
    return elapsed / ((reports - warm) * ranks) * 1e6


def profile(layers: int, reports: int, *, full_every: int = 10, detectors: bool = True) -> None:
    """Print where the cost per report goes (see --profile in the docstring)."""
    times: dict[str, float] = collections.defaultdict(float)
    runs, ranks = 3, 4
    totals = [in_process_us(layers, full_every, reports, ranks, detectors=detectors, times=times) for _ in range(runs)]
    per_report = 1e6 / (runs * (reports - reports // 4) * ranks)
    print(f"where the time goes, {layers} layers, full statistics every {full_every}, {ranks} ranks, "
          f"{runs} x {reports} reports "
          f"(wrapped: total {sorted(totals)[1]:.0f} us/report, median of {runs})")  # fmt: skip
    parts = sorted(times.items(), key=lambda kv: -kv[1])
    for label, seconds in parts:
        print(f"  {seconds * per_report:>7.1f} us  {label}")
    named = sum(seconds for label, seconds in parts) * per_report
    print(f"  {sum(totals) / runs - named:>7.1f} us  the rest (Ingestor.apply's own code, locks, counters, verdicts)")


def in_process(layer_counts: list[int], reports: int, *, detectors: bool = True) -> None:
    print(f"in process (no gRPC), 4 ranks, {reports} reports each, detectors {'on' if detectors else 'off'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'layers':>6} {'default cadence us/report':>26} {'full reports us/report':>23} {'layer-records/s':>16}")
    for layers in layer_counts:
        cadence = sorted(in_process_us(layers, 10, reports, detectors=detectors) for _ in range(3))
        full = sorted(in_process_us(layers, 1, max(40, reports // 3), detectors=detectors) for _ in range(3))
        print(f"{layers:>6} {cadence[1]:>10.0f} ({cadence[0]:.0f}-{cadence[2]:.0f}){'':>6} "
              f"{full[1]:>9.0f} ({full[0]:.0f}-{full[2]:.0f}){'':>4} {layers / full[1] * 1e6:>16,.0f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--streams", default="1,4,16", help="comma list of concurrent streams (runs)")
    parser.add_argument("--reports", type=int, default=2000, help="step reports per stream")
    parser.add_argument("--layers", type=int, default=32, help="layers in each run's schema")
    parser.add_argument("--full-every", type=int, default=10, help="every Nth report carries per-layer columns")
    parser.add_argument("--in-process", default="", help="comma list of layer counts: ingest cost without gRPC")
    parser.add_argument("--no-detectors", action="store_true", help="--in-process with every detector disabled")
    parser.add_argument("--profile", action="store_true", help="--in-process: where the time per report goes")
    args = parser.parse_args(argv)
    if args.in_process and args.profile:
        profile(int(args.in_process.split(",")[0]), args.reports, full_every=args.full_every,
                detectors=not args.no_detectors)  # fmt: skip
        return 0
    if args.in_process:
        in_process([int(n) for n in args.in_process.split(",")], args.reports, detectors=not args.no_detectors)
        return 0
    counts = [int(s) for s in args.streams.split(",") if s.strip()]
    if not counts or min(counts) < 1 or args.reports < 1 or args.layers < 1 or args.full_every < 1:
        raise SystemExit("--streams, --reports, --layers and --full-every must be >= 1")
    print(f"{args.reports} reports per stream, {args.layers} layers, full columns every {args.full_every}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'streams':>7} {'reports':>8} {'wall s':>7} {'reports/s':>10} {'server CPU us/report':>21} "
          f"{'server CPU':>10}")  # fmt: skip
    for count in counts:
        r = measure(count, args.reports, args.layers, args.full_every)
        print(f"{count:>7} {r['reports']:>8} {r['wall_s']:>7.2f} {r['reports_per_s']:>10.0f} "
              f"{r['server_cpu_us_per_report']:>21.0f} {r['server_cpu_share']:>9.0%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
