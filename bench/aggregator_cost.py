#!/usr/bin/env python3
"""The aggregator's CPU per relayed rank-record, in process (no gRPC): what one run of N ranks costs it per step.

A real aggregator (`gradwatch.server.app.ServerApp`, default configuration: every detector, the flight recorder, the
store) is fed what relays forward for one run of N ranks (bench/loadgen.py's reports, compacted as a relay
compacts them: no per-layer columns), step after step, in batches of the relay link's size, through the relay
handler's batch path (`RelayServicer.apply_batch`). The batches are packed by the relay's own code
(`server.relay_link.pack_entries`). Measured: thread CPU time per record over the measured steps (the warm-up
steps, which fill the detectors' windows, excluded); median and range over `--repeat` invocations, each in a
fresh App. `--path records` sends every report as a RelayedFrame (sessions without refs): the per-record path,
as before relayed columns; `--path columns` packs them as RelayedColumns; `both` (the default) measures the two
side by side, alternating per size. With `--wire` the batches are also serialised and parsed (what the gRPC link
adds besides HTTP/2). `--upkeep` adds, after each step of every rank, what the server does once a second besides
applying records (a tick of the cross-rank detectors; the persist pass: the checkpoint of every run into the
app's in-memory SQLite), timed apart, per record.

    python bench/aggregator_cost.py --ranks 512,2048,16384 --steps 8 --warmup 24 --repeat 3
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pathlib
import pstats
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from loadgen import FrameFactory, hello_bytes

from gradwatch.server.app import ServerApp
from gradwatch.server.relay import compact_frame
from gradwatch.server.relay_link import DEFAULT_BATCH_ENTRIES, Entry, pack_entries
from gradwatch.server.upstream import RelayStream
from gradwatch.v1 import gradwatch_pb2 as pb


@functools.lru_cache(maxsize=4)
def _entries(ranks: int, steps: range, layers: int, first_seq: int) -> list[Entry]:
    """The relay's entries for `steps` of every rank (rank order within a step, as a relay forwards a step); kept
    for the next invocation of the same size (they are only read)."""
    factory = _factory(layers)
    out = []
    seq = first_seq
    for step in steps:
        for rank in range(ranks):
            frame = compact_frame(pb.AgentFrame.FromString(factory.report(step, step)), "report")
            relayed = pb.RelayedFrame(run_id="bench", rank=rank, session_id=f"s{rank}", frame=frame)
            out.append(Entry(seq, "bench", relayed, ref=rank + 1))  # packed as columns only with --path columns
            seq += 1
    return out


#: Entries per batch (--batch-entries): a link sends at most the aggregator's DEFAULT_BATCH_ENTRIES, fewer when
#: fewer arrive within its BATCH_DELAY_S (a relay of 8 ranks at 1 step/s sends 1-8 records per batch).
BATCH = [DEFAULT_BATCH_ENTRIES]


def _batches(entries: list[Entry], columns: bool) -> list[pb.RelayBatch]:
    size = BATCH[0]
    return [pack_entries(entries[i : i + size], columns=columns) for i in range(0, len(entries), size)]


@functools.lru_cache(maxsize=2)
def _factory(layers: int) -> FrameFactory:
    return FrameFactory(layers, 10)


def one(ranks: int, steps: int, warmup: int, layers: int, columns: bool, wire: bool, profile: bool = False,
        with_upkeep: bool = False) -> dict[str, Any]:  # fmt: skip
    app = ServerApp()
    servicer = app.relays
    assert servicer is not None
    stream = RelayStream("bench-relay", "in-process", time.time())
    hellos = [Entry(r + 1, "bench", pb.RelayedFrame(run_id="bench", rank=r, session_id=f"s{r}", ref=(r + 1) * columns,
                                                    hello=pb.AgentFrame.FromString(
                                                        hello_bytes("bench", r, ranks, layers, 10)).hello))
              for r in range(ranks)]  # fmt: skip
    for batch in _batches(hellos, columns):
        servicer.apply_batch(stream, batch, None)
    warm = _batches(_entries(ranks, range(1, warmup + 1), layers, ranks + 1), columns)
    for batch in warm:
        servicer.apply_batch(stream, batch, None)
    measured = _batches(_entries(ranks, range(warmup + 1, warmup + steps + 1), layers, ranks * (warmup + 1) + 1),
                        columns)  # fmt: skip
    raw = [b.SerializeToString() for b in measured] if wire else None
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    upkeep = {"tick": 0.0, "persist": 0.0}
    sent = 0
    started = time.thread_time()
    for i, batch in enumerate(measured):
        if raw is not None:
            batch = pb.RelayFrame(batch=pb.RelayBatch.FromString(raw[i])).batch
        servicer.apply_batch(stream, batch, None)
        sent += len(batch.frames) + len(batch.columns.seq) // 8
        if with_upkeep and sent >= ranks:  # a step of every rank: what the server does once a second besides
            sent -= ranks
            at = time.thread_time()
            app.ingestor.tick()
            upkeep["tick"] += time.thread_time() - at
            at = time.thread_time()
            app.persist()  # the checkpoint of every run, incident closing, pruning when due
            upkeep["persist"] += time.thread_time() - at
    cpu = time.thread_time() - started - sum(upkeep.values())
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    records = ranks * steps
    firing = sorted(d for _, d in app.alert_book.firing_detectors())
    return {"ranks": ranks, "records": records, "us_per_record": cpu / records * 1e6, "firing": firing,
            **{f"{part}_us_per_record": spent / records * 1e6 for part, spent in upkeep.items()}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--ranks", default="512,2048,16384", help="comma-separated world sizes")
    parser.add_argument("--steps", type=int, default=8, help="measured steps")
    parser.add_argument("--warmup", type=int, default=24, help="steps before the measured ones")
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--path",
        choices=("records", "columns", "both"),
        default="both",
        help="records: one RelayedFrame per record; columns: packed columns per batch",
    )
    parser.add_argument("--wire", action="store_true", help="serialise and parse every batch as the link does")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured batches (stderr)")
    parser.add_argument("--upkeep", action="store_true",
                        help="after each step of every rank, a tick and a checkpoint (the server's per-second work), "
                             "timed apart")  # fmt: skip
    parser.add_argument("--batch-entries", type=int, default=DEFAULT_BATCH_ENTRIES, help="entries per batch")
    args = parser.parse_args(argv)
    BATCH[0] = args.batch_entries
    paths = ("records", "columns") if args.path == "both" else (args.path,)
    results = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        for path in paths:
            runs = [one(ranks, args.steps, args.warmup, args.layers, path == "columns", args.wire, args.profile,
                        args.upkeep) for _ in range(args.repeat)]  # fmt: skip
            us = [r["us_per_record"] for r in runs]
            row = {"ranks": ranks, "path": path, "median_us": statistics.median(us), "min_us": min(us),
                   "max_us": max(us), "runs_us": us, "firing": runs[0]["firing"]}  # fmt: skip
            for part in ("tick", "persist"):
                if args.upkeep:
                    row[f"{part}_us"] = [r[f"{part}_us_per_record"] for r in runs]
            results.append(row)
            print(
                f"{ranks:>6} ranks  {path:<7}  {row['median_us']:8.1f} µs/record (range {min(us):.1f}–"
                f"{max(us):.1f}, {args.repeat} runs)  firing: {row['firing']}"
                + "".join(f"  {p} {statistics.median(row[p + '_us']):.1f} µs/record" for p in ("tick", "persist")
                          if p + "_us" in row),
                file=sys.stderr,
                flush=True,
            )
    print(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
