"""Relayed reports applied as columns per batch give the same verdicts as one report at a time.

Two real aggregators (ServerApp, one clock) are fed the same generated relay stream through the relay handler's
batch path (`RelayServicer.apply_batch`), batches packed by the relay link's own code: one with every report a
RelayedFrame (the per-record path), one with reports packed as RelayedColumns. Streams hold NaN ranks, slow,
silent and divergent ranks, checksum mismatches, restarts, gaps, out-of-order and duplicate reports, a relay
reconnect re-sending what it held, and arbitrary batch boundaries. Every alert transition (detector, state,
ranks, step, summary) and the run's rank table and global norms must agree.
"""

from __future__ import annotations

import dataclasses
import random
import types
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from gradwatch.server.config import ServerConfig
from gradwatch.server.detectors.rank_divergence import RankDivergenceConfig
from gradwatch.server.detectors.stalled import StalledConfig
from gradwatch.server.detectors.straggler import StragglerConfig
from gradwatch.server.detectors.throughput_drop import ThroughputDropConfig
from gradwatch.server.relay_link import Entry, pack_entries
from gradwatch.server.upstream import RelayStream
from gradwatch.v1 import gradwatch_pb2 as pb

RUN = "equivalence"


def _config() -> ServerConfig:
    base = ServerConfig.local()
    detectors = dict(base.detectors)
    detectors["rank_divergence"] = RankDivergenceConfig(consecutive=3)
    detectors["straggler"] = StragglerConfig(consecutive=3, min_reports=4)
    detectors["stalled"] = StalledConfig(floor_s=6.0, factor=3.0, silent_after_s=4.0)
    detectors["throughput_drop"] = ThroughputDropConfig(ratio=0.6, min_steps=5, recent=3, consecutive=3, sustain_s=1.0)
    return dataclasses.replace(base, detectors=types.MappingProxyType(detectors))


@dataclasses.dataclass
class Plan:
    world: int
    steps: int
    seed: int
    nan: tuple[int, int] | None
    divergent: tuple[int, int] | None
    slow: int | None
    silent: tuple[int, int] | None
    checksum_every: int
    mismatch: int | None
    restart: tuple[int, int] | None
    gaps: frozenset[tuple[int, int]]
    swaps: frozenset[tuple[int, int]]
    dups: frozenset[tuple[int, int]]
    reconnect: int | None
    sizes: list[int]


@st.composite
def plans(draw: Any) -> Plan:
    world = draw(st.integers(3, 6))
    steps = draw(st.integers(8, 36))
    rank, step = st.integers(0, world - 1), st.integers(2, steps)
    pair = st.tuples(rank, step)
    return Plan(
        world=world,
        steps=steps,
        seed=draw(st.integers(0, 2**16)),
        nan=draw(st.none() | pair),
        divergent=draw(st.none() | pair),
        slow=draw(st.none() | rank),
        silent=draw(st.none() | pair),
        checksum_every=draw(st.sampled_from([0, 2, 5])),
        mismatch=draw(st.none() | rank),
        restart=draw(st.none() | pair),
        gaps=draw(st.frozensets(pair, max_size=4)),
        swaps=draw(st.frozensets(pair, max_size=3)),
        dups=draw(st.frozensets(pair, max_size=3)),
        reconnect=draw(st.none() | st.integers(1, 12)),
        sizes=draw(st.lists(st.integers(1, 64), min_size=1, max_size=4)),
    )


def _hello(rank: int, world: int, session: str) -> pb.Hello:
    return pb.Hello(protocol_version=pb.PROTOCOL_VERSION_CURRENT, run_id=RUN, job_name="eq", rank=rank,
                    world_size=world, host=f"node-{rank}", pid=100 + rank, session_id=session, replica_group=0,
                    replica_group_size=world,
                    schema=pb.LayerSchema(names=["fc"], module_types=["Linear"], param_counts=[10]))  # fmt: skip


