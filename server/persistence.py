"""Keeps the run registry, the ranks, their recent series and the alerts in the database, and brings them back
after a restart, so every /api/v1 answer and every run-state gauge of /metrics reads as before it.

* `on_join(run)`: a Hello registered (or refreshed) a run: written at once.
* `on_alert(alert)`: an AlertBook listener; every fire and resolve transition is written at once.
* `checkpoint()`: every sweep, on the persist thread: for each run whose state moved, its record (the run's
  API view), the views of the ranks whose view changed beyond what moves with every report (a session, a
  goodbye, a connection, drops, a non-finite loss, the agent's cadence), the moving fields of every rank as one
  array (the `latest` part: step, loss, times, report count, pace, the session's applied seq), the report rows
  each rank appended since the last checkpoint, and, when they changed, its per-layer aggregates and global
  gradient norms; then every firing alert (ranks that joined it). A rank reporting every step costs its new
  rows and one row of the `latest` array, not a JSON view per checkpoint. The store's lock is held only to
  take reader copies and the new ring rows (O(ranks + new rows)); views and JSON are built after it is
  released, and everything is one transaction.
  Bounded: a rank's series keep its ring's length (limits.ring_length; older chunks pruned), ranks and
  parts live and die with their run's registry row.
* `restore()`: at start-up, before the server listens: incidents left `recording` become `interrupted`
  (they keep the window before their alert); the most recently seen runs (up to limits.max_runs)
  re-enter the store without live ranks: their saved rank views (every rank, paginated like a live run's;
  brought up to the `latest` part),
  each rank's latest values and report ring (RunState.restored_ranks, up to limits.max_ranks_total ranks)
  and layer aggregates answer until an agent is back; a rank that comes back continues its ring. The alerts
  that were firing re-open in the AlertBook with their original start time and provenance; resolved ones
  return to its history (so the API lists the same alerts as before the restart). A restored alert resolves
  like any other when its run finishes or expires, or when its detector fires and then clears again;
  detector history itself is not persisted, and neither are counters (they restart at 0, as Prometheus
  expects of a restarted process).
* Write failures (a full disk) are counted in `Database.write_errors` and logged once; ingestion goes on.
"""

from __future__ import annotations

import collections
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch.server.alerts import Alert, AlertBook
from gradwatch.server.database import Checkpoint, Database
from gradwatch.server.metrics import LAYER_COLUMNS
from gradwatch.server.ring import RecordRing
from gradwatch.server.store import GLOBAL_HISTORY, RING_DTYPE, RankState, RunState, RunStore, SchemaEntry
from gradwatch.server.views import rank_views, run_view

__all__ = ["StateKeeper"]

log = logging.getLogger(__name__)

#: The dtype of a global gradient norm row in the `global` part.
GLOBAL_DTYPE = np.dtype([("step", "<i8"), ("norm", "<f8")])
#: What moves in a rank's view with each report or heartbeat, saved for every rank of a run as one array (the
#: `latest` part; NaN: None) rather than in the rank's row, which is rewritten only when the rest of its view
#: changes (a session, a goodbye, a connection, drops...). `seq`: the highest applied seq of its session.
_MOVING = ("step", "last_report_at", "last_heartbeat_at", "last_finite_loss", "last_finite_loss_step", "grad_norm",
           "step_duration", "step_time_s", "pre_forward_s")  # fmt: skip
LATEST_DTYPE = np.dtype([("rank", "<i8"), ("seq", "<i8"), ("reports", "<i8"), *((f, "<f8") for f in _MOVING)])
_INTEGRAL = frozenset({"step", "last_finite_loss_step"})
_NO_SCHEMA = SchemaEntry((), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))


@dataclass
class _Saved:
    """What the database holds of one run, so a checkpoint writes only what moved."""

    progress: tuple[Any, ...] = ()
    ranks: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # rank -> key of its saved view
    counts: dict[int, int] = field(default_factory=dict)  # rank -> ring rows saved (its report count)
    parts: dict[str, Any] = field(default_factory=dict)  # part -> key of its saved body
    restored: bool = False  # its rank rows are those saved before the restart
    registry: tuple[Any, ...] = ()  # _registry() of the run as last written


