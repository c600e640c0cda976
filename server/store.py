"""In-memory state of every run and rank: bounded, vectorised, thread-safe.

Contract
--------
* Bounded: at most `limits.max_runs` runs and `limits.max_ranks_total` ranks over all runs. At the run
  limit, finished runs past their retention make room first; then `limits.at_max_runs` decides: `refuse`
  (the new run's Hello is refused) or `evict_idle` (the least recently active run that `can_evict` allows,
  one without a firing alert or an open stream, is dropped from memory and counted). A fixed-size numpy
  ring of report rows per rank, a bounded number of remembered agent sessions per rank, a bounded event
  log per run, and per-layer metric series capped to the first `max_layer_series_per_run` layers in schema order.
* Vectorised: per-layer columns are kept as the float32 arrays decoded from the
  frame; aggregation across ranks is numpy fancy indexing, never a loop per layer.
* Exact across ranks: each report may carry the rank's share of the global gradient
  sum of squares (StepReport.grad_global_share); once every rank of the run has
  reported a step, the shares are summed into the run's global gradient norm for
  that step (exact for DDP, FSDP2 and hybrid layouts). Incomplete steps wait in a
  bounded table (GLOBAL_PENDING_STEPS, oldest dropped).
* Thread-safe: one re-entrant lock (`RunStore.lock`) guards everything; the ingest
  path writes from the gRPC loop thread. HTTP readers (/metrics, /api/v1/runs) take
  `snapshot()` under the lock, O(ranks) cheap copies, and build their answer from it
  after releasing the lock, so a large read never holds ingestion up.
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.server.config import LimitsConfig
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import NON_FINITE_KINDS, RankReport
from gradwatch.server.ring import RecordRing, RingTable, TableRing
from gradwatch.server.step_pending import StepPlan, plan
from gradwatch.server.validate import rank_limit_reached, run_limit_reached
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["RING_DTYPE", "RankState", "RunState", "RunStore", "SchemaEntry", "non_finite_text"]

#: One row per report in each rank's ring. loss is NaN when no loss was passed.
RING_DTYPE = np.dtype(
    [
        ("step", "<i8"),
        ("wall_time", "<f8"),
        ("received_at", "<f8"),
        ("loss", "<f8"),
        ("grad_norm", "<f8"),
        ("step_duration", "<f8"),
        ("flags", "<u4"),
    ]
)
#: Bounds on what a misbehaving agent can make the server remember per run.
EVENTS_PER_RUN = 100
EVENT_MESSAGE_CHARS = 1024
EVENT_ATTRIBUTES = 32
EVENT_ATTRIBUTE_CHARS = 256
SCHEMAS_PER_RUN = 64  # distinct schemas interned; more are mapped but not cached
DROPPED_LAYERS_TRACKED = 1 << 17  # distinct dropped layer names counted (a floor beyond this)
GLOBAL_PENDING_STEPS = 256  # steps waiting for the other ranks' gradient shares
GLOBAL_HISTORY = 1024  # (step, global gradient norm) kept per run
IDENTITY_CHARS = 256  # host, versions, device kind from a Hello: shown in the API, never labels; truncated
_NO_COLUMNS: Mapping[str, np.ndarray] = {}


def non_finite_text(value: float) -> str:
    """How a non-finite float is written in views, logs and the CLI: "NaN", "+Inf" or "-Inf"."""
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


@dataclass(frozen=True)
class SchemaEntry:
    """A layer schema as sent in a Hello, interned per run, with its map into the run's exported layers.

    `src` are schema positions that are exported, `dst` their index in RunState.layer_names.
    """

    names: tuple[str, ...]
    src: np.ndarray
    dst: np.ndarray


@dataclass
class RankState:
    """One rank of a run: identity from its latest Hello, history ring and latest columns."""

    rank: int
    ring: RecordRing | TableRing
    schema: SchemaEntry
    session_id: str = ""
    host: str = ""
    pid: int = 0
    local_rank: int = 0
    agent_version: str = ""
    torch_version: str = ""
    device_kind: str = ""
    full_stats_interval: int = 0
    #: From the latest report: the interval in force (the agent's overhead budget may stretch it).
    full_stats_interval_in_force: int = 0
    over_budget: bool = False
    #: Agent session id -> highest seq applied; oldest sessions forgotten first.
    sessions: collections.OrderedDict[str, int] = field(default_factory=collections.OrderedDict)
    #: The agent session whose reports the detectors judged last ("" before any): a report of another session
    #: whose step is not past `last_step` is a restart (server/ingest.py).
    life_session: str = ""
    last_step: int | None = None
    last_report_at: float | None = None
    last_loss: float | None = None  # latest finite loss
    last_finite_loss_step: int | None = None  # the step of last_loss
    #: "NaN", "+Inf" or "-Inf" while the latest reported loss is not finite, else None.
    loss_non_finite: str | None = None
    last_grad_norm: float | None = None  # latest finite gradient norm
    last_step_duration: float | None = None  # seconds the latest reported step took (finite, ≥ 0)
    columns: Mapping[str, np.ndarray] = field(default_factory=lambda: _NO_COLUMNS)
    columns_schema: SchemaEntry | None = None
    columns_step: int | None = None
    said_goodbye: bool = False
    last_heartbeat_at: float | None = None
    open_streams: int = 0
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass
class RunState:
    """One run: metadata, ranks, the exported layer set and run-scoped counters."""

    run_id: str
    job_name: str
    world_size: int
    first_seen: float
    last_seen: float
    protocol_version: int
    layer_cap: int
    ranks: dict[int, RankState] = field(default_factory=dict)
    #: Exported layers (≤ layer_cap), first seen in schema order, and their index.
    layer_names: list[str] = field(default_factory=list)
    layer_index: dict[str, int] = field(default_factory=dict)
    dropped_layers: set[str] = field(default_factory=set)
    schemas: dict[tuple[str, ...], SchemaEntry] = field(default_factory=dict)
    non_finite_counts: dict[str, int] = field(default_factory=dict)
    detector_triggers: dict[str, int] = field(default_factory=dict)
    #: Ranks that restarted (a new agent session beginning again at or before its last step; server/ingest.py).
    rank_restarts: int = 0
    events: collections.deque[dict[str, Any]] = field(default_factory=lambda: collections.deque(maxlen=EVENTS_PER_RUN))
    #: Server time when the run became finished (every rank said Goodbye), else None.
    finished_at: float | None = None
    #: Finished longer than the retention: out of /metrics, alerts resolved (set by Ingestor.sweep).
    expired: bool = False
    #: Reports of steps a loss scaler skipped (StepReport.skipped_step), all ranks.
    skipped_steps: int = 0
    #: Rank reports of optimizer updates the agent's guard did not apply, and guard rollbacks, all ranks.
    guard_skipped_steps: int = 0
    guard_rollbacks: int = 0
    #: Global gradient norm of the latest step every rank reported a share for, and its step.
    global_grad_norm: float | None = None
    global_grad_norm_step: int | None = None
    global_grad_norms: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=GLOBAL_HISTORY)
    )
    #: step -> {rank: share} for steps not yet reported by every rank.
    pending_shares: collections.OrderedDict[int, dict[int, float]] = field(default_factory=collections.OrderedDict)
    #: The ranks' report rings (RankState.ring is its row of it), so a batch of rows is one scatter.
    rings: RingTable | None = None
    #: Set when the run was loaded from the database at start-up: its last saved summary (step, loss, ranks),
    #: shown until the first agent reconnects (then None).
    restored_summary: dict[str, Any] | None = None
    #: Every rank's latest state as numpy columns, for the cross-rank detectors (server/ranktable.py).
    table: RankTable = field(default_factory=lambda: RankTable(0))
    #: Hello.detector_settings of the run's first Hello (fixed for the run's life; None: not known, a run
    #: restored from a database written before settings were kept).
    detector_settings: dict[str, str] | None = None
    #: Restored from the database with the run (gradwatch.server.persistence): each saved rank's latest values
    #: and report ring, read while no agent is back; a rank that comes back continues its ring. Not in `ranks`
    #: (no detector, eviction or finish rule sees them); counted in RunStore.ranks_total.
    restored_ranks: dict[int, RankState] = field(default_factory=dict)
    #: The per-layer aggregates (aggregate_layers) saved with a restored run: column -> (values, seen).
    restored_layers: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Every rank 0..world_size-1 has said Goodbye on its latest session. A run restored from the database
        without ranks (no agent back since the restart) is finished when it was finished before."""
        if self.restored_summary is not None:
            return self.finished_at is not None
        return all(r in self.ranks and self.ranks[r].said_goodbye for r in range(self.world_size))

    @property
    def exported(self) -> bool:
        """Whether /metrics shows the run: unfinished, or finished within the retention period."""
        return not self.expired

    def add_grad_share(self, step: int, rank: int, share: float) -> None:
        """Record a rank's share of step `step`; complete steps become the run's global gradient norm."""
        shares = self.pending_shares.get(step)
        if shares is None:
            shares = self.pending_shares[step] = {}
            while len(self.pending_shares) > GLOBAL_PENDING_STEPS:
                self.pending_shares.popitem(last=False)
        shares[rank] = share  # a resent step overwrites: never counted twice
        if len(shares) < self.world_size:
            return
        del self.pending_shares[step]
        norm = math.sqrt(math.fsum(shares.values()))
        self.global_grad_norms.append((step, norm))
        if math.isfinite(norm) and (self.global_grad_norm_step is None or step >= self.global_grad_norm_step):
            self.global_grad_norm, self.global_grad_norm_step = norm, step

    def plan_grad_shares(self, steps: np.ndarray, ranks: np.ndarray) -> StepPlan | None:
        """How `add_grad_share` for each (step, rank) in order would go (server/detectors/step_pending.py); None
        when only one at a time can tell."""
        return plan(self.pending_shares, steps, ranks, self.world_size, GLOBAL_PENDING_STEPS,  # type: ignore[arg-type]
                    lambda held, r: np.fromiter((x in held for x in r.tolist()), dtype=bool, count=r.size),  # type: ignore[operator]
                    first_wins=False)  # fmt: skip

    def add_grad_shares(self, steps: StepPlan, ranks: np.ndarray, shares: np.ndarray) -> None:
        """`add_grad_share` for every share, as planned by `plan_grad_shares`."""
        for key in steps.dropped:
            del self.pending_shares[key]  # type: ignore[arg-type]
        for key, taken, new in zip(steps.keys, steps.taken, steps.new, strict=True):
            held = self.pending_shares[key] = {} if new else self.pending_shares[key]  # type: ignore[index]
            held.update(zip(ranks[taken].tolist(), shares[taken].tolist(), strict=True))
        for i in steps.completions():
            step = int(steps.keys[i])  # type: ignore[call-overload]
            norm = math.sqrt(math.fsum(self.pending_shares.pop(step).values()))
            self.global_grad_norms.append((step, norm))
            if math.isfinite(norm) and (self.global_grad_norm_step is None or step >= self.global_grad_norm_step):
                self.global_grad_norm, self.global_grad_norm_step = norm, step

    def intern_schema(self, names: tuple[str, ...]) -> SchemaEntry:
        """The shared SchemaEntry for `names`, extending the exported layer set if room is left."""
        entry = self.schemas.get(names)
        if entry is not None:
            return entry
        if not self.layer_names:
            # Common case (every rank has the same layers): no per-name Python work.
            kept = names[: self.layer_cap]
            self.layer_names.extend(kept)
            self.layer_index.update(zip(kept, range(len(kept)), strict=True))
            self._note_dropped(names[self.layer_cap :])
            src = np.arange(len(kept), dtype=np.int64)
            entry = SchemaEntry(names, src, src.copy())
        else:
            index = np.fromiter((self._index_of(n) for n in names), dtype=np.int64, count=len(names))
            src = np.flatnonzero(index >= 0)
            entry = SchemaEntry(names, src, index[src])
        if len(self.schemas) < SCHEMAS_PER_RUN:
            self.schemas[names] = entry
        return entry

    def _note_dropped(self, names: tuple[str, ...]) -> None:
        room = DROPPED_LAYERS_TRACKED - len(self.dropped_layers)
        if room > 0:
            self.dropped_layers.update(names[:room])

    def _index_of(self, name: str) -> int:
        i = self.layer_index.get(name)
        if i is not None:
            return i
        if len(self.layer_names) < self.layer_cap:
            self.layer_index[name] = len(self.layer_names)
            self.layer_names.append(name)
            return self.layer_index[name]
        self._note_dropped((name,))
        return -1

    def reader_copy(self) -> RunState:
        """A copy that stays consistent after the store's lock is released (call with it held): its own ranks,
        counters, events and rank table. Shared with the live run, because the ingest path replaces rather
        than mutates them: the per-layer column arrays, each rank's `dropped` dict and its schema. Still live:
        each rank's `ring` and the run's `dropped_layers` set (readers take only their sizes) and `schemas`."""
        clone = object.__new__(RunState)
        clone.__dict__.update(self.__dict__)
        clone.ranks = {number: _copied(state) for number, state in self.ranks.items()}
        clone.restored_ranks = {number: _copied(state) for number, state in self.restored_ranks.items()}
        clone.layer_names = list(self.layer_names)
        clone.non_finite_counts = dict(self.non_finite_counts)
        clone.detector_triggers = dict(self.detector_triggers)
        clone.events = collections.deque(self.events, maxlen=EVENTS_PER_RUN)
        clone.global_grad_norms = collections.deque(self.global_grad_norms, maxlen=GLOBAL_HISTORY)
        clone.pending_shares = collections.OrderedDict()
        clone.table = self.table.copy()
        return clone

    def aggregate_layers(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """Max over ranks of the latest `column` for each exported layer, and which layers reported it.

        NaN is ignored unless every reporting rank has NaN (then the value is NaN): the
        series keeps existing, and non-finite values are counted (and alerted on) elsewhere.
        A restored run without an agent back answers what was saved before the restart.
        """
        if not self.ranks and column in self.restored_layers:
            saved, reported = self.restored_layers[column]
            return saved.copy(), reported.copy()
        out = np.full(len(self.layer_names), np.nan, dtype=np.float32)
        seen = np.zeros(len(self.layer_names), dtype=bool)
        for state in self.ranks.values():
            values = state.columns.get(column)
            entry = state.columns_schema
            if values is None or entry is None or entry.src.size == 0:
                continue
            out[entry.dst] = np.fmax(out[entry.dst], values[entry.src])
            seen[entry.dst] = True
        return out, seen


class RunStore:
    """All runs, bounded by `limits`; see the module docstring for the contract."""

    def __init__(self, limits: LimitsConfig, *, detector_names: tuple[str, ...], clock: Callable[[], float],
                 can_evict: Callable[[list[RunState]], list[RunState]] | None = None) -> None:  # fmt: skip
        """`can_evict(runs)`: which of `runs` (least recently active first) `evict_idle` may drop."""
        self.lock = threading.RLock()
        self._limits = limits
        self._detector_names = detector_names
        self._clock = clock
        self._can_evict = can_evict
        self._runs: collections.OrderedDict[str, RunState] = collections.OrderedDict()
        self.evicted_total = 0
        #: Ranks held over all runs (limits.max_ranks_total).
        self.ranks_total = 0

    # ------------------------------------------------------------------ writers

    def join(self, hello: pb.Hello) -> tuple[RunState, RankState, list[str]]:
        """Register (or refresh) the run and rank of a validated Hello.

        Returns the run, the rank and the ids of runs evicted to make room.
        """
        with self.lock:
            now = self._clock()
            held = self._runs.get(hello.run_id)
            held_rank = held is not None and (hello.rank in held.ranks or hello.rank in held.restored_ranks)
            if not held_rank and self.ranks_total >= self._limits.max_ranks_total:
                raise rank_limit_reached(hello.run_id, hello.rank, self._limits.max_ranks_total)
            run, evicted = self._run_for(hello, now)
            run.job_name = hello.job_name or run.job_name
            if run.detector_settings is None:  # restored from a registry row that did not keep them
                run.detector_settings = dict(hello.detector_settings)
            run.world_size = hello.world_size
            run.protocol_version = hello.protocol_version
            fresh = hello.rank not in run.ranks  # new, or back after a restart: the rank table starts it afresh
            state = self._rank_for(run, hello)
            state.session_id = hello.session_id
            cut = IDENTITY_CHARS
            state.host, state.pid, state.local_rank = hello.host[:cut], hello.pid, hello.local_rank
            state.agent_version, state.torch_version = hello.agent_version[:cut], hello.torch_version[:cut]
            state.device_kind, state.full_stats_interval = hello.device_kind[:cut], hello.full_stats_interval
            state.schema = run.intern_schema(tuple(hello.schema.names))
            state.said_goodbye = False
            run.table.join(hello.rank, hello.world_size, hello.host, hello.replica_group, hello.replica_group_size, now,
                           new_session=fresh or hello.session_id not in state.sessions)  # fmt: skip
            run.finished_at, run.expired = None, False  # a rank came back: the run lives again
            run.restored_summary = None  # an agent is back: live values from now on
            if hello.session_id not in state.sessions:
                state.sessions[hello.session_id] = 0
                while len(state.sessions) > self._limits.max_sessions_per_rank:
                    state.sessions.popitem(last=False)
            return run, state, evicted

    def locate(self, hello: pb.Hello) -> tuple[RunState, RankState, list[str]]:
        """The run and rank of an open session, re-registering them if they were evicted meanwhile."""
        with self.lock:
            run = self._runs.get(hello.run_id)
            state = run.ranks.get(hello.rank) if run is not None else None
            if run is None or state is None or hello.session_id not in state.sessions:
                return self.join(hello)
            run.last_seen = self._clock()
            self._runs.move_to_end(hello.run_id)
            return run, state, []

    def record_report(self, run: RunState, state: RankState, report: RankReport, schema: SchemaEntry) -> None:
        """Append a report to the rank's ring and update its latest values and run counters.

        `schema` is the sending session's schema (the one the columns are indexed by).
        """
        with self.lock:
            loss = math.nan if report.loss is None else report.loss
            state.ring.append(
                (
                    report.step,
                    report.wall_time,
                    report.received_at,
                    loss,
                    report.grad_norm,
                    report.step_duration_s,
                    report.non_finite_flags,
                )
            )
            state.last_step = report.step
            state.last_report_at = report.received_at
            run.table.report(report.rank, report.step, report.step_duration_s, report.pre_forward_s,
                             report.received_at)  # fmt: skip
            if report.loss is not None and math.isfinite(report.loss):
                state.last_loss, state.last_finite_loss_step, state.loss_non_finite = report.loss, report.step, None
            elif report.loss is not None:
                state.loss_non_finite = non_finite_text(report.loss)
            if math.isfinite(report.grad_norm):
                state.last_grad_norm = report.grad_norm
            if math.isfinite(report.step_duration_s) and report.step_duration_s >= 0:
                state.last_step_duration = report.step_duration_s
            if report.columns:
                state.columns, state.columns_schema, state.columns_step = report.columns, schema, report.step
            for kind in report.non_finite_kinds:
                run.non_finite_counts[kind] += 1
            if report.skipped:
                run.skipped_steps += 1
            if report.guard_skip_reasons:
                run.guard_skipped_steps += 1
            if report.guard_rolled_back_to is not None:
                run.guard_rollbacks += 1
            if report.full_stats_interval:
                state.full_stats_interval_in_force = report.full_stats_interval
            state.over_budget = report.over_budget
            if report.grad_global_share is not None and report.rank < run.world_size:
                run.add_grad_share(report.step, report.rank, report.grad_global_share)

    def record_rows(self, run: RunState, ranks: np.ndarray, rows: np.ndarray, states: Sequence[RankState] | np.ndarray,
                    extras: Sequence[tuple[int, bool]]) -> None:  # fmt: skip
        """`record_report`'s per-rank part for compact reports without columns (the relayed batch path, under the
        store's lock): `rows[i]` (RING_DTYPE) is a report of rank `ranks[i]` (`states[i]`), `extras[i]` its
        full-statistics interval and over_budget, in arrival order; losses are finite or NaN (no loss)."""
        assert run.rings is not None  # every rank of the run joined through _rank_for
        run.rings.append_many(ranks, rows)
        columns = (rows["step"].tolist(), rows["received_at"].tolist(), rows["loss"].tolist(),
                   rows["grad_norm"].tolist(), rows["step_duration"].tolist())  # fmt: skip
        for state, step, received_at, loss, grad_norm, duration, (interval, over_budget) in zip(
            states, *columns, extras, strict=True
        ):
            state.last_step, state.last_report_at, state.over_budget = step, received_at, over_budget
            if loss == loss:  # not NaN: finite (the batch path takes no other)
                state.last_loss, state.last_finite_loss_step, state.loss_non_finite = loss, step, None
            if grad_norm == grad_norm:
                state.last_grad_norm = grad_norm
            if duration >= 0 and math.isfinite(duration):
                state.last_step_duration = duration
            if interval:
                state.full_stats_interval_in_force = interval

    def touch(self, run: RunState) -> bool:
        """`locate()` for a batch of reports of `run`: False when the run is no longer the one held (evicted)."""
        with self.lock:
            if self._runs.get(run.run_id) is not run:
                return False
            run.last_seen = self._clock()
            self._runs.move_to_end(run.run_id)
            return True

    def record_event(self, run: RunState, rank: int, event: pb.Event) -> None:
        """Keep the event in the run's bounded log, truncated (events are for humans, not bulk data)."""
        cut = EVENT_ATTRIBUTE_CHARS
        attributes = dict(itertools.islice(((k[:cut], v[:cut]) for k, v in event.attributes.items()), EVENT_ATTRIBUTES))
        with self.lock:
            run.events.append(
                {
                    "rank": rank,
                    "kind": event.kind[:cut],
                    "step": event.step,
                    "wall_time": event.wall_time,
                    "message": event.message[:EVENT_MESSAGE_CHARS],
                    "attributes": attributes,
                }
            )

    def count_restart(self, run: RunState) -> None:
        with self.lock:
            run.rank_restarts += 1

    def count_trigger(self, run: RunState, detector: str) -> None:
        with self.lock:
            run.detector_triggers[detector] = run.detector_triggers.get(detector, 0) + 1

    def restore(self, record: Mapping[str, Any], ranks: Mapping[int, RankState] | None = None) -> RunState:
        """Re-register a run saved before a restart (gradwatch.server.persistence), without live ranks; `ranks`:
        its saved ranks (RunState.restored_ranks), as many as limits.max_ranks_total leaves room for."""
        with self.lock:
            run = self._runs.get(record["run_id"])
            if run is not None:
                return run
            while len(self._runs) >= self._limits.max_runs:
                self._drop(next(iter(self._runs.values())))
            run = RunState(
                run_id=record["run_id"],
                job_name=record["job_name"],
                world_size=record["world_size"],
                first_seen=record["first_seen"],
                last_seen=record["last_seen"],
                protocol_version=record["protocol_version"],
                layer_cap=self._limits.max_layer_series_per_run,
                non_finite_counts=dict.fromkeys(NON_FINITE_KINDS, 0),
                detector_triggers=dict.fromkeys(self._detector_names, 0),
                finished_at=record["finished_at"],
                restored_summary=dict(record["summary"]),
                detector_settings=record["summary"].get("detector_settings"),
            )
            room = max(0, self._limits.max_ranks_total - self.ranks_total)
            run.restored_ranks = dict(itertools.islice(sorted((ranks or {}).items()), room))
            self.ranks_total += len(run.restored_ranks)
            self._runs[run.run_id] = run
            return run

    # ------------------------------------------------------------------ readers

    def get(self, run_id: str) -> RunState | None:
        with self.lock:
            return self._runs.get(run_id)

    def __len__(self) -> int:
        with self.lock:
            return len(self._runs)

    def runs(self) -> Iterator[RunState]:
        """Runs, least recently active first. Hold `self.lock` while iterating."""
        return iter(list(self._runs.values()))

    def snapshot(self) -> list[RunState]:
        """Reader copies of every run (RunState.reader_copy), least recently active first; takes the lock only
        while copying (a few microseconds per rank), so readers build their answers without it."""
        with self.lock:
            return [run.reader_copy() for run in self._runs.values()]

    # ------------------------------------------------------------------ internals

    def _run_for(self, hello: pb.Hello, now: float) -> tuple[RunState, list[str]]:
        run = self._runs.get(hello.run_id)
        if run is not None:
            run.last_seen = now
            self._runs.move_to_end(hello.run_id)
            return run, []
        evicted: list[str] = []
        if len(self._runs) >= self._limits.max_runs:
            victim = self._victim()
            if victim is None:
                raise run_limit_reached(hello.run_id, self._limits.max_runs, self._limits.at_max_runs)
            evicted.append(victim.run_id)
            self._drop(victim)
        run = RunState(
            run_id=hello.run_id,
            job_name=hello.job_name,
            world_size=hello.world_size,
            first_seen=now,
            last_seen=now,
            protocol_version=hello.protocol_version,
            layer_cap=self._limits.max_layer_series_per_run,
            non_finite_counts=dict.fromkeys(NON_FINITE_KINDS, 0),
            detector_triggers=dict.fromkeys(self._detector_names, 0),
            detector_settings=dict(hello.detector_settings),
        )
        self._runs[hello.run_id] = run
        return run, evicted

    def _victim(self) -> RunState | None:
        """The run that makes room for a new one: a finished run past its retention, else (evict_idle) the
        least recently active run `can_evict` allows; None: the new run is refused."""
        runs = list(self._runs.values())
        expired = next((run for run in runs if run.expired), None)
        if expired is not None or self._limits.at_max_runs != "evict_idle":
            return expired
        idle = [run for run in runs if not any(r.open_streams for r in run.ranks.values())]
        allowed = self._can_evict(idle) if self._can_evict is not None else idle
        return allowed[0] if allowed else None

    def _drop(self, run: RunState) -> None:
        del self._runs[run.run_id]
        self.ranks_total -= len(run.ranks) + len(run.restored_ranks)
        self.evicted_total += 1

    def _rank_for(self, run: RunState, hello: pb.Hello) -> RankState:
        state = run.ranks.get(hello.rank)
        if state is None:
            saved = run.restored_ranks.pop(hello.rank, None)  # back after a restart: its series continue
            self.ranks_total += saved is None
            if run.rings is None:
                run.rings = RingTable(RING_DTYPE, self._limits.ring_length)
            ring = run.rings.ring(hello.rank)
            if saved is not None:
                ring.refill(saved.ring.rows(), saved.ring.count)
            state = RankState(rank=hello.rank, ring=ring, schema=run.intern_schema(tuple(hello.schema.names)))
            if saved is not None:
                state.sessions = saved.sessions  # what was applied before the restart is not applied again
            run.ranks[hello.rank] = state
        return state


def _copied(state: RankState) -> RankState:
    """A shallow copy of a rank (see RunState.reader_copy for what stays shared)."""
    clone = object.__new__(RankState)
    clone.__dict__.update(state.__dict__)
    return clone
