"""The ingest pipeline, transport-free: apply validated frames to the store, detectors and alerts.

Both the Stream and the Flush RPC go through one `Ingestor`, so a frame means the
same thing however it arrived. Contract:

* `open(hello)` registers the session and returns it with `acked_seq`, the highest
  seq already applied for (run, rank, session_id): the Welcome tells the agent to
  drop those from its replay buffer.
* `apply(session, frame, kind)` applies a frame already checked by a
  StreamValidator. A report or event whose seq is ≤ the session's applied seq is
  a duplicate: counted and dropped, never re-applied. After `apply` returns,
  `session.acked_seq` covers the frame. Returns Commands for the agent.
* Every report is evaluated by every enabled detector of its run (nothing is
  sampled), in arrival order, under one lock, so detectors need no locking; a
  detector is skipped only where it has promised to do nothing (a report without
  the parts it `needs`, or a tick-only detector: DetectorSpec, "What a detector is
  shown").
  Cross-rank detectors (scope "run") also see the run's RankTable, and `tick()`
  (called by the app every TICK_INTERVAL_S) lets them judge runs from which
  nothing arrives; their findings may name any rank of the run.
* When a critical detector starts firing on a rank, every rank of the run gets a
  COMMAND_KIND_ALERT with its next streamed frame (agents opted in to react stop
  or call back; the others ignore it).
* Two tiers (ARCHITECTURE.md, "Two tiers"): `scopes` names the detector scopes this
  ingestor runs (a relay: "rank" only); a `Forwarder` (a relay's upstream) hears every
  Hello, applied frame, per-rank verdict and ended stream. A session opened with
  `relayed=True` (an aggregator's, for a rank held by a relay) skips per-rank
  detectors: the relay ran them and sends their verdicts (`relayed_verdict`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
import numpy as np

from gradwatch.server.alerts import AlertBook
from gradwatch.server.autopsy import autopsy_of
from gradwatch.server.config import ServerConfig, run_detector_configs
from gradwatch.server.detectors import (
    REGISTRY,
    Clear,
    Detector,
    DetectorConfig,
    DetectorSpec,
    Finding,
    Fire,
    RunDetector,
    Verdict,
)
from gradwatch.server.detectors.base import report_parts
from gradwatch.server.ingest_batch import apply_columns
from gradwatch.server.limits import RunBinding, check_settings
from gradwatch.server.relay_columns import Columns
from gradwatch.server.report import ModuleSchema, RankReport, build_report
from gradwatch.server.settings import SettingError
from gradwatch.server.stats import IngestStats
from gradwatch.server.store import RankState, RunState, RunStore, SchemaEntry
from gradwatch.server.validate import INVALID_DETECTOR_SETTINGS, RANK_IN_USE, FrameRejected
from gradwatch.v1 import gradwatch_pb2 as pb

#: ALERT commands kept per rank until its next frame; more are dropped (the first ones matter).
MAX_PENDING_ALERTS = 8

__all__ = ["MAX_DROP_REASONS", "Forwarder", "Ingestor", "Session", "bounded_drop_reasons"]

#: Drop reasons an agent's heartbeat may name (label values of gradwatch_agent_dropped_total); the counts
#: of any others, and of names that are not short snake_case words, are summed under OTHER_DROP_REASON.
MAX_DROP_REASONS = 15
OTHER_DROP_REASON = "other"
_DROP_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")

log = logging.getLogger(__name__)

_SEQUENCED = frozenset({"report", "event"})


@dataclass
class Session:
    """One agent session as seen by one stream or Flush call."""

    hello: pb.Hello
    run: RunState
    schema: SchemaEntry
    acked_seq: int
    streaming: bool
    #: Hello.schema.local_param_counts as an array, when the agent said (one per layer).
    local_param_counts: np.ndarray | None = None
    #: Hello.activation_schema, decoded once for every report of the session.
    modules: ModuleSchema | None = None
    #: A rank held by a relay (an aggregator's session): per-rank detectors ran there.
    relayed: bool = False


class Forwarder(Protocol):
    """What a relay's ingestor tells its upstream (server/relay.py); called on the ingest thread, under the
    ingestor's lock: each call must be O(1) and never wait on the network."""

    def opened(self, hello: pb.Hello, streaming: bool) -> None: ...

    def applied(self, hello: pb.Hello, frame: pb.AgentFrame, kind: str) -> None: ...

    def closed(self, hello: pb.Hello) -> None: ...

    def verdict(self, run_id: str, detector: str, rank: int, verdict: Verdict,
                autopsy: dict[str, Any] | None) -> None: ...  # fmt: skip


