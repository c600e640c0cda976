#!/usr/bin/env python3
"""Load generator: thousands of simulated ranks in one process against a real `gradwatch serve`.

Every simulated rank is one gRPC stream (grpc.aio, raw bytes) that sends a Hello and then, at `--steps-per-s`,
step reports shaped like the agent's: scalar fields every step and, every `--full-every` steps, every per-layer
column of LayerStats and every ActivationStats column for an activation schema as long as the layer schema.
Frames are encoded once (a small pool of templates with healthy, slightly varying values); per frame only
seq, step, wall time and loss are spliced in as bytes. With `--group N` a rank writes N reports at once, as the
agent's sender does when steps are faster than its push interval: as one AgentFrame.batch when the server's
Welcome says it takes batches (unless `--no-batch`), else as N messages.

The server runs in its own process (`gradwatch serve --alertmanager-url`), pushing to Debian's real
prometheus-alertmanager routed with deploy/alertmanager/alertmanager.yml to a webhook receiver in this process.
From `--nan-at` seconds on, every `--nan-every` seconds one rank of the next run sends a report with a NaN loss
and gradient (a run pages once, so each injection goes to a fresh run). Measured:

* NaN -> Alertmanager webhook latency per injection (the clock starts when the NaN frame is written);
* acknowledged-but-lost reports: reports the server acknowledged that it does not hold (/api/v1/runs counts
  what each rank applied), which must be 0;
* whether the offered rate was sustained: reports acknowledged per second and the acknowledgement lag;
* server CPU per report (utime + stime from /proc over the measured window) and RSS (VmRSS, VmHWM).

With `--slow-rank K`, rank K of every run works `--slow-factor` times longer between collectives and before its
forward pass (every rank reports `pre_forward_s` and `between_collectives_s`; step durations stay equal, as in
synchronous training); with `--silent-rank K`, rank K of every run stops sending at `--silent-at` seconds and
keeps its stream open. The server's `stalled` floor is then `--stalled-floor-s` (a config file passed with
`--config`), and the result names the ranks `straggler` and `stalled` fire for, by run.

With `--read-loop`, a thread reads /metrics and /api/v1/runs in a loop the whole time (readers must not stall
ingest). Prints one JSON document (and a human summary on stderr).

    python bench/loadgen.py --runs 32 --world-size 32 --steps-per-s 2 --layers 200 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import pathlib
import random
import re
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers

from gradwatch.v1 import gradwatch_pb2 as pb
from paging_support import WebhookReceiver, alertmanager, gradwatch_process, routing_config

STREAM_METHOD = "/gradwatch.v1.Ingest/Stream"
TEMPLATES = 8  # distinct encodings of each report kind (values vary a little, as a healthy run's do)
#: Seconds a rank works before its forward pass and between collectives per step (a slow rank: times its factor).
PRE_FORWARD_S = 0.05
BETWEEN_S = 0.3
_PRE_FORWARD = bytes([27 << 3 | 1, 1])  # StepReport.pre_forward_s (field 27, fixed64): tag 217 as a varint
_BETWEEN = bytes([(81 << 3 | 1) & 0x7F | 0x80, (81 << 3 | 1) >> 7])  # between_collectives_s (field 81)
STREAMS_PER_CHANNEL = 64  # HTTP/2 connections carry this many rank streams each
WIDE_RUN_LAYERS = 4  # layers of the --wide-run-ranks run: it is there for its rank count
_TICK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- frames


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _f32(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def hello_bytes(run: str, rank: int, world: int, layers: int, full_every: int) -> bytes:
    """A Hello like the agent's: Linear layers, and as many observed modules (alternating Linear and ReLU)."""
    names = [f"model.blocks.{i // 2}.fc{i % 2}" for i in range(layers)]
    modules = [f"model.blocks.{i // 2}.{'act' if i % 2 else 'fc0'}" for i in range(layers)]
    hello = pb.Hello(
        protocol_version=pb.PROTOCOL_VERSION_CURRENT, run_id=run, job_name="loadgen", rank=rank, world_size=world,
        local_rank=rank % 8, host=f"node-{rank // 8}", pid=1000 + rank, session_id=f"{run}-{rank}",
        agent_version="loadgen", torch_version="2.x", device_kind="cuda", full_stats_interval=full_every,
        schema=pb.LayerSchema(names=names, module_types=["Linear"] * layers, param_counts=[4096] * layers),
        activation_schema=pb.LayerSchema(names=modules, module_types=["Linear" if i % 2 == 0 else "ReLU"
                                                                        for i in range(layers)]),
    )  # fmt: skip
    return pb.AgentFrame(seq=0, hello=hello).SerializeToString()


