"""Keeps the run registry and the alerts in the database, and brings them back after a restart.

* `on_join(run)`: a Hello registered (or refreshed) a run: written at once.
* `on_alert(alert)`: an AlertBook listener; every fire and resolve transition is written at once.
* `checkpoint()`: every sweep, runs whose state moved and every firing alert (ranks that joined it).
* `restore()`: at start-up, before the server listens: incidents left `recording` become `interrupted`
  (they keep the window before their alert); the most recently seen runs (up to
  limits.max_runs) re-enter the store without ranks (their agents reconnect and resume), and the
  alerts that were firing re-open in the AlertBook with their original start time and provenance;
  resolved ones return to its history (so the API lists the same alerts as before the restart).
  A restored alert resolves like any other when its run finishes or expires, or when its detector
  fires and then clears again; detector history itself is not persisted.
* Write failures (a full disk) are counted in `Database.write_errors` and logged once; ingestion goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from gradwatch.server.alerts import Alert, AlertBook
from gradwatch.server.database import Database
from gradwatch.server.store import RunState, RunStore
from gradwatch.server.views import run_view

__all__ = ["SAVED_RANKS", "StateKeeper"]

#: Ranks whose views a run's saved summary holds (a restored run of more ranks lists only these).
SAVED_RANKS = 64

log = logging.getLogger(__name__)


class StateKeeper:
    """See the module docstring."""

    def __init__(self, database: Database, store: RunStore, alerts: AlertBook) -> None:
        self._db = database
        self._store = store
        self._alerts = alerts
        self._saved: dict[str, tuple[Any, ...]] = {}
        self._failing = False

    def restore(self, max_runs: int) -> tuple[int, int]:
        """Load runs and firing alerts; returns how many of each."""
        runs = self._db.runs(max_runs)
        for row in runs:
            self._store.restore(row)
            self._saved[row["run_id"]] = ()
        self._db.interrupt_recording()
        self._alerts.restore_history(self._db.alerts("resolved"))
        alerts = self._db.alerts("firing")
        restored = self._alerts.restore(alerts)
        return len(runs), restored

    def on_join(self, run: RunState) -> None:
        with self._store.lock:
            record = _record(run)
        self._guard(self._db.put_run, record)
        self._saved[run.run_id] = _progress(run)

    def on_alert(self, alert: Alert) -> None:
        self._guard(self._db.put_alert, alert)

    def checkpoint(self) -> None:
        with self._store.lock:
            moved = [(run, _progress(run)) for run in self._store.runs()]
            live = {run.run_id for run, _ in moved}
            records = [(_record(run), progress) for run, progress in moved if self._saved.get(run.run_id) != progress]
        if records and self._guard(self._db.put_runs, [record for record, _ in records]):
            for record, progress in records:
                self._saved[record["run_id"]] = progress
        # list(): a Hello on the ingest thread may add to _saved while this runs on the persist thread.
        for run_id in [r for r in list(self._saved) if r not in live]:  # evicted runs stay in the database
            self._saved.pop(run_id, None)
        for alert in self._alerts.export_firing():
            self._guard(self._db.put_alert, alert)

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


def _progress(run: RunState) -> tuple[Any, ...]:
    steps = tuple(sorted((r, s.last_step) for r, s in run.ranks.items()))
    triggers = sum(run.detector_triggers.values())  # a tick's finding (stalled) moves no step
    return (run.last_seen, run.finished_at, run.world_size, steps, triggers, len(run.events))


def _record(run: RunState) -> dict[str, Any]:
    """A run row; call with the store lock held. Its summary holds the run's API view (without the live
    `firing` list), so a restored run answers as it did before the restart (views.run_view)."""
    view = run_view(run, [], max_ranks=SAVED_RANKS)
    del view["firing"], view["restored"]
    summary: dict[str, Any] = {"step": view["step"], "loss": view["loss"], "view": view}
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