def _report(plan: Plan, rank: int, step: int, seq: int, rng: random.Random) -> pb.AgentFrame:
    slow = plan.slow == rank
    report = pb.StepReport(step=step, wall_time=1000.0 + step, step_duration_s=1.0 + (0.8 if slow else 0.0),
                           has_loss=True, loss=2.0 / step + rng.gauss(0, 0.01), grad_sum_squares=1.0 + rng.random(),
                           pre_forward_s=0.1 + (0.7 if slow else 0.0) + rng.random() * 0.01,
                           between_collectives_s=0.5 + (0.8 if slow else 0.0), full_stats_interval=10)  # fmt: skip
    report.grad_global_share = report.grad_sum_squares / plan.world
    if plan.divergent is not None and plan.divergent[0] == rank and step >= plan.divergent[1]:
        report.loss *= 5.0
    if plan.nan == (rank, step):
        report.loss = float("nan")
        report.non_finite = pb.NON_FINITE_FLAG_LOSS | pb.NON_FINITE_FLAG_GRADIENT
        report.grad_sum_squares = float("nan")
    if plan.checksum_every and step % plan.checksum_every == 0:
        report.param_checksum = 0xABCDEF ^ (step * 7919) ^ (1 if plan.mismatch == rank and step > 3 else 0)
    if rng.random() < 0.05:
        report.skipped_step = True
    return pb.AgentFrame(seq=seq, report=report)


def entries(plan: Plan) -> list[list[Entry]]:
    """The relay's entries, then split into batches (a reconnect starts a new list)."""
    rng = random.Random(plan.seed)
    out: list[Entry] = []
    refs = iter(range(1, 10_000))
    session = {r: (f"s{r}", next(refs)) for r in range(plan.world)}
    seqs = dict.fromkeys(range(plan.world), 0)
    steps = dict.fromkeys(range(plan.world), 0)

    def add(frame: pb.RelayedFrame, ref: int = 0) -> None:
        out.append(Entry(len(out) + 1, RUN, frame, ref=ref))

    for r in range(plan.world):
        sid, ref = session[r]
        add(pb.RelayedFrame(run_id=RUN, rank=r, session_id=sid, hello=_hello(r, plan.world, sid), ref=ref), ref)
    held: dict[int, pb.AgentFrame] = {}
    for step in range(1, plan.steps + 1):
        order = list(range(plan.world))
        rng.shuffle(order)
        for r in order:
            if plan.silent is not None and plan.silent[0] == r and step >= plan.silent[1]:
                continue
            if (r, step) in plan.gaps:
                continue
            if plan.restart == (r, step):
                sid, ref = session[r]
                add(pb.RelayedFrame(run_id=RUN, rank=r, session_id=sid, closed=True, ref=ref), ref)
                sid, ref = session[r] = (f"s{r}-again", next(refs))
                add(pb.RelayedFrame(run_id=RUN, rank=r, session_id=sid, hello=_hello(r, plan.world, sid), ref=ref),
                    ref)  # fmt: skip
                seqs[r] = steps[r] = 0
            seqs[r] += 1
            steps[r] += 1
            frame = _report(plan, r, steps[r], seqs[r], rng)
            sid, ref = session[r]
            if (r, step) in plan.swaps:  # this report goes after the next one of the rank
                held[r] = frame
                continue
            for f in (frame, held.pop(r, None)):
                if f is not None:
                    add(pb.RelayedFrame(run_id=RUN, rank=r, session_id=sid, frame=f), ref)
            if (r, step) in plan.dups:
                add(pb.RelayedFrame(run_id=RUN, rank=r, session_id=sid, frame=frame), ref)
    batches: list[list[Entry]] = []
    i = 0
    while i < len(out):
        size = plan.sizes[len(batches) % len(plan.sizes)]
        batches.append(out[i : i + size])
        i += size
    if plan.reconnect is not None and plan.reconnect < len(batches):
        # The link broke after `reconnect` batches: a new stream re-sends the open sessions' Hellos, then the last
        # two batches again (not acknowledged, as far as the relay knows), then goes on.
        hellos = [e for e in out[: sum(len(b) for b in batches[: plan.reconnect])] if e.frame.HasField("hello")]
        latest = {(e.frame.rank): e for e in hellos}
        batches.insert(plan.reconnect, [])  # marks the new stream
        again = batches[max(plan.reconnect - 2, 0) : plan.reconnect]
        resent = [*latest.values(), *(e for b in again for e in b)]
        batches.insert(plan.reconnect + 1, resent)
    return batches


