"""Alerts: one per (run, detector), merged across ranks, with a bounded history.

Contract
--------
* Identity is (run, detector): `fingerprint` is a stable digest of the pair (what
  notifications are keyed by, as Alertmanager groups by labels). Each episode (from
  fire to resolve) has its own `id`, a digest of the pair and its `started_at`, so
  a re-fire after resolution is a new row with a new id. At most one alert per
  identity is firing.
* `fire(run, spec, rank, Fire)`: the first firing rank opens the alert; its `step`,
  `layer` and `summary` say where it started (provenance) and never change. Later
  ranks join `ranks`; every Fire updates `last_step` (latest firing step) and `value`.
* `clear(run, detector, rank)`: the rank leaves the active set; when none is left,
  the alert resolves (`resolved_at` set) and moves to the bounded history.
* `resolve_run(run, why)`: resolves everything of a finished or evicted run.
* Alerts leave the book as `Alert`s: immutable snapshots whose one JSON form,
  `to_json()`, is what the API lists, webhooks receive and the database stores.
  Listeners get one on every fire and resolve transition (not on updates), called
  outside the book's lock; a failing listener is logged once and never breaks
  ingestion.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import hashlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradwatch.server.detectors.base import DetectorSpec, Fire

__all__ = ["STATE_FIRING", "STATE_RESOLVED", "Alert", "AlertBook", "AlertListener", "alert_id"]

log = logging.getLogger(__name__)

STATE_FIRING = "firing"
STATE_RESOLVED = "resolved"
STATES = (STATE_FIRING, STATE_RESOLVED)

AlertListener = Callable[["Alert"], None]
#: Ranks whose batch an alert keeps (autopsy): the first to fire are the ones that matter.
MAX_AUTOPSY_RANKS = 8


def alert_id(run: str, detector: str, started_at: float | None = None) -> str:
    """16 hex digits: the stable fingerprint of (run, detector), or with `started_at` the id of one episode."""
    episode = "" if started_at is None else f"\x00{started_at!r}"
    return hashlib.sha256(f"{run}\x00{detector}{episode}".encode()).hexdigest()[:16]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as the book last saw it (see the module docstring). `to_json()` is its one JSON form;
    `active` (ranks still firing, what persistence keeps), `restored` (re-opened at start-up, told to
    listeners) and `handed_over` (see AlertBook.hand_over) are not part of it."""

    id: str
    fingerprint: str
    run: str
    ranks: tuple[int, ...]
    detector: str
    severity: str
    state: str
    step: int
    last_step: int
    layer: str | None
    value: float | None
    summary: str
    started_at: float
    resolved_at: float | None
    runbook: str
    #: What the firing reports said about their batch (autopsy.py), by rank, JSON-safe dicts.
    autopsy: tuple[Mapping[str, Any], ...] = ()
    active: tuple[int, ...] = ()
    restored: bool = False
    #: Resolved here because the run moved to another replica (AlertBook.hand_over): no resolution is paged.
    handed_over: bool = False

    @property
    def firing(self) -> bool:
        return self.state == STATE_FIRING

    def to_json(self) -> dict[str, Any]:
        """The alert as the API lists it (key order included)."""
        return {
            "id": self.id,
            "fingerprint": self.fingerprint,
            "run": self.run,
            "ranks": list(self.ranks),
            "detector": self.detector,
            "severity": self.severity,
            "state": self.state,
            "step": self.step,
            "last_step": self.last_step,
            "layer": self.layer,
            "value": self.value,
            "summary": self.summary,
            "started_at": self.started_at,
            "resolved_at": self.resolved_at,
            "runbook": self.runbook,
            "autopsy": [dict(a) for a in self.autopsy],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Alert:
        """Inverse of `to_json` (plus `active`, as persistence stores it; default: every rank)."""
        ranks = tuple(int(r) for r in data["ranks"])
        return cls(
            id=data["id"], fingerprint=data.get("fingerprint") or alert_id(data["run"], data["detector"]),
            run=data["run"], ranks=ranks, detector=data["detector"], severity=data["severity"],
            state=data.get("state") or (STATE_FIRING if data.get("resolved_at") is None else STATE_RESOLVED),
            step=data["step"], last_step=data["last_step"], layer=data["layer"], value=data["value"],
            summary=data["summary"], started_at=data["started_at"], resolved_at=data.get("resolved_at"),
            runbook=data["runbook"], autopsy=tuple(a for a in data.get("autopsy") or () if isinstance(a, dict)),
            active=tuple(int(r) for r in data.get("active", ranks)),
        )  # fmt: skip


@dataclass
class _Alert:
    id: str
    run: str
    detector: str
    severity: str
    runbook: str
    step: int
    last_step: int
    layer: str | None
    value: float | None
    summary: str
    started_at: float
    ranks: set[int] = field(default_factory=set)
    active: set[int] = field(default_factory=set)
    resolved_at: float | None = None
    #: What the firing reports said about their batch, per rank (autopsy.py), when they said anything.
    autopsy: dict[int, dict[str, Any]] = field(default_factory=dict)

    def snapshot(self, *, restored: bool = False) -> Alert:
        return Alert(
            id=self.id,
            fingerprint=alert_id(self.run, self.detector),
            run=self.run,
            ranks=tuple(sorted(self.ranks)),
            detector=self.detector,
            severity=self.severity,
            state=STATE_FIRING if self.resolved_at is None else STATE_RESOLVED,
            step=self.step,
            last_step=self.last_step,
            layer=self.layer,
            value=_finite_or_none(self.value),
            summary=self.summary,
            started_at=self.started_at,
            resolved_at=self.resolved_at,
            runbook=self.runbook,
            autopsy=tuple(self.autopsy[rank] for rank in sorted(self.autopsy)),
            active=tuple(sorted(self.active)),
            restored=restored,
        )


class AlertBook:
    """Firing alerts by (run, detector) plus a bounded history of resolved ones."""

    def __init__(
        self, *, clock: Callable[[], float], history: int = 1000, runbook_url: Callable[[str], str] | None = None
    ) -> None:
        """`runbook_url(detector)`: the link alerts carry (the renderer's, so every link has one form);
        default: the runbook's path in the repository."""
        self._clock = clock
        self._runbook_url = runbook_url
        self._lock = threading.Lock()
        self._firing: dict[tuple[str, str], _Alert] = {}
        self._history: collections.deque[_Alert] = collections.deque(maxlen=history)
        self._listeners: list[AlertListener] = []
        self._broken_listeners: set[int] = set()

    def add_listener(self, listener: AlertListener) -> None:
        """Call `listener(alert)` on every fire and resolve transition."""
        with self._lock:
            self._listeners.append(listener)

    def fire(self, run: str, spec: DetectorSpec, rank: int, verdict: Fire,
             autopsy: dict[str, Any] | None = None) -> bool:  # fmt: skip
        """Record a Fire; returns True when `rank` newly joined the firing set (a trigger). `autopsy`: the
        batch of the report that made `rank` join (kept for the first MAX_AUTOPSY_RANKS ranks)."""
        with self._lock:
            key = (run, spec.name)
            alert = self._firing.get(key)
            opened = alert is None
            if alert is None:
                now = self._clock()
                alert = _Alert(
                    id=alert_id(run, spec.name, now),
                    run=run,
                    detector=spec.name,
                    severity=spec.severity,
                    runbook=self._runbook_url(spec.name) if self._runbook_url is not None else spec.runbook,
                    step=verdict.step,
                    last_step=verdict.step,
                    layer=verdict.layer,
                    value=verdict.value,
                    summary=verdict.summary,
                    started_at=now,
                )
                self._firing[key] = alert
            triggered = rank not in alert.active
            if autopsy is not None and triggered and len(alert.autopsy) < MAX_AUTOPSY_RANKS:
                alert.autopsy.setdefault(rank, autopsy)
            alert.ranks.add(rank)
            alert.active.add(rank)
            alert.last_step = max(alert.last_step, verdict.step)
            alert.value = verdict.value
            if alert.layer is None:
                alert.layer = verdict.layer
            snapshot = alert.snapshot() if opened else None
        if snapshot is not None:
            self._notify(snapshot)
        return triggered

    def clear(self, run: str, detector: str, rank: int) -> None:
        """The rank recovered; resolve the alert when no rank is left firing."""
        with self._lock:
            alert = self._firing.get((run, detector))
            if alert is None:
                return
            alert.active.discard(rank)
            snapshot = self._resolve_locked(alert) if not alert.active else None
        if snapshot is not None:
            self._notify(snapshot)

    def resolve_run(self, run: str, why: str) -> None:
        """Resolve every firing alert of `run` (finished or evicted), noting `why` in the summary."""
        with self._lock:
            snapshots = []
            for key in [k for k in self._firing if k[0] == run]:
                alert = self._firing[key]
                alert.summary = f"{alert.summary} (resolved: {why})"
                snapshots.append(self._resolve_locked(alert))
        for snapshot in snapshots:
            self._notify(snapshot)

    def hand_over(self, run: str) -> None:
        """The run moved to another replica (every rank left with its relay): end its firing alerts here without
        paging a resolution. Listeners hear a resolve marked `handed_over`; the notifier sends nothing
        for it, so the page the new owner keeps firing (same labels) is never closed by this replica."""
        with self._lock:
            snapshots = []
            for key in [k for k in self._firing if k[0] == run]:
                alert = self._firing[key]
                alert.summary = f"{alert.summary} (handed over: the run moved to another replica)"
                snapshots.append(dataclasses.replace(self._resolve_locked(alert), handed_over=True))
        for snapshot in snapshots:
            self._notify(snapshot)

    def list(self, run: str | None = None, state: str | None = None) -> list[Alert]:
        """Alerts, firing first (oldest first), then resolved (newest first)."""
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        with self._lock:
            alerts: list[_Alert] = []
            if state in (None, STATE_FIRING):
                alerts.extend(sorted(self._firing.values(), key=lambda a: a.started_at))
            if state in (None, STATE_RESOLVED):
                alerts.extend(reversed(self._history))
            return [a.snapshot() for a in alerts if run is None or a.run == run]

    def firing_alert(self, run: str, detector: str) -> Alert | None:
        """The firing alert (run, detector) as it is now, or None if it is not firing."""
        with self._lock:
            alert = self._firing.get((run, detector))
            return alert.snapshot() if alert is not None else None

    def firing_detectors(self) -> set[tuple[str, str]]:
        """(run, detector) pairs currently firing."""
        with self._lock:
            return set(self._firing)

    def firing_severities(self) -> dict[str, set[str]]:
        """Run -> the severities of its firing alerts (runs without one are absent)."""
        out: dict[str, set[str]] = {}
        with self._lock:
            for alert in self._firing.values():
                out.setdefault(alert.run, set()).add(alert.severity)
        return out

    def export_firing(self) -> builtins.list[Alert]:
        """Firing alerts with their still-active ranks (`active`), for persistence."""
        with self._lock:
            return [a.snapshot() for a in self._firing.values()]

    def restore(self, alerts: Iterable[Alert]) -> int:
        """Re-open alerts that were firing before a restart (as from `export_firing`), keeping their id,
        start, provenance and ranks. Listeners hear each as a fire transition marked `restored`.
        Alerts already firing are left alone. Returns how many were restored."""
        opened = []
        with self._lock:
            for saved in alerts:
                key = (saved.run, saved.detector)
                if key in self._firing:
                    continue
                alert = _Alert(
                    id=saved.id, run=saved.run, detector=saved.detector, severity=saved.severity,
                    runbook=saved.runbook, step=saved.step, last_step=saved.last_step, layer=saved.layer,
                    value=saved.value, summary=saved.summary, started_at=saved.started_at,
                    ranks=set(saved.ranks), active=set(saved.active),
                    autopsy={int(a.get("rank", 0)): dict(a) for a in saved.autopsy},
                )  # fmt: skip
                self._firing[key] = alert
                opened.append(alert.snapshot(restored=True))
        for snapshot in opened:
            self._notify(snapshot)
        return len(opened)

    def restore_history(self, alerts: Iterable[Alert]) -> int:
        """Put resolved alerts saved before a restart back into the history (oldest resolution first; the
        history's bound keeps the newest). Listeners hear nothing: these transitions were announced already."""
        restored = sorted((a for a in alerts if a.resolved_at is not None), key=lambda a: a.resolved_at or 0.0)
        with self._lock:
            known = {a.id for a in self._history}
            for saved in restored:
                if saved.id in known:
                    continue
                alert = _Alert(
                    id=saved.id, run=saved.run, detector=saved.detector, severity=saved.severity,
                    runbook=saved.runbook, step=saved.step, last_step=saved.last_step, layer=saved.layer,
                    value=saved.value, summary=saved.summary, started_at=saved.started_at,
                    ranks=set(saved.ranks), resolved_at=saved.resolved_at,
                )  # fmt: skip
                self._history.append(alert)
        return len(restored)

    def _resolve_locked(self, alert: _Alert) -> Alert:
        alert.active.clear()
        alert.resolved_at = self._clock()
        del self._firing[(alert.run, alert.detector)]
        self._history.append(alert)
        return alert.snapshot()

    def _notify(self, snapshot: Alert) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:
                # A broken listener (e.g. a closed terminal) must not stop ingestion; say so once.
                if id(listener) not in self._broken_listeners:
                    self._broken_listeners.add(id(listener))
                    log.exception("alert listener %r failed; further failures are not logged", listener)