def _report_body(rng: np.random.Generator, layers: int, full: bool, full_every: int) -> bytes:
    """A StepReport without step, wall time and loss (spliced in per frame)."""
    norms = rng.uniform(0.05, 0.2, layers)
    report = pb.StepReport(step_duration_s=0.5, has_loss=True, grad_sum_squares=float(np.sum(norms**2)),
                           learning_rates=[1e-3], optimizer_step=1, agent_time_s=0.001,
                           full_stats_interval=full_every, grad_global_share=float(np.sum(norms**2)))  # fmt: skip
    if full:
        wn = rng.uniform(5.0, 6.0, layers)
        hist = np.zeros((layers, 32), dtype=np.float32)
        hist[:, 10:20] = rng.uniform(10, 100, (layers, 10))
        report.layers.CopyFrom(pb.LayerStats(
            grad_norm=_f32(norms), grad_max_abs=_f32(norms / 5), grad_mean=_f32(rng.normal(0, 1e-4, layers)),
            grad_non_finite=_f32(np.zeros(layers)), grad_zero_fraction=_f32(rng.uniform(0, 0.01, layers)),
            weight_norm=_f32(wn), weight_max_abs=_f32(wn / 10), weight_mean=_f32(rng.normal(0, 1e-3, layers)),
            weight_non_finite=_f32(np.zeros(layers)), weight_zero_fraction=_f32(np.zeros(layers)),
            grad_min=_f32(-norms / 5), grad_max=_f32(norms / 5), weight_min=_f32(-wn / 10), weight_max=_f32(wn / 10),
            update_ratio=_f32(rng.uniform(5e-4, 2e-3, layers)), grad_log2_histogram=_f32(hist),
        ))  # fmt: skip
        ahist = np.zeros((layers, 32), dtype=np.float32)
        ahist[:, 14:18] = rng.uniform(100, 1000, (layers, 4))
        report.activations.CopyFrom(pb.ActivationStats(
            mean=_f32(rng.normal(0, 0.05, layers)), std=_f32(rng.uniform(0.8, 1.2, layers)),
            max_abs=_f32(rng.uniform(3, 5, layers)), non_finite=_f32(np.zeros(layers)),
            zero_fraction=_f32(rng.uniform(0.0, 0.3, layers)), dead_fraction=_f32(rng.uniform(0, 0.02, layers)),
            saturated_fraction=_f32(np.zeros(layers)), log2_histogram=_f32(ahist),
            unit_spread=_f32(rng.uniform(0.5, 1.0, layers)),
        ))  # fmt: skip
        report.output_spread = 0.8
        report.output_rms = 1.0
        report.input_mean = _f32(rng.normal(0, 0.05, 3))
        report.input_std = _f32(rng.uniform(0.9, 1.1, 3))
    return report.SerializeToString()