def feed(plan: Plan, columns: bool) -> tuple[ServerApp, list[tuple[Any, ...]]]:
    now = [1000.0]
    app = ServerApp(_config(), clock=lambda: now[0])
    events: list[tuple[Any, ...]] = []
    app.alert_book.add_listener(lambda a: events.append((a.detector, a.state, a.ranks, a.step, a.summary)))
    servicer = app.relays
    assert servicer is not None
    stream = RelayStream("relay", "test", now[0])
    last_tick = now[0]
    for batch in entries(plan):
        if not batch:
            stream.table.push_all()
            for held in stream.sessions.values():
                app.ingestor.close(held.session, left=True)
            stream = RelayStream("relay", "test", now[0])
            continue
        steps = [e.frame.frame.report.step for e in batch if e.frame.HasField("frame")]
        now[0] = max(now[0], 1000.0 + max(steps, default=0) * 1.0)
        servicer.apply_batch(stream, pack_entries(batch, columns=columns), None)
        while now[0] - last_tick >= 1.0:
            last_tick += 1.0
            app.ingestor.tick()
    for _ in range(12):  # silent ranks and stragglers are judged on ticks
        now[0] += 1.0
        app.ingestor.tick()
    return app, events


def _same(value: Any) -> Any:
    """`value` with NaN spelled out, so that equal states compare equal."""
    if isinstance(value, float) and value != value:
        return "nan"
    if isinstance(value, (list, tuple)):
        return [_same(v) for v in value]
    if isinstance(value, dict):
        return {k: _same(v) for k, v in value.items()}
    return value


def _state(app: ServerApp) -> dict[str, Any]:
    run = app.store.get(RUN)
    table = run.table
    return _same(
        {
            "last_step": table.last_step.tolist(),
            "reports": table.reports.tolist(),
            "progress_at": table.progress_at.tolist(),
            "step_time": np.nan_to_num(table.step_time(), nan=-1).tolist(),
            "pre_forward": np.nan_to_num(table.pre_forward_time(), nan=-1).tolist(),
            "between": np.nan_to_num(table.collectives.between_time(), nan=-1).tolist(),
            "norms": list(run.global_grad_norms),
            "skipped": run.skipped_steps,
            "rings": {r: s.ring.rows().tolist() for r, s in run.ranks.items()},
            "last_loss": {r: (s.last_loss, s.last_step) for r, s in run.ranks.items()},
            "firing": sorted(app.alert_book.firing_detectors()),
            "rejected": app.stats.snapshot().errors,
            "duplicates": app.stats.snapshot().duplicates,
            "applied": app.stats.snapshot().frames.get("report", 0),
        }
    )


def _by_detector(events: list[tuple[Any, ...]]) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    for event in events:
        out.setdefault(event[0], []).append(event)
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_columns_give_the_verdicts_of_one_report_at_a_time(plan: Plan) -> None:
    one, one_events = feed(plan, columns=False)
    batch, batch_events = feed(plan, columns=True)
    assert one.ingestor.batched == 0

    assert _by_detector(batch_events) == _by_detector(one_events)
    assert _state(batch) == _state(one)


def test_a_clean_stream_is_applied_as_batches_and_names_the_slow_silent_and_divergent_ranks() -> None:
    plan = Plan(world=6, steps=30, seed=1, nan=None, divergent=(2, 5), slow=4, silent=(5, 12), checksum_every=5,
                mismatch=1, restart=None, gaps=frozenset(), swaps=frozenset(), dups=frozenset(), reconnect=None,
                sizes=[40])  # fmt: skip
    _, one_events = feed(plan, columns=False)
    batch, batch_events = feed(plan, columns=True)
    assert batch.ingestor.batched > 0.8 * sum(batch.store.get(RUN).table.reports)
    assert sorted(batch_events) == sorted(one_events)
    fired = {(d, r) for d, state, ranks, _, _ in batch_events if state == "firing" for r in ranks}
    assert {("rank_divergence", 2), ("replica_mismatch", 1), ("straggler", 4), ("stalled", 5)} <= fired
    assert not {(d, r) for d, r in fired if d == "stalled" and r != 5}
    assert not {(d, r) for d, r in fired if d == "straggler" and r != 4}