@dataclass(frozen=True, slots=True)
class _RunDetectors:
    """A run's detector instances, and how the report path calls them: per detector in registry order, its
    spec, bound `observe`, `needs` bits (0: every report) and whether it is cross-rank; detectors that judge on
    ticks alone are left out (DetectorSpec.observes)."""

    pairs: tuple[tuple[DetectorSpec, Detector | RunDetector], ...]
    per_report: tuple[tuple[DetectorSpec, Callable[..., Any], int, bool], ...]

    @classmethod
    def of(cls, pairs: Sequence[tuple[DetectorSpec, Detector | RunDetector]]) -> _RunDetectors:
        per_report = tuple((spec, detector.observe, spec.needs_mask, spec.scope == "run")
                           for spec, detector in pairs if spec.observes)  # fmt: skip
        return cls(tuple(pairs), per_report)


def bounded_drop_reasons(dropped: Mapping[str, int]) -> dict[str, int]:
    """At most MAX_DROP_REASONS well-formed reasons (by name order) plus "other" for the rest."""
    kept: dict[str, int] = {}
    other = 0
    for reason in sorted(dropped):
        if len(kept) < MAX_DROP_REASONS and reason != OTHER_DROP_REASON and _DROP_REASON.fullmatch(reason):
            kept[reason] = dropped[reason]
        else:
            other += dropped[reason]
    if other:
        kept[OTHER_DROP_REASON] = other
    return kept