@dataclass
class FrameFactory:
    """Pre-encoded report bodies; `frame()` splices seq, step, wall time and loss in as bytes."""

    layers: int
    full_every: int
    seed: int = 0
    ordinary: list[bytes] = field(default_factory=list)
    full: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.ordinary = [_report_body(rng, self.layers, False, self.full_every) for _ in range(TEMPLATES)]
        self.full = [_report_body(rng, self.layers, True, self.full_every) for _ in range(TEMPLATES)]
        nan = pb.StepReport(step_duration_s=0.5, has_loss=True, grad_sum_squares=float("nan"),
                            non_finite=pb.NON_FINITE_FLAG_LOSS | pb.NON_FINITE_FLAG_GRADIENT,
                            first_non_finite_layer=self.layers // 2, full_stats_interval=self.full_every)  # fmt: skip
        self.nan_body = nan.SerializeToString()

    def report(self, seq: int, step: int, *, nan: bool = False, slow: float = 1.0) -> bytes:
        """An encoded report: fields later in the message override the template's (protobuf merge rules). `slow`:
        the rank's work before its forward pass and between collectives, relative to its peers'."""
        if nan:
            body, loss = self.nan_body, float("nan")
        else:
            pool = self.full if step % self.full_every == 0 else self.ordinary
            body, loss = pool[step % TEMPLATES], 2.0 / (1.0 + 0.001 * step) + 0.01 * ((step * 7919) % 13) / 13
        body += b"\x08" + _varint(step) + b"\x11" + struct.pack("<d", time.time()) + b"\x21" + struct.pack("<d", loss)
        body += _PRE_FORWARD + struct.pack("<d", PRE_FORWARD_S * slow)
        body += _BETWEEN + struct.pack("<d", BETWEEN_S * slow)
        return b"\x08" + _varint(seq) + b"\x1a" + _varint(len(body)) + body


def batch_bytes(frames: list[bytes]) -> bytes:
    """Encoded frames as one AgentFrame.batch (field 50, FrameBatch.frames = field 1)."""
    body = b"".join(b"\x0a" + _varint(len(f)) + f for f in frames)
    return b"\x92\x03" + _varint(len(body)) + body


# ---------------------------------------------------------------------- simulated ranks


@dataclass
class Rank:
    run: str
    rank: int
    world: int
    layers: int
    period_s: float  # between writes
    sent: int = 0  # reports written (seq of the last one)
    acked: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> when written, until acknowledged
    ack_lags: list[float] = field(default_factory=list)
    error: str | None = None
    reconnects: int = 0  # Hello attempts that failed before one got its Welcome
    slow: float = 1.0  # --slow-factor for the slow rank
    silent_at: float | None = None  # when the silent rank stops sending (time.time())


class Load:
    """The simulated ranks and their shared schedule (see module docstring)."""

    def __init__(self, args: argparse.Namespace, target: str) -> None:
        self.args = args
        self.target = target
        self.factories = {layers: FrameFactory(layers, args.full_every) for layers in {args.layers, WIDE_RUN_LAYERS}}
        period = args.group / args.steps_per_s
        self.ranks = [Rank(f"load-{r:04d}", k, args.world_size, args.layers, period)
                      for r in range(args.runs) for k in range(args.world_size)]  # fmt: skip
        wide = args.wide_run_ranks
        self.ranks += [Rank("load-wide", k, wide, WIDE_RUN_LAYERS, args.wide_run_period_s) for k in range(wide)]
        for rank in self.ranks[: args.runs * args.world_size]:
            if rank.rank == args.slow_rank:
                rank.slow = args.slow_factor
        self.stop_at = 0.0
        self.nan_sent: dict[str, float] = {}  # run -> time its NaN frame was written
        self.nan_due: list[tuple[float, Rank]] = []

    async def run(self, started: float) -> None:
        args = self.args
        self.stop_at = started + args.duration
        for rank in self.ranks[: args.runs * args.world_size]:
            if rank.rank == args.silent_rank:
                rank.silent_at = started + args.silent_at
        runs = [self.ranks[i * args.world_size] for i in range(args.runs)]
        if args.nan_at >= 0:
            times = started + args.nan_at + args.nan_every * np.arange(len(runs))
            victims = [self.ranks[i * args.world_size + (i * 7) % args.world_size] for i in range(len(runs))]
            self.nan_due = [(float(t), v) for t, v in zip(times, victims, strict=True) if t < self.stop_at - 1]
        # A comma-separated target is a list of relays: rank k of every run talks to relay k mod their number
        # (consecutive ranks share a pod, as the ranks of one node share its sidecar).
        targets = self.target.split(",")
        per_target = [[r for r in self.ranks if r.rank * len(targets) // max(r.world, 1) == t]
                      for t in range(len(targets))]  # fmt: skip
        channels: dict[int, grpc.aio.Channel] = {}
        for target, ranks in zip(targets, per_target, strict=True):
            for chunk in range(0, len(ranks), STREAMS_PER_CHANNEL):
                channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                channels.update((id(rank), channel) for rank in ranks[chunk : chunk + STREAMS_PER_CHANNEL])
        try:
            await asyncio.gather(*(self._rank(channels[id(r)], r, started, i) for i, r in enumerate(self.ranks)))
        finally:
            for channel in {id(c): c for c in channels.values()}.values():
                await channel.close()

    async def _rank(self, channel: grpc.aio.Channel, rank: Rank, started: float, index: int) -> None:
        args = self.args
        # Ranks connect spread over their first period (at most --connect-spread-s), as a job's workers do
        # (thousands of calls started in the same instant fail in grpc.aio's client), and retry the Hello like the
        # agent (fresh call, backoff, until the load ends; counted in `reconnects`).
        spread = min(rank.period_s, args.connect_spread_s)
        await asyncio.sleep(max(0.0, started - time.time() + spread * index / len(self.ranks) - 0.5))
        reader: asyncio.Task[None] | None = None
        call = None
        try:
            for attempt in itertools.count():
                call = channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                             response_deserializer=pb.ServerFrame.FromString)()  # fmt: skip
                try:
                    await call.write(hello_bytes(rank.run, rank.rank, rank.world, rank.layers, args.full_every))
                    welcome = await call.read()
                    break
                except grpc.aio.AioRpcError:
                    if time.time() >= self.stop_at:  # never connected while the load ran
                        raise
                    rank.reconnects += 1
                    await asyncio.sleep(min(2.0, 0.1 * 2 ** min(attempt, 5)) * (0.5 + random.random()))
            if welcome is grpc.aio.EOF or welcome.WhichOneof("body") != "welcome":
                rank.error = f"no Welcome: {welcome!r}"
                return
            batches = not args.no_batch and welcome.welcome.max_batch_frames >= args.group
            reader = asyncio.ensure_future(self._acks(call, rank))
            period, factory = rank.period_s, self.factories[rank.layers]
            next_at = started + period * (index / len(self.ranks))  # ranks spread evenly over one period
            step = 0
            while next_at < self.stop_at:
                await asyncio.sleep(max(0.0, next_at - time.time()))
                if rank.silent_at is not None and time.time() >= rank.silent_at:
                    await asyncio.sleep(max(0.0, self.stop_at - time.time()))  # silent, its stream still open
                    break
                nan = self._take_nan(rank)
                frames = []
                for _ in range(args.group):
                    step += 1
                    rank.sent += 1
                    frames.append(factory.report(rank.sent, step, nan=nan and not frames, slow=rank.slow))
                now = time.time()
                for offset in range(len(frames)):
                    rank.sent_at[rank.sent - len(frames) + 1 + offset] = now
                if batches and len(frames) > 1:  # one message, as the agent sends a push group to such a server
                    await call.write(batch_bytes(frames))
                else:
                    for frame in frames:
                        await call.write(frame)
                if nan:
                    self.nan_sent[rank.run] = now
                next_at += period
            await call.done_writing()
            await asyncio.wait_for(reader, timeout=args.drain_s)
        except Exception as exc:  # reported per rank; the load goes on
            rank.error = f"after {rank.sent} reports ({rank.acked} acked): {exc!r}"
        finally:
            if reader is not None:
                reader.cancel()
            if call is not None:
                call.cancel()

    def _take_nan(self, rank: Rank) -> bool:
        if self.nan_due and self.nan_due[0][1] is rank and time.time() >= self.nan_due[0][0]:
            self.nan_due.pop(0)
            return True
        return False

    async def _acks(self, call: Any, rank: Rank) -> None:
        while True:
            frame = await call.read()
            if frame is grpc.aio.EOF:
                return
            if frame.WhichOneof("body") == "ack":
                now = time.time()
                for seq in range(rank.acked + 1, frame.ack.seq + 1):
                    sent = rank.sent_at.pop(seq, None)
                    if sent is not None:
                        rank.ack_lags.append(now - sent)
                rank.acked = max(rank.acked, frame.ack.seq)


# ---------------------------------------------------------------------- measurement


def process_usage(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and resident memory (now and peak, MB) of process `pid`, from /proc."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    return {
        "cpu_s": (int(fields[11]) + int(fields[12])) / _TICK,
        "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
        "hwm_mb": int(status["VmHWM"].split()[0]) / 1024,
    }


def _get(url: str, timeout: float = 120.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read())


class Readers:
    """A thread reading /metrics and /api/v1/runs in a loop; records each read's duration."""

    def __init__(self, http_url: str) -> None:
        self._url = http_url
        self._stop = threading.Event()
        self.reads: dict[str, list[float]] = {"/metrics": [], "/api/v1/runs": []}
        self.metrics_lines = 0
        self._thread = threading.Thread(target=self._loop, name="loadgen-readers", daemon=True)

    def __enter__(self) -> Readers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(130)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for path, times in self.reads.items():
                begun = time.perf_counter()
                body = _get(self._url + path)
                times.append(time.perf_counter() - begun)
                if path == "/metrics":
                    self.metrics_lines = body.count(b"\n")


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "median": None, "p99": None, "max": None}
    a = np.asarray(values)
    return {"n": len(values), "median": float(np.median(a)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}  # fmt: skip


def _applied_reports(http_url: str) -> dict[tuple[str, int], int]:
    """(run, rank) -> reports the server applied, from /api/v1/runs (a run's view lists its lowest ranks only:
    the rest are paged from /api/v1/runs/<run>/ranks)."""
    runs = json.loads(_get(http_url + "/api/v1/runs?limit=10000"))
    runs = runs["runs"] if isinstance(runs, dict) else runs
    applied = {}
    for run in runs:
        ranks = list(run["ranks"])
        if run.get("ranks_total", len(ranks)) > len(ranks):
            ranks, offset = [], 0
            quoted = urllib.parse.quote(run["run"], safe="")
            while offset is not None:
                page = json.loads(_get(f"{http_url}/api/v1/runs/{quoted}/ranks?limit=1000&offset={offset}"))
                ranks += page["ranks"]
                offset = page.get("next_offset")
        applied.update({(run["run"], k["rank"]): int(k["reports"]) for k in ranks})
    return applied


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, WebhookReceiver() as receiver, \
            alertmanager(routing_config(receiver.url), pathlib.Path(tmp) / "am") as am_url, \
            gradwatch_process(pathlib.Path(tmp), "--alertmanager-url", am_url, *args.serve_arg,
                              *detector_config(args, pathlib.Path(tmp))) as server:  # fmt: skip
        load = Load(args, server.target)
        readers = Readers(server.http_url) if args.read_loop else contextlib.nullcontext()
        before = process_usage(server.pid)
        with readers:
            started = time.time() + 1.0
            window: dict[str, float] = {}

            def mark() -> None:  # CPU over the sending window only (start-up and drain excluded)
                for at, end in ((args.warmup_s, "0"), (args.duration, "1")):
                    time.sleep(max(0.0, started + at - time.time()))
                    acked = sum(r.acked for r in load.ranks)
                    window.update({f"cpu{end}": process_usage(server.pid)["cpu_s"], f"t{end}": time.time(),
                                   f"acked{end}": acked})  # fmt: skip

            marker = threading.Thread(target=mark, daemon=True)
            marker.start()
            asyncio.run(load.run(started))
            marker.join()
        after = process_usage(server.pid)
        pages: dict[str, float] = {}
        deadline = time.monotonic() + args.page_timeout_s
        for run, sent_at in load.nan_sent.items():
            hit = receiver.wait_alert(lambda d, a, run=run: a["status"] == "firing" and a["labels"].get("run") == run
                                      and a["labels"].get("detector") == "non_finite",
                                      max(0.0, deadline - time.monotonic()))  # fmt: skip
            if hit is not None:
                pages[run] = hit[0].received_at - sent_at
        firing = json.loads(_get(server.http_url + "/api/v1/alerts?state=firing"))["alerts"]
        other = sorted({a["detector"] for a in firing if a["detector"] != "non_finite"})
        named = named_ranks(firing)
        applied = _applied_reports(server.http_url)
        log_tail = (pathlib.Path(tmp) / "gradwatch.log").read_text()[-2000:]
        metrics = _get(server.http_url + "/metrics").decode()
        found = re.search(r'^gradwatch_ingest_frames_total\{kind="batch"\} (\S+)$', metrics, re.MULTILINE)
        batches = int(float(found.group(1))) if found else 0
    sent = sum(r.sent for r in load.ranks)
    acked = sum(r.acked for r in load.ranks)
    lost = sum(max(0, r.acked - applied.get((r.run, r.rank), 0)) for r in load.ranks)
    lags = [lag for r in load.ranks for lag in r.ack_lags]
    window_s = window["t1"] - window["t0"]
    window_reports = window["acked1"] - window["acked0"]
    offered = offered_rate(load, args)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "serve_arg"},
        "ranks": len(load.ranks), "offered_reports_per_s": offered,
        "sent": sent, "batches": batches, "acked": acked, "unacked_at_end": sent - acked, "acked_but_lost": lost,
        "errors": sorted({r.error for r in load.ranks if r.error})[:5],
        "ranks_failed": sum(1 for r in load.ranks if r.error),
        "reconnects": sum(r.reconnects for r in load.ranks),
        "acked_reports_per_s": window_reports / window_s,
        "sustained": window_reports / window_s >= 0.97 * offered and acked == sent,
        "ack_lag_s": _percentiles(lags),
        "server_cpu_us_per_report": (window["cpu1"] - window["cpu0"]) / max(1, window_reports) * 1e6,
        "server_cpu_share": (window["cpu1"] - window["cpu0"]) / window_s,
        "server_cpu_s_total": after["cpu_s"] - before["cpu_s"],
        "server_rss_mb": after["rss_mb"], "server_rss_peak_mb": after["hwm_mb"],
        "nan_injected": len(load.nan_sent), "nan_paged": len(pages),
        "nan_to_alertmanager_s": _percentiles(list(pages.values())),
        "other_detectors_firing": other,
        "named": named, "only_slow_and_silent_named": only_expected(args, named),
    }  # fmt: skip
    if result["ranks_failed"]:
        result["server_log_tail"] = log_tail
    if isinstance(readers, Readers):
        result["reads_s"] = {path: _percentiles(times) for path, times in readers.reads.items()}
        result["metrics_lines"] = readers.metrics_lines
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=32)
    parser.add_argument("--world-size", type=int, default=32, help="ranks per run")
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--full-every", type=int, default=10, help="full-statistics cadence (agent default 10)")
    parser.add_argument("--steps-per-s", type=float, default=2.0, help="steps per second of every rank")
    parser.add_argument("--group", type=int, default=1, help="reports a rank writes at once (sender push group)")
    parser.add_argument("--no-batch", action="store_true", help="write a group's reports as separate messages")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="seconds excluded from the CPU window")
    parser.add_argument("--nan-at", type=float, default=8.0, help="first NaN injection (s; negative: none)")
    parser.add_argument("--nan-every", type=float, default=0.7, help="seconds between injections (one per run)")
    parser.add_argument("--drain-s", type=float, default=60.0, help="wait this long for the last acks")
    parser.add_argument("--page-timeout-s", type=float, default=15.0)
    parser.add_argument("--read-loop", action="store_true", help="read /metrics and /api/v1/runs in a loop")
    parser.add_argument(
        "--wide-run-ranks",
        type=int,
        default=0,
        help="one more run with this many ranks (4 layers), each writing every --wide-run-period-s",
    )
    parser.add_argument("--wide-run-period-s", type=float, default=10.0)
    parser.add_argument("--connect-spread-s", type=float, default=10.0, help="ranks connect over this many seconds")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `gradwatch serve` argument")
    parser.add_argument("--slow-rank", type=int, default=-1, help="this rank of every run is a straggler")
    parser.add_argument("--slow-factor", type=float, default=1.6, help="how much longer the slow rank works")
    parser.add_argument("--silent-rank", type=int, default=-1, help="this rank of every run falls silent")
    parser.add_argument("--silent-at", type=float, default=15.0, help="seconds after the start")
    parser.add_argument(
        "--stalled-floor-s",
        type=float,
        default=10.0,
        help="the server's stalled.floor_s with --silent-rank (its default, 300 s, outlasts a bench)",
    )
    args = parser.parse_args(argv)
    if min(args.runs, args.world_size, args.layers, args.full_every, args.group) < 1 or args.steps_per_s <= 0:
        parser.error("--runs, --world-size, --layers, --full-every, --group must be >= 1, --steps-per-s > 0")
    if args.warmup_s >= args.duration:
        parser.error("--warmup-s must be shorter than --duration")
    if args.slow_rank >= 0 and args.slow_rank == args.silent_rank:
        parser.error("--slow-rank and --silent-rank must differ")
    return args