@dataclass
class _Moved:
    """One run's share of a checkpoint, taken under the store's lock."""

    run: RunState  # a reader copy
    progress: tuple[Any, ...]
    ranks: dict[int, tuple[Any, ...]]  # moved ranks -> their keys
    sessions: dict[int, list[tuple[str, int]]]  # moved ranks -> their agent sessions and highest applied seq
    series: list[tuple[int, int, int, np.ndarray]]  # (rank, start, stop, rows)
    parts: dict[str, Any]  # moved parts -> their keys


class StateKeeper:
    """See the module docstring."""

    def __init__(self, database: Database, store: RunStore, alerts: AlertBook, *, ring_length: int = 1024) -> None:
        self._db = database
        self._store = store
        self._alerts = alerts
        self._ring_length = ring_length
        self._saved: dict[str, _Saved] = {}
        self._failing = False

    def restore(self, max_runs: int) -> tuple[int, int]:
        """Load runs and firing alerts; returns how many of each."""
        runs = self._db.runs(max_runs)
        for row in runs:
            self._restore_run(row)
        self._db.interrupt_recording()
        self._alerts.restore_history(self._db.alerts("resolved"))
        alerts = self._db.alerts("firing")
        restored = self._alerts.restore(alerts)
        return len(runs), restored

    def _restore_run(self, row: dict[str, Any]) -> None:
        run_id = row["run_id"]
        saved_ranks = self._db.run_ranks(run_id)
        parts = self._db.run_parts(run_id)
        if "latest" in parts:
            _with_latest(saved_ranks, parts["latest"])
        views = [r["view"] for r in saved_ranks]
        if views:
            row["summary"]["ranks"] = views
        series = self._db.run_series(run_id)
        ranks = {}
        for r in saved_ranks:
            try:
                rank = _rank_from_view(r["view"], series.get(r["view"]["rank"], []), self._ring_length)
                rank.sessions.update((str(sid), int(seq)) for sid, seq in r["sessions"])
            except (KeyError, TypeError, ValueError):  # written by a server of another version: listed, not read
                log.warning("run %r: a saved rank is unreadable; its gauges and series are left out", run_id)
                continue
            ranks[rank.rank] = rank
        run = self._store.restore(row, ranks)
        with self._store.lock:
            latest = row["summary"].get("global_grad_norm")
            if latest is not None:
                run.global_grad_norm, run.global_grad_norm_step = latest
            if "global" in parts:
                rows = np.frombuffer(parts["global"], dtype=GLOBAL_DTYPE)
                run.global_grad_norms = collections.deque(zip(rows["step"].tolist(), rows["norm"].tolist(),
                                                              strict=True), maxlen=GLOBAL_HISTORY)  # fmt: skip
            if "layers" in parts:
                _restore_layers(run, parts["layers"])
            counts = {n: s.ring.count for n, s in run.restored_ranks.items()}
            keys = {"global": _global_key(run)}
        self._saved[run_id] = _Saved(counts=counts, parts=keys, restored=True)

    def on_join(self, run: RunState) -> None:
        """Write the run's row when the Hello made it new or changed what the registry holds of it (job, world
        size, protocol, finish); another rank's Hello of a saved run is progress, written by the next checkpoint
        (a run of many ranks would otherwise write its whole view once per rank joining)."""
        saved = self._saved.get(run.run_id)
        with self._store.lock:
            registry = _registry(run)
            if saved is not None and saved.registry == registry:
                return
            record = _record(run)
            progress = _progress(run)
        if self._guard(self._db.put_run, record):
            saved = self._saved.setdefault(run.run_id, _Saved())
            saved.progress, saved.registry = progress, registry

    def on_alert(self, alert: Alert) -> None:
        self._guard(self._db.put_alert, alert)

    def checkpoint(self) -> None:
        with self._store.lock:
            runs = list(self._store.runs())
            moved = [m for m in (self._moved(run) for run in runs) if m is not None]
        live = {run.run_id for run in runs}
        batch = Checkpoint()
        for m in moved:
            self._add(batch, m)
        if batch and self._guard(self._db.checkpoint, batch):
            for m in moved:
                saved = self._saved.setdefault(m.run.run_id, _Saved())
                if saved.restored and m.run.restored_summary is None:
                    saved.restored, saved.ranks = False, {}
                saved.progress = m.progress
                saved.registry = _registry(m.run)
                saved.ranks.update(m.ranks)
                saved.counts.update((rank, stop) for rank, _, stop, _ in m.series)
                saved.parts.update(m.parts)
        # list(): a Hello on the ingest thread may add to _saved while this runs on the persist thread.
        for run_id in [r for r in list(self._saved) if r not in live]:  # evicted runs stay in the database
            self._saved.pop(run_id, None)
        for alert in self._alerts.export_firing():
            self._guard(self._db.put_alert, alert)

    def _moved(self, run: RunState) -> _Moved | None:
        """What moved in `run` since the last checkpoint (store lock held): keys, new ring rows, a reader copy."""
        saved = self._saved.get(run.run_id) or _Saved()
        progress = _progress(run)
        table = run.table
        groups, sizes = table.replica_group.tolist(), table.replica_group_size.tolist()
        keys = {n: _view_key(s, (groups[n], sizes[n]) if n < table.size else None) for n, s in run.ranks.items()}
        ranks = {n: k for n, k in keys.items() if saved.ranks.get(n) != k or saved.restored}
        sessions = {n: list(run.ranks[n].sessions.items()) for n in ranks}
        series = []
        counts = {n: state.ring.count for n, state in run.ranks.items()}
        for n, state in run.ranks.items():
            new = counts[n] - saved.counts.get(n, 0)
            if new > 0:
                rows = state.ring.last(new)
                series.append((n, counts[n] - len(rows), counts[n], rows))
        parts = {"layers": tuple(s.columns_step for s in run.ranks.values()), "global": _global_key(run),
                 "latest": (len(counts), sum(counts.values()),
                            sum(s.last_heartbeat_at or 0.0 for s in run.ranks.values()))}  # fmt: skip
        parts = {p: k for p, k in parts.items() if saved.parts.get(p) != k and not (p != "global" and not run.ranks)}
        if progress == saved.progress and not ranks and not series and not parts:
            return None
        return _Moved(run.reader_copy(), progress, ranks, sessions, series, parts)

    def _add(self, batch: Checkpoint, m: _Moved) -> None:
        """`m` as rows (off the store's lock: views, JSON and archives are built here)."""
        run, run_id = m.run, m.run.run_id
        saved = self._saved.get(run_id)
        if saved is not None and saved.restored and run.restored_summary is None:
            batch.forget.append(run_id)  # agents are back: the live ranks replace those saved before
        if m.progress != (saved.progress if saved else ()):
            batch.runs.append(_record(run))
        views = rank_views(run, [run.ranks[n] for n in sorted(m.ranks)])
        # With the view, the rank's sessions: an agent back after a restart is acknowledged what was applied.
        batch.ranks.extend((run_id, v["rank"], {"view": v, "sessions": m.sessions[v["rank"]]}) for v in views)
        batch.series.extend((run_id, n, start, stop, rows.tobytes()) for n, start, stop, rows in m.series)
        if "layers" in m.parts:
            batch.parts.append((run_id, "layers", _layers_archive(run)))
        if "global" in m.parts:
            rows = np.array(list(run.global_grad_norms), dtype=GLOBAL_DTYPE)
            batch.parts.append((run_id, "global", rows.tobytes()))
        if "latest" in m.parts:
            batch.parts.append((run_id, "latest", _latest(run).tobytes()))

    def _guard(self, write: Any, value: Any) -> bool:
        try:
            write(value)
        except Exception:
            self._db.write_errors += 1
            if not self._failing:
                self._failing = True
                log.exception("could not write to the database %s; further failures are counted", self._db.path)
            return False
        return True