class Ingestor:
    """Applies frames to the store, runs detectors and updates alerts (see module docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        store: RunStore,
        alerts: AlertBook,
        stats: IngestStats,
        *,
        clock: Callable[[], float],
        detectors: tuple[DetectorSpec, ...] = REGISTRY,
        on_join: Callable[[RunState], None] | None = None,
        on_report: Callable[[RunState, RankState, RankReport, pb.StepReport, pb.Hello], None] | None = None,
        registry: Callable[[str], Mapping[str, Any] | None] | None = None,
        scopes: tuple[str, ...] = ("rank", "run"),
        forwarder: Forwarder | None = None,
        on_rows: Callable[..., None] | None = None,
    ) -> None:
        """`on_join(run)` is called after a Hello registered its run; `on_report(run, rank, report, msg, hello)`
        after a report was stored and before the detectors judge it (both on the ingest thread, under its lock).
        `registry(run_id)` reads a run's registry row (gradwatch.server.database) for runs the store no longer
        holds, so their job binding and settings outlive eviction and restarts. `on_rows(run, states, sessions,
        rows)`: `on_report` for relayed reports applied as a batch (server/ingest_batch.py)."""
        self._registry = registry
        self._on_rows = on_rows
        self._on_join = on_join
        self._on_report = on_report
        self._config = config
        self._store = store
        self._alerts = alerts
        self._stats = stats
        self._clock = clock
        self._all_specs = detectors
        self._scopes = scopes
        self._forwarder = forwarder
        self._specs = tuple(s for s in detectors if config.detector(s.name).enabled)
        #: run -> its detector settings, for runs whose agents sent per-run settings (Hello.detector_settings).
        self._run_configs: dict[str, Mapping[str, DetectorConfig]] = {}
        self._detectors: dict[str, _RunDetectors] = {}
        self._broken: set[str] = set()
        #: (run, rank) -> ALERT commands waiting for that rank's next frame (bounded per rank).
        self._pending: dict[tuple[str, int], list[pb.Command]] = {}
        self._lock = threading.Lock()
        #: Completed `tick()` calls (what a caller waits on to know the cross-rank detectors judged again).
        self.ticks = 0
        #: Relayed reports applied as batches (server/ingest_batch.py) rather than one at a time.
        self.batched = 0

    def open(self, hello: pb.Hello, *, streaming: bool = True, relayed: bool = False) -> Session:
        """Register a validated Hello; `streaming` counts the rank's open streams. `relayed`: a rank held by a
        relay (the relay refused a second process on the rank already)."""
        configs = self._per_run_configs(hello)
        with self._lock:
            check_settings(self.binding(hello.run_id), hello)
            if not relayed:
                self._refuse_shared_rank(hello)
            run, rank, evicted = self._store.join(hello)
            self._drop_evicted(evicted)
            if configs is not None and run.run_id not in self._run_configs:
                # The run's first stream with settings sets them (later ones cannot change a running judgement).
                self._run_configs[run.run_id] = configs
                self._detectors.pop(run.run_id, None)
            with self._store.lock:
                if streaming:
                    rank.open_streams += 1
                acked = rank.sessions.get(hello.session_id, 0)
            if self._on_join is not None:
                self._on_join(run)
            self._stats.frame("hello")
            local = hello.schema.local_param_counts
            counts = np.asarray(local, dtype=np.int64) if len(local) == len(hello.schema.names) > 0 else None
            if self._forwarder is not None:
                self._forwarder.opened(hello, streaming)
            return Session(hello=hello, run=run, schema=rank.schema, acked_seq=acked, streaming=streaming,
                           local_param_counts=counts, modules=ModuleSchema.of(hello.activation_schema),
                           relayed=relayed)  # fmt: skip

    def _refuse_shared_rank(self, hello: pb.Hello) -> None:
        """FrameRejected (FAILED_PRECONDITION) when another agent session is streaming as this (run, rank):
        two processes that share a run name without distinct ranks (Hogwild workers, a rank set twice) would
        otherwise be merged into one rank's series. The same session reconnecting is let in; the refused one
        retries rarely and gets in once the other's stream has ended (under self._lock)."""
        with self._store.lock:
            run = self._store.get(hello.run_id)
            rank = None if run is None else run.ranks.get(hello.rank)
            if rank is None or rank.open_streams == 0 or rank.session_id in ("", hello.session_id):
                return
            holder = f"host {rank.host!r}, pid {rank.pid}"
        raise FrameRejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            RANK_IN_USE,
            f"rank {hello.rank} of run {hello.run_id!r} is already streaming from another process ({holder}); "
            "give each process its own rank (rank= / GRADWATCH_RANK, with world_size) or its own run name",
        )

    def _per_run_configs(self, hello: pb.Hello) -> Mapping[str, DetectorConfig] | None:
        """The run's detector settings when its agent sent any; FrameRejected naming the bad key otherwise."""
        if not hello.detector_settings:
            return None
        try:
            return run_detector_configs(self._config, hello.detector_settings)
        except SettingError as exc:
            raise FrameRejected(
                grpc.StatusCode.INVALID_ARGUMENT, INVALID_DETECTOR_SETTINGS, f"Hello.detector_settings: {exc}"
            ) from None

    def binding(self, run_id: str) -> RunBinding | None:
        """What run `run_id`'s first Hello fixed: from the store, else the run registry; None for a new run."""
        with self._store.lock:
            run = self._store.get(run_id)
            if run is not None:
                return RunBinding(run.job_name, run.detector_settings)
        record = self._registry(run_id) if self._registry is not None else None
        return None if record is None else RunBinding.from_record(record)

    def bound_job(self, run_id: str) -> str | None:
        """The job name run `run_id` is bound to (held or in the registry); None for a new run."""
        binding = self.binding(run_id)
        return None if binding is None else binding.job_name

    def flushed(self, session: Session) -> None:
        """A Flush call was applied. Flush is an agent's final act (its stream was down at close), so a rank
        without an open stream is done: cross-rank detectors stop judging it (no `stalled` page for a rank
        that closed, or for ranks a Flush flood made up); a later Hello brings it back."""
        with self._lock, self._store.lock:
            rank = session.run.ranks.get(session.hello.rank)
            if rank is not None and rank.open_streams == 0:
                session.run.table.goodbye(rank.rank)

    def close(self, session: Session, *, left: bool = False) -> None:
        """The session's stream ended (for any reason). `left`: the rank's relay went away (the link broke, or
        the run moved to another aggregator replica): the rank leaves the run's table instead of counting as
        disconnected, so no cross-rank detector names it until a relay brings it back."""
        if not session.streaming:
            return
        with self._lock, self._store.lock:
            rank = session.run.ranks.get(session.hello.rank)
            if rank is not None and rank.open_streams > 0:
                rank.open_streams -= 1
                if rank.open_streams == 0 and left:
                    session.run.table.leave(rank.rank)
                elif rank.open_streams == 0 and not rank.said_goodbye:
                    session.run.table.collectives.disconnected(rank.rank, self._clock())
                if rank.open_streams == 0 and self._forwarder is not None:
                    self._forwarder.closed(session.hello)  # not when another stream of the rank is open still

    def relayed_verdict(self, run_id: str, detector: str, rank: int, verdict: Verdict,
                        autopsy: dict[str, Any] | None) -> list[tuple[int, pb.Command]]:  # fmt: skip
        """Apply a relay's per-rank verdict about `rank` of a run this server holds (unknown runs and detectors
        are ignored). Returns the commands it queued, by rank (the ALERT broadcast of a critical one)."""
        with self._lock:
            run = self._store.get(run_id)
            spec = next((s for s in self._all_specs if s.name == detector and s.scope == "rank"), None)
            if run is None or spec is None:
                return []
            self._verdict(run, None, spec, rank, verdict, autopsy)
            return [(r, c) for r in list(run.ranks) for c in self._pending.pop((run_id, r), ())]

    def hand_over(self, run_id: str, *, relayed: bool = True) -> bool:
        """Run `run_id` moved to another replica: it expires here without paging a resolution (AlertBook.
        hand_over). `relayed`: every rank left with its relay; else (agents connected directly) no rank has a
        stream open here. False if a rank is back."""
        with self._lock:
            with self._store.lock:
                run = self._store.get(run_id)
                if run is None or run.expired:
                    return False
                if run.table.joined.any() if relayed else any(r.open_streams for r in run.ranks.values()):
                    return False
                run.expired, run.finished_at = True, self._clock()
            self._forget_pending(run_id)
            self._alerts.hand_over(run_id)
            return True

    def quiet_runs(self, quiet_s: float) -> list[tuple[str, float]]:
        """(run, last seen) of the unfinished runs with ranks but no stream open here for `quiet_s` or more:
        each either died or moved to another replica (the caller asks the other replicas which)."""
        now = self._clock()
        with self._store.lock:
            return [
                (run.run_id, run.last_seen)
                for run in self._store.runs()
                if not run.expired and not run.finished and run.ranks and now - run.last_seen >= quiet_s
                and not any(r.open_streams for r in run.ranks.values())
            ]  # fmt: skip

    def queue_command(self, run_id: str, rank: int, command: pb.Command) -> None:
        """A command from upstream for one of this relay's ranks: it goes out with the rank's next frame."""
        with self._lock:
            queued = self._pending.setdefault((run_id, rank), [])
            if len(queued) < MAX_PENDING_ALERTS:
                queued.append(command)

    def apply(self, session: Session, frame: pb.AgentFrame, kind: str) -> list[pb.Command]:
        """Apply one validated frame; see the module docstring."""
        started = time.perf_counter()
        commands: list[pb.Command] = []
        with self._lock:
            run, rank, evicted = self._store.locate(session.hello)
            self._drop_evicted(evicted)
            if run is not session.run:  # evicted and re-registered: remap the schema to the new run
                with self._store.lock:
                    session.run, session.schema = run, run.intern_schema(tuple(session.hello.schema.names))
            sequenced = kind in _SEQUENCED
            if sequenced and frame.seq <= rank.sessions.get(session.hello.session_id, 0):
                self._stats.duplicate()
                session.acked_seq = max(session.acked_seq, rank.sessions[session.hello.session_id])
                return commands
            if kind == "report":
                commands = self._apply_report(session, run, rank, frame.report)
            elif kind == "event":
                self._store.record_event(run, rank.rank, frame.event)
            elif kind == "heartbeat":
                with self._store.lock:
                    rank.dropped = bounded_drop_reasons(frame.heartbeat.dropped)
                    rank.last_heartbeat_at = self._clock()
                    run.table.heard(rank.rank, frame.heartbeat.step, rank.last_heartbeat_at)
                    if frame.heartbeat.HasField("collectives"):
                        run.table.collectives.update(rank.rank, frame.heartbeat.collectives, rank.last_heartbeat_at)
            elif kind == "goodbye":
                with self._store.lock:
                    rank.said_goodbye = True
                    run.table.goodbye(rank.rank)
                    run.table.collectives.goodbye(rank.rank, frame.goodbye.reason)
                    if run.finished and run.finished_at is None:
                        run.finished_at = self._clock()
                self._sweep_locked()  # a zero retention expires the run at once
            if sequenced:
                with self._store.lock:
                    rank.sessions[session.hello.session_id] = frame.seq
                session.acked_seq = frame.seq
            if session.streaming and self._pending:  # a Flush call has no reply stream to carry commands
                commands.extend(self._pending.pop((run.run_id, rank.rank), ()))
            if self._forwarder is not None:
                self._forwarder.applied(session.hello, frame, kind)
        self._stats.applied(kind, time.perf_counter() - started)
        return commands

    def apply_columns(self, run: RunState, rank: np.ndarray, sessions: np.ndarray, states: np.ndarray,
                      columns: Columns) -> list[tuple[int, pb.Command]] | None:  # fmt: skip
        """Relayed reports of `run` as a batch, or None (nothing applied): see server/ingest_batch.py."""
        return apply_columns(self, run, rank, sessions, states, columns, self._clock())

    def tick(self) -> None:
        """Let every cross-rank detector of every run judge it now, reports or not (a hang shows as silence).
        Finished runs still tick until they expire, so their ranks' goodbyes clear what they fired. Called by the
        app every TICK_INTERVAL_S."""
        with self._lock:
            now = self._clock()
            with self._store.lock:
                runs = [run for run in self._store.runs() if not run.expired]
            for run in runs:
                detectors = self._detectors.get(run.run_id)
                for spec, detector in detectors.pairs if detectors is not None else ():
                    if spec.scope == "run":
                        for finding in self._tick_findings(spec, cast(RunDetector, detector), run, now):
                            self._apply_finding(run, None, spec, finding)
            self.ticks += 1

    def sweep(self) -> list[str]:
        """Expire runs finished longer than `finished_run_retention_s` ago: they leave /metrics and
        their alerts resolve. Called periodically by the app; returns the expired run ids."""
        with self._lock:
            return self._sweep_locked()

    # ------------------------------------------------------------------ internals

    def _sweep_locked(self) -> list[str]:
        now = self._clock()
        retention = self._config.finished_run_retention_s
        with self._store.lock:
            expired = [
                run
                for run in self._store.runs()
                if run.finished_at is not None and not run.expired and now - run.finished_at >= retention
            ]
            for run in expired:
                run.expired = True
        for run in expired:
            self._forget_pending(run.run_id)
            self._alerts.resolve_run(run.run_id, "run finished")
        return [run.run_id for run in expired]

    def _apply_report(self, session: Session, run: RunState, rank: RankState, msg: pb.StepReport) -> list[pb.Command]:
        if rank.life_session != session.hello.session_id:
            restarted = rank.life_session != "" and rank.last_step is not None and msg.step <= rank.last_step
            rank.life_session = session.hello.session_id
            if restarted and not session.relayed:  # a relayed rank restarted on its relay, which judged that
                self._rank_restarted(run, rank, msg.step)
        report = build_report(run.run_id, rank.rank, msg, session.schema.names, self._clock(), session.modules,
                              session.local_param_counts)  # fmt: skip
        self._store.record_report(run, rank, report, session.schema)
        if msg.HasField("collectives") or msg.HasField("between_collectives_s"):
            with self._store.lock:
                board = run.table.collectives
                if msg.HasField("collectives"):
                    board.update(rank.rank, msg.collectives, self._clock())
                if msg.HasField("between_collectives_s"):
                    board.between(rank.rank, msg.between_collectives_s)
        if self._on_report is not None:
            self._on_report(run, rank, report, msg, session.hello)
        commands: list[pb.Command] = []
        parts, relayed = report_parts(report), session.relayed
        for spec, observe, needs, cross_rank in self._detectors_for(run.run_id).per_report:
            if needs and not needs & parts:
                continue  # none of the parts it judges: it would return None and change nothing (DetectorSpec)
            if cross_rank:
                for finding in self._observed_findings(spec, observe, run, report):
                    commands.extend(self._apply_finding(run, rank, spec, finding))
                continue
            if relayed:
                continue  # its relay judged it
            try:
                verdict = observe(report)  # scope "rank": Detector.observe
            except Exception:
                self._detector_failed(spec)
                continue
            if verdict is not None:  # the common case: nothing to apply
                autopsy, verdict = autopsy_of(spec.name, report, verdict)
                commands.extend(self._verdict(run, rank, spec, rank.rank, verdict, autopsy))
        return commands

    def _rank_restarted(self, run: RunState, rank: RankState, step: int) -> None:
        """A new agent session of `rank` began again at or before the step the last one reached (a job restarted
        from scratch or from a checkpoint under the same run id, a second fit in one process): its per-rank
        detectors judge it afresh, and what they had fired for it is resolved (its alerts belonged to the life
        that ended; a detector that forgot the rank would never clear them). Cross-rank detectors see the rank
        join again through the rank table."""
        detectors = self._detectors.get(run.run_id)
        for spec, detector in detectors.pairs if detectors is not None else ():
            if spec.scope != "rank":
                continue
            try:
                detector.forget(rank.rank)  # type: ignore[union-attr]
            except Exception:
                self._detector_failed(spec)
            alert = self._alerts.firing_alert(run.run_id, spec.name)
            if alert is not None and rank.rank in alert.active:
                self._verdict(run, rank, spec, rank.rank, Clear(step))
        self._store.count_restart(run)

    def _apply_finding(self, run: RunState, sender: RankState | None, spec: DetectorSpec,
                       finding: Finding) -> list[pb.Command]:  # fmt: skip
        """Apply a cross-rank finding, with the autopsy of the report it is about when the detector held one."""
        autopsy, verdict = None, finding.verdict
        if finding.report is not None:
            autopsy, verdict = autopsy_of(spec.name, finding.report, verdict)
        return self._verdict(run, sender, spec, finding.rank, verdict, autopsy)

    def _tick_findings(self, spec: DetectorSpec, detector: RunDetector, run: RunState,
                       now: float) -> Sequence[Finding]:  # fmt: skip
        """A cross-rank detector's findings on a tick at `now`; () if it raised."""
        try:
            with self._store.lock:
                return detector.tick(run.table, now)
        except Exception:
            self._detector_failed(spec)
            return ()

    def _observed_findings(self, spec: DetectorSpec, observe: Callable[..., Sequence[Finding]], run: RunState,
                           report: RankReport) -> Sequence[Finding]:  # fmt: skip
        """A cross-rank detector's findings for `report` (`observe`: its bound RunDetector.observe); () if it
        raised."""
        try:
            with self._store.lock:
                return observe(report, run.table)
        except Exception:
            self._detector_failed(spec)
            return ()

    def _detector_failed(self, spec: DetectorSpec) -> None:
        """A detector bug must not take ingestion (or the other detectors) down; log it once."""
        if spec.name not in self._broken:
            self._broken.add(spec.name)
            log.exception("detector %s failed; further failures are not logged", spec.name)

    def _verdict(self, run: RunState, sender: RankState | None, spec: DetectorSpec, rank: int,
                 verdict: Verdict | None, autopsy: dict[str, Any] | None = None) -> list[pb.Command]:  # fmt: skip
        """Apply one verdict about `rank`; commands for `sender`, the rank whose stream is being served."""
        commands: list[pb.Command] = []
        forward = self._forwarder is not None and spec.scope == "rank"
        if isinstance(verdict, Fire):
            if self._alerts.fire(run.run_id, spec, rank, verdict, autopsy):
                if forward:  # the rank joined the alert (later Fires only update its step and value)
                    self._forwarder.verdict(run.run_id, spec.name, rank, verdict, autopsy)  # type: ignore[union-attr]
                self._store.count_trigger(run, spec.name)
                if sender is not None and sender.rank == rank:
                    commands.extend(self._full_stats_command(sender, spec))
                if spec.severity == "critical":
                    self._broadcast_alert(run, rank, spec, verdict)
        elif isinstance(verdict, Clear):
            if forward:
                self._forwarder.verdict(run.run_id, spec.name, rank, verdict, None)  # type: ignore[union-attr]
            self._alerts.clear(run.run_id, spec.name, rank)
        return commands

    def _full_stats_command(self, rank: RankState, spec: DetectorSpec) -> list[pb.Command]:
        """Ask a newly firing rank for per-layer statistics on every step, to locate the fault."""
        steps = self._config.full_stats_on_alert_steps
        if steps == 0 or rank.full_stats_interval == 1:
            return []
        return [pb.Command(kind=pb.COMMAND_KIND_FULL_STATS, steps=steps, reason=f"{spec.name} fired")]

    def _broadcast_alert(self, run: RunState, rank: int, spec: DetectorSpec, verdict: Fire) -> None:
        """Queue an ALERT command for every rank of the run (each gets it with its next frame): agents that
        opted in stop or call back; all ranks must hear it, or the others would hang in their collectives."""
        command = pb.Command(kind=pb.COMMAND_KIND_ALERT, reason=verdict.summary, detector=spec.name,
                             severity=spec.severity, step=verdict.step, rank=rank)  # fmt: skip
        for other in list(run.ranks):
            queued = self._pending.setdefault((run.run_id, other), [])
            if len(queued) < MAX_PENDING_ALERTS:
                queued.append(command)

    def _detectors_for(self, run_id: str) -> _RunDetectors:
        detectors = self._detectors.get(run_id)
        if detectors is None:
            configs = self._run_configs.get(run_id)
            if configs is None:
                specs = [s for s in self._specs if s.scope in self._scopes]
                pairs = [(s, s.create(self._config.detector(s.name))) for s in specs]
            else:
                pairs = [(s, s.create(configs[s.name])) for s in self._all_specs
                         if configs[s.name].enabled and s.scope in self._scopes]  # fmt: skip
            detectors = self._detectors[run_id] = _RunDetectors.of(pairs)
        return detectors

    def _drop_evicted(self, evicted: list[str]) -> None:
        """Forget the detector state of runs evicted from memory. Their alerts are left alone: only an expired
        run (alerts already resolved) or, with limits.at_max_runs evict_idle, a run without a firing alert
        is ever evicted (server/store.py)."""
        for run_id in evicted:
            self._detectors.pop(run_id, None)
            self._run_configs.pop(run_id, None)
            self._forget_pending(run_id)

    def _forget_pending(self, run_id: str) -> None:
        for key in [k for k in self._pending if k[0] == run_id]:
            del self._pending[key]