def feed_streams(plan: Plan, coalesce: bool, relays: int) -> tuple[ServerApp, list[tuple[Any, ...]]]:
    """`plan`'s batches split over `relays` relay streams by rank. Without `coalesce` each stream's part is applied
    at once one report at a time (frames, `apply_batch`); with it, its reports travel as columns and the aggregator
    keeps them (`receive_batch`) until a flush, which comes before the clock moves and before each tick, as the
    server's timer and ticks do (kept reports are received when they are flushed)."""
    now = [1000.0]
    app = ServerApp(_config(), clock=lambda: now[0])
    events: list[tuple[Any, ...]] = []
    app.alert_book.add_listener(lambda a: events.append((a.detector, a.state, a.ranks, a.step, a.summary)))
    servicer = app.relays
    assert servicer is not None

    def connect() -> list[RelayStream]:
        return [RelayStream(f"relay-{n}", "test", now[0]) for n in range(relays)]

    streams = connect()
    last_tick = now[0]
    for batch in entries(plan):
        if not batch:  # every link broke: what they sent is applied, their ranks leave, new streams
            servicer.flush()
            for stream in streams:
                stream.table.push_all()
                for held in stream.sessions.values():
                    app.ingestor.close(held.session, left=True)
            streams = connect()
            continue
        steps = [e.frame.frame.report.step for e in batch if e.frame.HasField("frame")]
        at = max(now[0], 1000.0 + max(steps, default=0) * 1.0)
        if at != now[0]:
            servicer.flush()
            now[0] = at
        for n, stream in enumerate(streams):
            part = [e for e in batch if e.frame.rank % relays == n]
            if part and coalesce:
                servicer.receive_batch(stream, pack_entries(part, columns=True, min_columns=1), None)
            elif part:
                servicer.apply_batch(stream, pack_entries(part, columns=False), None)
        while now[0] - last_tick >= 1.0:
            last_tick += 1.0
            servicer.flush()
            app.ingestor.tick()
    servicer.flush()
    for _ in range(12):
        now[0] += 1.0
        app.ingestor.tick()
    if coalesce:  # every batch acknowledged, in order, on its own stream
        for stream in streams:
            acks = [r.ack.seq for r in stream.outbox if r.HasField("ack")]
            assert acks == sorted(acks)
    return app, events


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.integers(1, 3))
def test_columns_kept_across_relays_give_the_verdicts_of_one_report_at_a_time(plan: Plan, relays: int) -> None:
    one, one_events = feed_streams(plan, coalesce=False, relays=relays)
    kept, kept_events = feed_streams(plan, coalesce=True, relays=relays)
    assert one.ingestor.batched == 0
    # Per detector in order (a batch applies one detector's findings over the batch before the next detector's).
    assert _by_detector(kept_events) == _by_detector(one_events)
    assert _state(kept) == _state(one)


def test_a_run_over_three_relays_is_applied_as_one_batch_per_flush() -> None:
    plan = Plan(world=6, steps=30, seed=3, nan=None, divergent=(2, 5), slow=4, silent=(5, 12), checksum_every=5,
                mismatch=1, restart=None, gaps=frozenset(), swaps=frozenset(), dups=frozenset(), reconnect=None,
                sizes=[12])  # fmt: skip
    _, one_events = feed_streams(plan, coalesce=False, relays=3)
    kept, kept_events = feed_streams(plan, coalesce=True, relays=3)
    assert kept.ingestor.batched > 0.8 * sum(kept.store.get(RUN).table.reports)
    assert kept.stats.snapshot().frames.get("report", 0) == sum(kept.store.get(RUN).table.reports)
    assert sorted(kept_events) == sorted(one_events)
    fired = {(d, r) for d, state, ranks, _, _ in kept_events if state == "firing" for r in ranks}
    assert {("rank_divergence", 2), ("replica_mismatch", 1), ("straggler", 4), ("stalled", 5)} <= fired


def test_after_a_nan_the_run_stays_on_the_batch_path_and_the_rank_clears_as_one_report_at_a_time() -> None:
    """A rank that fired non_finite counts finite reports towards its clear inside batches (it used to send its
    whole run one report at a time until it cleared)."""
    plan = Plan(world=5, steps=40, seed=7, nan=(1, 4), divergent=None, slow=None, silent=None, checksum_every=0,
                mismatch=None, restart=None, gaps=frozenset(), swaps=frozenset(), dups=frozenset(), reconnect=None,
                sizes=[20])  # fmt: skip
    _, one_events = feed_streams(plan, coalesce=False, relays=2)
    kept, kept_events = feed_streams(plan, coalesce=True, relays=2)
    assert _by_detector(kept_events) == _by_detector(one_events)
    assert [(d, s) for d, s, *_ in kept_events if d == "non_finite"] == [("non_finite", "firing"),
                                                                         ("non_finite", "resolved")]  # fmt: skip
    assert kept.ingestor.batched > 0.7 * sum(kept.store.get(RUN).table.reports)