def _registry(run: RunState) -> tuple[Any, ...]:
    """What a Hello can change of a run's row besides its progress."""
    return (run.job_name, run.world_size, run.protocol_version, run.finished_at, run.detector_settings is not None)


def _progress(run: RunState) -> tuple[Any, ...]:
    steps = tuple(sorted((r, s.last_step) for r, s in run.ranks.items()))
    triggers = sum(run.detector_triggers.values())  # a tick's finding (stalled) moves no step
    return (run.last_seen, run.finished_at, run.world_size, steps, triggers, len(run.events), run.global_grad_norm_step)


def _view_key(state: RankState, group: tuple[int, int] | None) -> tuple[Any, ...]:
    """Changes whenever the rank's view can, but for its moving fields (the `latest` part): a Hello, a Goodbye, a
    disconnect, drops, a non-finite loss, the agent's cadence. `group`: its replica group and size."""
    return (state.session_id, state.said_goodbye, state.open_streams > 0, tuple(state.dropped.items()),
            state.loss_non_finite, state.full_stats_interval, state.full_stats_interval_in_force, state.over_budget,
            len(state.schema.names), group)  # fmt: skip


def _latest(run: RunState) -> np.ndarray:
    """The moving fields of every rank of `run` (a reader copy), as LATEST_DTYPE rows by rank."""
    numbers = sorted(run.ranks)
    rows = np.zeros(len(numbers), dtype=LATEST_DTYPE)
    states = [run.ranks[n] for n in numbers]
    rows["rank"] = numbers
    rows["seq"] = [s.sessions.get(s.session_id, 0) for s in states]
    rows["reports"] = [s.ring.count for s in states]
    nan = float("nan")
    for field_name, attribute in (("step", "last_step"), ("last_report_at", "last_report_at"),
                                  ("last_heartbeat_at", "last_heartbeat_at"), ("last_finite_loss", "last_loss"),
                                  ("last_finite_loss_step", "last_finite_loss_step"), ("grad_norm", "last_grad_norm"),
                                  ("step_duration", "last_step_duration")):  # fmt: skip
        rows[field_name] = [nan if (v := getattr(s, attribute)) is None else v for s in states]
    table = run.table
    inside = rows["rank"] < table.size
    for field_name, medians in (("step_time_s", table.step_time()), ("pre_forward_s", table.pre_forward_time())):
        rows[field_name] = nan
        rows[field_name][inside] = medians[rows["rank"][inside]]
    return rows