def detector_config(args: argparse.Namespace, directory: pathlib.Path) -> list[str]:
    """`gradwatch serve` arguments for a run with a silent rank: a config whose stalled floor fits the bench."""
    if args.silent_rank < 0:
        return []
    path = directory / "detectors.yaml"
    path.write_text(f"detectors:\n  stalled: {{floor_s: {args.stalled_floor_s}}}\n")
    return ["--config", str(path)]


def offered_rate(load: Load, args: argparse.Namespace) -> float:
    """Reports per second offered over the measured window (a silent rank offers none once silent)."""
    span = args.duration - args.warmup_s
    speaking = max(0.0, min(args.silent_at, args.duration) - args.warmup_s) / span
    return sum(args.group / r.period_s * (1.0 if r.silent_at is None else speaking) for r in load.ranks)


def named_ranks(alerts: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """detector -> run -> ranks, for the firing `straggler`, `stalled` and `collective_hang` alerts."""
    out: dict[str, dict[str, list[int]]] = {"straggler": {}, "stalled": {}, "collective_hang": {}}
    for alert in alerts:
        if alert["detector"] in out:
            out[alert["detector"]][alert["run"]] = sorted(alert["ranks"])
    return out


def only_expected(args: argparse.Namespace, named: dict[str, dict[str, list[int]]]) -> bool | None:
    """Whether straggler names exactly the slow rank and stalled exactly the silent rank, in every run (None: no
    slow or silent rank asked for)."""
    checks = [(d, r) for d, r in (("straggler", args.slow_rank), ("stalled", args.silent_rank)) if r >= 0]
    if not checks:
        return None
    runs = [f"load-{r:04d}" for r in range(args.runs)]
    return all(named[d].get(run) == [rank] for d, rank in checks for run in runs) and all(
        not named[d] for d in ("straggler", "stalled") if d not in dict(checks)
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(json.dumps(result, indent=1))
    page = result["nan_to_alertmanager_s"]
    print(f"{result['ranks']} ranks x {args.steps_per_s}/s, {args.layers} layers: "
          f"{result['acked_reports_per_s']:.0f} of {result['offered_reports_per_s']:.0f} reports/s acked "
          f"({'sustained' if result['sustained'] else 'NOT sustained'}), "
          f"server {result['server_cpu_us_per_report']:.0f} us CPU/report ({result['server_cpu_share']:.0%} CPU), "
          f"RSS {result['server_rss_mb']:.0f} MB; NaN->Alertmanager p99 {page['p99']} s over {page['n']}; "
          f"acked but lost {result['acked_but_lost']}", file=sys.stderr)  # fmt: skip
    return 0 if result["acked_but_lost"] == 0 and not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
