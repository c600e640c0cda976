"""The flight recorder: a bounded window of recent reports per rank, frozen into an incident when an alert fires.

Contract
--------
* `observe()` is called for every applied report, before the detectors judge it, so the
  report that fires an alert is the last one of the incident's "before" window. Each
  rank keeps the last `window_reports + after_reports` reports: scalar rows in a
  fixed numpy ring, and, for full-statistics steps within that window, copies of the
  per-layer and per-module columns incidents use (LAYER_COLUMNS, ACTIVATION_COLUMNS),
  capped to `max_layers`: copies, so a kept slice never pins the frame's whole column.
  Gradient histograms (32 bins per layer, most of the bytes) stay only on the latest
  `histogram_reports` full reports and on those after an alert, as the archive uses
  them. The bytes kept (`kept_bytes`, exact: every array owns its memory) share
  `max_bytes` over all ranks: each rank keeps at most its share (at least its latest
  full report); the scalar rows are always kept for the whole window.
  An incident holds the full-statistics reports inside its window and, when fewer
  than FULL_REPORTS_BEFORE precede the alert there (an overhead budget stretched the
  cadence), the latest older ones: the FULL_REPORTS_BEFORE newest entries are kept even
  when they are older than the window, so its per-layer plots always reach back before
  the alert.
* `on_alert()` (an AlertBook listener) opens an incident when an alert fires at
  warning or critical severity: the window of up to `max_ranks` ranks (the firing
  rank first) is written at once (status "recording"), so a crash right after the
  alert still leaves the window before it. The incident closes (status "complete",
  rewritten with the reports after the alert) once the firing rank has sent
  `after_reports` more, after `after_timeout_s`, when the run leaves the store, or at
  shutdown.
* The window is one `.npz` archive (incident_window.py, `WINDOW_ARRAYS`); the incident
  body is a JSON dict with the alert, the run's metadata, the ranks' identities and layer
  names, the detector's explanation, the runbook link and a provenance chain (what went
  wrong first, where, in step order: provenance.py). The writer thread packs and stores
  both; incident_metrics.py exports the counters.
* Runs on the ingest thread: work per report is a ring append and a dict of views;
  an incident write is one SQLite statement with a compressed archive of the window.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.server.alerts import Alert, AlertBook
from gradwatch.server.config import RecorderConfig
from gradwatch.server.database import Database
from gradwatch.server.detectors import DetectorSpec
from gradwatch.server.incident_window import FULL_REPORTS_BEFORE, RankPart, pack_window, window_entries
from gradwatch.server.provenance import layer_onset, provenance_chain
from gradwatch.server.report import RankReport
from gradwatch.server.ring import RingTable, TableRing, occurrences
from gradwatch.server.store import RING_DTYPE, RankState, RunState, RunStore
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = [
    "ACTIVATION_COLUMNS",
    "LAYER_COLUMNS",
    "RECORDED_SEVERITIES",
    "ROW_DTYPE",
    "FlightRecorder",
    "incident_id",
]

log = logging.getLogger(__name__)

RECORDED_SEVERITIES = ("warning", "critical")
#: LayerStats columns kept in the window (the ones the report plots and the provenance chain use).
LAYER_COLUMNS = ("grad_norm", "grad_max_abs", "grad_non_finite", "weight_norm", "update_ratio", "grad_log2_histogram")
#: ActivationStats columns kept in the window.
ACTIVATION_COLUMNS = ("mean", "std", "non_finite", "zero_fraction", "dead_fraction", "saturated_fraction")
#: One scalar row per report: the store's ring row (RING_DTYPE), numbered by `index` (a rank's reports since the
#: server started).
ROW_DTYPE = np.dtype([("index", "<i8"), *RING_DTYPE.descr])
#: Incidents recording at once; opening another closes the oldest first.
MAX_RECORDING = 32
#: Incident writes waiting for the writer thread; beyond, new ones are dropped (counted).
MAX_PENDING_WRITES = 64


def incident_id(alert_id: str, started_at: float) -> str:
    """Stable 12-hex-digit id of the alert occurrence (alert id and start time)."""
    return hashlib.sha256(f"{alert_id}\x00{started_at!r}".encode()).hexdigest()[:12]


@dataclass(slots=True)
class _RankWindow:
    #: The rank's row of its run's RingTable; `count` (rows appended in all) is its count.
    rows: TableRing
    # The layer dict is the entry's own (histograms are stripped from it in place); the module dict may be shared.
    columns: collections.deque[tuple[int, int, dict[str, np.ndarray], Mapping[str, np.ndarray]]]
    layer_names: tuple[str, ...] = ()
    session_id: str = ""
    module_names: tuple[str, ...] = ()
    #: Bytes of the arrays in `columns` (each owns its memory).
    bytes: int = 0

    @property
    def count(self) -> int:
        return self.rows.count


@dataclass
class _Recording:
    id: str
    alert: Alert
    opened_at: float
    deadline: float
    fired_rank: int
    ranks: list[int]
    start: dict[int, int]
    body: dict[str, Any] = field(default_factory=dict)


class FlightRecorder:
    """See the module docstring."""

    def __init__(
        self,
        config: RecorderConfig,
        database: Database,
        store: RunStore,
        alerts: AlertBook,
        *,
        specs: tuple[DetectorSpec, ...],
        runbook_url: Callable[[str], str],
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._db = database
        self._store = store
        self._alerts = alerts
        self._specs = {spec.name: spec for spec in specs}
        self._runbook_url = runbook_url
        self._clock = clock
        self._lock = threading.RLock()
        self._windows: dict[str, dict[int, _RankWindow]] = {}
        #: run -> its ranks' window rows (one RingTable per run, so a batch of rows is one scatter).
        self._tables: dict[str, RingTable] = {}
        self._ranks_total = 0  # ranks with a window, all runs
        self._bytes = 0  # column bytes kept, all windows (see kept_bytes)
        self._since_scan = 0  # full reports since every window was last trimmed to its share
        self._recording: collections.OrderedDict[str, _Recording] = collections.OrderedDict()
        #: Incidents opened and closed since start, and ones not recorded by reason.
        self.opened = 0
        self.closed = 0
        self.dropped: dict[str, int] = {"write_failed": 0, "write_queue_full": 0, "no_window": 0, "observe_failed": 0}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=MAX_PENDING_WRITES)
        self._writer = threading.Thread(target=self._write_forever, name="gradwatch-recorder", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ ingest side

    def observe(self, run: RunState, rank: RankState, report: RankReport, msg: pb.StepReport, hello: pb.Hello) -> None:
        """Append one applied report to its rank's window (see the module docstring). Never raises: a recorder
        bug must not stop ingestion (counted in dropped["observe_failed"], logged once)."""
        try:
            self._observe(run, rank, report, hello)
        except Exception:
            self.dropped["observe_failed"] += 1
            if self.dropped["observe_failed"] == 1:
                log.exception("flight recorder failed on a report; further failures are counted")

    def observe_rows(self, run: RunState, ranks: np.ndarray, states: Sequence[RankState] | np.ndarray,
                     sessions: Sequence[Any] | np.ndarray, rows: np.ndarray) -> None:  # fmt: skip
        """`observe` for compact reports without columns (the aggregator's batch path for relayed reports):
        `rows[i]` (RING_DTYPE) of rank `ranks[i]` (`states[i]`), whose ingest Session is `sessions[i]`, in arrival
        order, appended to the rank windows with one scatter. Never raises (counted like `observe`)."""
        try:
            with self._lock:
                windows = self._windows.setdefault(run.run_id, {})
                for state, session in zip(states, sessions, strict=True):
                    window = windows.get(state.rank)
                    if window is None or window.session_id != session.hello.session_id:
                        self._window(run, state, session.hello, session.schema.names)
                table = self._tables[run.run_id]
                out = np.empty(len(rows), dtype=ROW_DTYPE)
                out["index"] = table.count[ranks] + occurrences(ranks)[0]
                for name in rows.dtype.names or ():
                    out[name] = rows[name]
                table.append_many(ranks, out)
                if self._recording:
                    for state in states:
                        self._closing(run, state, windows[state.rank])
        except Exception:
            self.dropped["observe_failed"] += 1
            if self.dropped["observe_failed"] == 1:
                log.exception("flight recorder failed on a report; further failures are counted")

    def _window(self, run: RunState, rank: RankState, hello: pb.Hello, layer_names: tuple[str, ...]) -> _RankWindow:
        cfg = self._config
        windows = self._windows.setdefault(run.run_id, {})
        window = windows.get(rank.rank)
        if window is None:
            length = cfg.window_reports + cfg.after_reports
            self._ranks_total += 1
            table = self._tables.setdefault(run.run_id, RingTable(ROW_DTYPE, length))
            window = windows[rank.rank] = _RankWindow(table.ring(rank.rank), collections.deque(maxlen=length))
        if window.session_id != hello.session_id:  # names are re-read once per agent session, not per report
            window.session_id = hello.session_id
            window.layer_names = layer_names[: cfg.max_layers]
            window.module_names = tuple(hello.activation_schema.names[: cfg.max_layers])
        return window

    def _closing(self, run: RunState, rank: RankState, window: _RankWindow) -> None:
        """Close the recordings whose fired rank has sent its `after_reports` reports since."""
        for recording in [r for r in self._recording.values() if r.alert.run == run.run_id]:
            if (
                rank.rank == recording.fired_rank
                and window.count - recording.start[rank.rank] >= self._config.after_reports
            ):
                self._close(recording)

    def _observe(self, run: RunState, rank: RankState, report: RankReport, hello: pb.Hello) -> None:
        cfg = self._config
        with self._lock:
            window = self._window(run, rank, hello, report.layer_names)
            loss = math.nan if report.loss is None else report.loss
            index = window.count
            # Copies: a slice would keep the frame's whole column (up to 65,536 layers) alive.
            columns, acts = report.columns, report.activations  # decoded once, by build_report
            layers = {n: columns[n][: cfg.max_layers].copy() for n in LAYER_COLUMNS if n in columns} if columns else {}
            modules = {n: acts[n][: cfg.max_layers].copy() for n in ACTIVATION_COLUMNS if n in acts} if acts else {}
            if layers or modules:
                window.columns.append((index, report.step, layers, modules))
                window.bytes += _entry_bytes(layers, modules)
                self._bytes += _entry_bytes(layers, modules)
                self._trim(run.run_id, rank.rank, window)
            # Appended last: its count (the window's) still names this report while the entries are trimmed.
            window.rows.append((index, report.step, report.wall_time, report.received_at, loss, report.grad_norm,
                                report.step_duration_s, report.non_finite_flags))  # fmt: skip
            if self._recording:  # the common case has no incident being recorded
                self._closing(run, rank, window)

    def _trim(self, run_id: str, rank: int, window: _RankWindow) -> None:
        """Keep what incidents use, within the rank's share of `max_bytes` (see the module docstring)."""
        cfg = self._config
        oldest = window.count - (cfg.window_reports + cfg.after_reports)  # entries at or before it are outside
        share = cfg.max_bytes // self._ranks_total
        after = min((r.start[rank] for r in self._recording.values() if r.alert.run == run_id and rank in r.start),
                    default=window.count + 1)  # fmt: skip
        # Entries are in report order: the first `before` precede any alert being recorded. Outside the window,
        # the latest FULL_REPORTS_BEFORE of them still serve an incident (see _entries).
        before = sum(1 for entry in window.columns if entry[0] < after)
        while window.columns and (
            (window.columns[0][0] <= oldest and before > FULL_REPORTS_BEFORE)
            or (len(window.columns) > 1 and window.bytes > share)
        ):
            before -= window.columns[0][0] < after
            self._drop(window, window.columns.popleft())
        # Histograms of full reports before any alert other than its latest `histogram_reports`: never archived.
        for i in range(before - cfg.histogram_reports - 1, -1, -1):
            entry = window.columns[i]
            hist = entry[2].get("grad_log2_histogram")
            if hist is None:
                continue  # stripped by an earlier call, or a report without one
            del entry[2]["grad_log2_histogram"]
            window.bytes -= hist.nbytes
            self._bytes -= hist.nbytes
        self._since_scan += 1
        # Ranks joined since the others last trimmed: bring every rank to its share. At most once per
        # `ranks` full reports (O(1) amortised, even when every rank's latest entry alone is over its share);
        # ranks that report trim themselves above.
        if self._bytes > cfg.max_bytes and self._since_scan >= self._ranks_total:
            self._since_scan = 0
            for windows in self._windows.values():
                for other in windows.values():
                    while len(other.columns) > 1 and other.bytes > share:
                        self._drop(other, other.columns.popleft())

    def _drop(self, window: _RankWindow, entry: tuple[int, int, dict[str, np.ndarray], Mapping[str, np.ndarray]]
              ) -> None:  # fmt: skip
        size = _entry_bytes(entry[2], entry[3])
        window.bytes -= size
        self._bytes -= size

    def kept_bytes(self) -> int:
        """Bytes of per-layer and per-module columns the recorder keeps alive (all of them: no views)."""
        with self._lock:
            return self._bytes

    def on_alert(self, alert: Alert) -> None:
        """AlertBook listener: open an incident for a warning or critical alert that starts firing."""
        if not self._config.enabled or not alert.firing or alert.restored:
            return
        if alert.severity not in RECORDED_SEVERITIES:
            return
        with self._lock:
            windows = self._windows.get(alert.run, {})
            if not windows:
                self.dropped["no_window"] += 1
                return
            fired = alert.ranks[0] if alert.ranks and alert.ranks[0] in windows else min(windows)
            others = sorted(r for r in windows if r != fired)[: self._config.max_ranks - 1]
            now = self._clock()
            recording = _Recording(
                id=incident_id(alert.id, alert.started_at),
                alert=alert,
                opened_at=now,
                deadline=now + self._config.after_timeout_s,
                fired_rank=fired,
                ranks=[fired, *others],
                start={r: windows[r].count for r in (fired, *others)},
            )
            while len(self._recording) >= MAX_RECORDING:
                self._close(next(iter(self._recording.values())))
            self._recording[recording.id] = recording
            self.opened += 1
            if self._config.after_reports == 0:
                self._close(recording)
            else:
                self._write(recording, "recording")

    def sweep(self) -> None:
        """Close incidents past their deadline or whose run left the store; forget windows of gone runs."""
        now = self._clock()
        with self._lock, self._store.lock:
            live = {run.run_id for run in self._store.runs() if not run.expired}
            for recording in list(self._recording.values()):
                if now >= recording.deadline or recording.alert.run not in live:
                    self._close(recording)
            for run_id in [r for r in self._windows if r not in live]:
                gone = self._windows.pop(run_id)
                self._tables.pop(run_id, None)
                self._ranks_total -= len(gone)
                self._bytes -= sum(window.bytes for window in gone.values())

    def close_all(self, timeout_s: float = 30.0) -> None:
        """Close every incident still recording and wait for the writes (shutdown)."""
        with self._lock:
            for recording in list(self._recording.values()):
                self._close(recording)
        self.flush(timeout_s)

    def recording(self) -> int:
        with self._lock:
            return len(self._recording)

    # ------------------------------------------------------------------ internals

    def _close(self, recording: _Recording) -> None:
        self._recording.pop(recording.id, None)
        self._write(recording, "complete")
        self.closed += 1

    def _write(self, recording: _Recording, status: str) -> None:
        """Snapshot the window here (references and a copy of the scalar rows); pack and store it on the
        writer thread, so a large window never holds up ingestion."""
        try:
            parts, body = self._snapshot(recording)
        except Exception:
            self.dropped["write_failed"] += 1
            log.exception("could not snapshot incident %s", recording.id)
            return
        body["status"] = status
        body["closed_at"] = self._clock() if status == "complete" else None
        try:
            self._queue.put_nowait((parts, body))
        except queue.Full:
            self.dropped["write_queue_full"] += 1

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued incident write is stored; False on timeout."""
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout_s)
        except queue.Full:
            return False
        return done.wait(timeout_s)

    def _write_forever(self) -> None:
        while True:
            job = self._queue.get()
            if isinstance(job, threading.Event):
                job.set()
                continue
            parts, body = job
            try:
                self._db.put_incident(body, pack_window(parts, self._config.histogram_reports))
            except Exception:
                # A full disk must not stop the server: count, log.
                self.dropped["write_failed"] += 1
                self._db.write_errors += 1
                log.exception("could not store incident %s", body["id"])

    def _snapshot(self, recording: _Recording) -> tuple[list[RankPart], dict[str, Any]]:
        cfg, alert = self._config, recording.alert
        windows = self._windows.get(alert.run, {})
        parts: list[RankPart] = []
        ranks_meta: list[dict[str, Any]] = []
        all_rows: list[tuple[int, np.ndarray]] = []
        onsets: list[dict[str, Any]] = []
        for rank in recording.ranks:
            window = windows.get(rank)
            if window is None:
                continue
            start = recording.start[rank]
            lo, hi = start - cfg.window_reports, start + min(window.count - start, cfg.after_reports)
            rows = window.rows.rows()
            rows = rows[(rows["index"] >= lo) & (rows["index"] < hi)]
            # The entries' dicts are copied: the ingest thread strips histograms from them while the writer packs.
            entries = [(e[0], e[1], dict(e[2]), dict(e[3])) for e in window_entries(window.columns, lo, hi, start)]
            parts.append(RankPart(rank, rows, entries, start))
            all_rows.append((rank, rows))
            before = int((rows["index"] < start).sum())
            ranks_meta.append(self._rank_meta(alert.run, rank, window, before, len(rows)))
            onset = layer_onset(rank, parts[-1].entries, window.layer_names, alert.step)
            if onset is not None:
                onsets.append(onset)
        return parts, self._body(recording, ranks_meta, all_rows, onsets)

    def _rank_meta(self, run_id: str, rank: int, window: _RankWindow, before: int, total: int) -> dict[str, Any]:
        with self._store.lock:
            run = self._store.get(run_id)
            state = run.ranks.get(rank) if run is not None else None
            identity = {
                "host": state.host if state else "",
                "pid": state.pid if state else 0,
                "agent_version": state.agent_version if state else "",
                "torch_version": state.torch_version if state else "",
                "device_kind": state.device_kind if state else "",
            }
        return {
            "rank": rank,
            **identity,
            "layers": list(window.layer_names),
            "modules": list(window.module_names),
            "reports_before": before,
            "reports_after": total - before,
        }

    def _body(
        self,
        recording: _Recording,
        ranks: list[dict[str, Any]],
        rows: list[tuple[int, np.ndarray]],
        onsets: list[dict[str, Any]],
    ) -> dict[str, Any]:
        alert = recording.alert
        with self._store.lock:
            run = self._store.get(alert.run)
            job, world = (run.job_name, run.world_size) if run is not None else ("", 0)
        steps = [int(r["step"].min()) for _, r in rows if len(r)] + [int(r["step"].max()) for _, r in rows if len(r)]
        spec = self._specs.get(alert.detector)
        return {
            "id": recording.id,
            "run": alert.run,
            "job_name": job,
            "world_size": world,
            "alert_id": alert.id,
            "alert": alert.to_json(),
            "detector": alert.detector,
            "severity": alert.severity,
            "summary": alert.summary,
            "autopsy": [dict(a) for a in alert.autopsy],
            "step": alert.step,
            "layer": alert.layer,
            "ranks_firing": list(alert.ranks),
            "fired_rank": recording.fired_rank,
            "opened_at": recording.opened_at,
            "description": spec.description if spec is not None else "",
            "runbook_url": self._runbook_url(alert.detector),
            "provenance": provenance_chain(alert, rows, onsets, self._alerts.list(run=alert.run)),
            "ranks": ranks,
            "window": {
                "before": self._config.window_reports,
                "after": self._config.after_reports,
                "steps": [min(steps), max(steps)] if steps else None,
            },
        }


def _entry_bytes(layers: Mapping[str, np.ndarray], modules: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in layers.values()) + sum(a.nbytes for a in modules.values())