def _with_latest(views: list[dict[str, Any]], latest: bytes) -> None:
    """Saved rank rows ({"view", "sessions"}) brought up to the `latest` part's moving fields (in place)."""
    rows = np.frombuffer(latest, dtype=LATEST_DTYPE) if len(latest) % LATEST_DTYPE.itemsize == 0 else None
    if rows is None:  # written by a server of another version
        return
    by_rank = {int(r): i for i, r in enumerate(rows["rank"].tolist())}
    for saved in views:
        view = saved["view"]
        at = by_rank.get(view.get("rank"))
        if at is None:
            continue
        row = rows[at]
        for name in _MOVING:
            if name in ("step_time_s", "pre_forward_s") and name not in view:
                continue  # a rank beyond the rank table has no timing
            value = float(row[name])
            view[name] = None if not math.isfinite(value) else int(value) if name in _INTEGRAL else value
        view["loss"] = view["last_finite_loss"] if view.get("loss_non_finite") is None else None
        view["reports"] = int(row["reports"])
        sessions = dict(saved.get("sessions", []))
        sid = view.get("session_id")
        if sid is not None and int(row["seq"]) > sessions.get(sid, 0):
            sessions[sid] = int(row["seq"])
            saved["sessions"] = [[k, v] for k, v in sessions.items()]


def _global_key(run: RunState) -> tuple[Any, ...]:
    norms = run.global_grad_norms
    return (len(norms), norms[-1] if norms else None)


def _record(run: RunState) -> dict[str, Any]:
    """A run row, from a reader copy or under the store lock. Its summary holds the run's API view without the
    live `firing` list and without its ranks (saved one row each), so a restored run answers as before."""
    view = run_view(run, [], max_ranks=0)
    del view["firing"], view["restored"], view["ranks"]
    summary: dict[str, Any] = {"step": view["step"], "loss": view["loss"], "view": view}
    if run.global_grad_norm is not None:
        summary["global_grad_norm"] = [run.global_grad_norm, run.global_grad_norm_step]
    if run.detector_settings is not None:
        summary["detector_settings"] = run.detector_settings  # fixed by the first Hello (server/limits.py)
    return {
        "run_id": run.run_id,
        "job_name": run.job_name,
        "world_size": run.world_size,
        "first_seen": run.first_seen,
        "last_seen": run.last_seen,
        "finished_at": run.finished_at,
        "protocol_version": run.protocol_version,
        "summary": summary,
    }


def _rank_from_view(view: dict[str, Any], chunks: list[tuple[int, int, bytes]], ring_length: int) -> RankState:
    """A restored rank: the latest values its saved view shows (what /metrics reads) and its report ring."""
    ring = RecordRing(RING_DTYPE, ring_length)
    rows, count = _assemble(chunks, ring_length)
    ring.refill(rows, count)
    return RankState(
        rank=view["rank"], ring=ring, schema=_NO_SCHEMA, session_id=view["session_id"], host=view["host"],
        pid=view["pid"], local_rank=view["local_rank"], agent_version=view["agent_version"],
        torch_version=view["torch_version"], device_kind=view["device_kind"],
        full_stats_interval=view["full_stats_interval"],
        full_stats_interval_in_force=view["full_stats_interval_in_force"], over_budget=view["over_budget"],
        last_step=view["step"], last_report_at=view["last_report_at"], last_loss=view["last_finite_loss"],
        last_finite_loss_step=view["last_finite_loss_step"], loss_non_finite=view["loss_non_finite"],
        last_grad_norm=view["grad_norm"], last_step_duration=view["step_duration"],
        said_goodbye=view["said_goodbye"], last_heartbeat_at=view["last_heartbeat_at"],
        dropped=dict(view["agent_dropped"]),
    )  # fmt: skip


def _assemble(chunks: list[tuple[int, int, bytes]], ring_length: int) -> tuple[np.ndarray, int]:
    """The latest `ring_length` rows of a rank's chunks (numbered by report count; a later chunk wins where two
    overlap) and its report count. Rows no chunk covers (a checkpoint that failed) are left out."""
    if not chunks:
        return np.zeros(0, dtype=RING_DTYPE), 0
    stop = max(c[1] for c in chunks)
    first = max(stop - ring_length, min(c[0] for c in chunks))
    rows = np.zeros(stop - first, dtype=RING_DTYPE)
    held = np.zeros(stop - first, dtype=bool)
    for start, end, data in chunks:
        part = np.frombuffer(data, dtype=RING_DTYPE)
        if part.size != end - start or end <= first:
            continue  # not rows of this layout (a server of another version wrote it)
        skip = max(0, first - start)
        rows[start + skip - first : end - first] = part[skip:]
        held[start + skip - first : end - first] = True
    return rows[held], stop


def _layers_archive(run: RunState) -> bytes:
    """The run's per-layer aggregates as /metrics exports them (names, then values and which layers reported)."""
    arrays: dict[str, np.ndarray] = {"names": np.array(run.layer_names, dtype=str)}
    for column in LAYER_COLUMNS:
        arrays[f"values_{column}"], arrays[f"seen_{column}"] = run.aggregate_layers(column)
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


def _restore_layers(run: RunState, archive: bytes) -> None:
    try:
        with np.load(io.BytesIO(archive), allow_pickle=False) as arrays:
            names = [str(n) for n in arrays["names"].tolist()]
            layers = {c: (arrays[f"values_{c}"], arrays[f"seen_{c}"]) for c in LAYER_COLUMNS if f"values_{c}" in arrays}
    except (OSError, ValueError, KeyError):
        log.warning("run %r: saved per-layer values unreadable; /metrics omits them until it reports", run.run_id)
        return
    run.layer_names = names
    run.layer_index = {name: i for i, name in enumerate(names)}
    run.restored_layers = layers
