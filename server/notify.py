"""The notifier: turns alert transitions into notifications for every sink, Alertmanager-style.

Contract
--------
* It listens to the AlertBook (`on_alert`, called on the ingest thread): it only
  updates its own state and hands notifications to the sink workers, which never
  block, so ingestion never waits on a sink.
* Life cycle, per alert (identity = the book's id; labels fixed at the first fire):
  - A firing alert is notified at once, unless muted. `startsAt` is the alert's
    `started_at` and never changes; `endsAt` is now + 4 × `resend_interval_s`, and the
    alert is re-sent (with fresh annotations) every `resend_interval_s` while it fires,
    so an Alertmanager that lost it gets it back and one that stops hearing from us
    resolves it by itself.
  - A resolved alert that was notified is sent once more with endsAt = resolved_at
    (≤ now): that is how Alertmanager learns it resolved. One never notified is dropped.
* Muting applies to alerts not yet notified: an alert is *inhibited* while another
  alert of the same run fires whose detector lists it in `inhibitions`, and *silenced*
  while a silence covers it. A muted alert is notified as soon as nothing mutes it
  any more (checked on every transition and every tick), if it still fires. An alert
  already notified keeps its life cycle: a page that went out is resolved properly.
* Deduplication: one notification per alert and transition (plus resends), however
  many ranks fire it; the sink workers coalesce per fingerprint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.alerts import Alert, AlertBook
from gradwatch.server.render import AlertRenderer
from gradwatch.server.silences import SilenceBook
from gradwatch.server.sinks.base import STATUS_FIRING, STATUS_RESOLVED, Notification
from gradwatch.server.sinks.worker import OUTCOMES, SinkWorker

__all__ = ["ENDS_AT_RESENDS", "MUTE_REASONS", "Notifier", "NotifierCollector"]

#: endsAt of a firing alert lies this many resend intervals ahead (Alertmanager's advice).
ENDS_AT_RESENDS = 4
MUTE_REASONS = ("inhibited", "silenced")


@dataclass
class _Tracked:
    alert: Alert
    labels: dict[str, str]
    notified: bool = False
    last_sent: float = 0.0
    inhibited_by: str | None = None
    silenced_by: tuple[str, ...] = ()


class Notifier:
    """See the module docstring. `start()` launches the sink workers and the resend ticker."""

    def __init__(
        self,
        book: AlertBook,
        silences: SilenceBook,
        renderer: AlertRenderer,
        workers: Sequence[SinkWorker],
        *,
        resend_interval_s: float,
        inhibitions: Mapping[str, frozenset[str]],
        clock: Callable[[], float],
    ) -> None:
        self._book = book
        self._silences = silences
        self._renderer = renderer
        self.workers = tuple(workers)
        self._resend_s = resend_interval_s
        self._inhibitions = dict(inhibitions)
        self._clock = clock
        self._lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        for worker in self.workers:
            worker.start()
        self._ticker = threading.Thread(target=self._tick_forever, name="gradwatch-notify", daemon=True)
        self._ticker.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop resending; give the workers `timeout_s` to deliver what is pending. Firing alerts are
        not resolved: Alertmanager keeps them until their endsAt, so a restarted server takes over."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout_s)
        for worker in self.workers:
            worker.stop(timeout_s)

    def on_alert(self, alert: Alert) -> None:
        """AlertBook listener: a fire or resolve transition."""
        with self._lock:
            now = self._clock()
            if alert.firing:
                self._tracked[alert.id] = _Tracked(alert=alert, labels=self._renderer.labels(alert))
            else:
                tracked = self._tracked.pop(alert.id, None)
                # Handed over (AlertBook.hand_over): the run's new replica pages it now; a resolve would close it.
                if tracked is not None and tracked.notified and not alert.handed_over:
                    ends_at = min(alert.resolved_at or now, now)
                    self._submit([self._notification(tracked, alert, STATUS_RESOLVED, ends_at)])
            self._evaluate_locked(now)

    def tick(self) -> None:
        """Resend what is due and release alerts no longer muted (the ticker calls this)."""
        with self._lock:
            self._evaluate_locked(self._clock())

    def view(self) -> list[dict[str, Any]]:
        """Notification state of every firing alert, for /api/v1/notifications."""
        with self._lock:
            return [
                {
                    "id": alert_id,
                    "run": t.alert.run,
                    "detector": t.alert.detector,
                    "labels": dict(t.labels),
                    "notified": t.notified,
                    "last_sent_at": t.last_sent if t.notified else None,
                    "inhibited_by": t.inhibited_by,
                    "silenced_by": list(t.silenced_by),
                }
                for alert_id, t in self._tracked.items()
            ]

    def muted_counts(self) -> dict[str, int]:
        """Firing alerts held back now, by reason (an alert both inhibited and silenced counts as inhibited)."""
        with self._lock:
            counts = dict.fromkeys(MUTE_REASONS, 0)
            for t in self._tracked.values():
                if not t.notified and t.inhibited_by is not None:
                    counts["inhibited"] += 1
                elif not t.notified and t.silenced_by:
                    counts["silenced"] += 1
            return counts

    # ------------------------------------------------------------------ internals

    def _tick_forever(self) -> None:
        interval = min(1.0, self._resend_s / 4)
        while not self._stop.wait(interval):
            self.tick()

    def _evaluate_locked(self, now: float) -> None:
        firing = {(t.alert.run, t.alert.detector) for t in self._tracked.values()}
        due: list[Notification] = []
        for t in self._tracked.values():
            run, detector = t.alert.run, t.alert.detector
            if t.notified:
                if now - t.last_sent < self._resend_s:
                    continue
                t.alert = self._book.firing_alert(run, detector) or t.alert
            else:
                t.inhibited_by = self._inhibitor(run, detector, firing)
                t.silenced_by = tuple(self._silences.matching(run, detector))
                if t.inhibited_by is not None or t.silenced_by:
                    continue
            t.notified, t.last_sent = True, now
            due.append(self._notification(t, t.alert, STATUS_FIRING, now + ENDS_AT_RESENDS * self._resend_s))
        self._submit(due)

    def _inhibitor(self, run: str, detector: str, firing: set[tuple[str, str]]) -> str | None:
        for source, targets in self._inhibitions.items():
            if detector in targets and (run, source) in firing:
                return source
        return None

    def _notification(self, t: _Tracked, alert: Alert, status: str, ends_at: float) -> Notification:
        return Notification(
            fingerprint=alert.fingerprint,
            status=status,
            labels=t.labels,
            annotations=self._renderer.annotations(alert),
            starts_at=t.alert.started_at,
            ends_at=ends_at,
            generator_url=self._renderer.generator_url(alert),
        )

    def _submit(self, notifications: Iterable[Notification]) -> None:
        batch = list(notifications)
        if batch:
            for worker in self.workers:
                worker.submit(batch)


class NotifierCollector(Collector):
    """gradwatch_alert_* families of the notifier and its sinks, built per scrape."""

    def __init__(self, notifier: Notifier, silences: SilenceBook) -> None:
        self._notifier = notifier
        self._silences = silences

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        sent = CounterMetricFamily(
            "gradwatch_alert_notifications_total",
            "Notifications by sink and outcome (sent, retried, failed, dropped).",
            labels=["sink", "outcome"],
        )
        pending = GaugeMetricFamily(
            "gradwatch_alert_notifications_pending", "Notifications waiting for delivery, by sink.", labels=["sink"]
        )
        up = GaugeMetricFamily(
            "gradwatch_alert_sink_up", "1 unless the sink's latest delivery attempt failed.", labels=["sink"]
        )
        for worker in self._notifier.workers:
            snap = worker.snapshot()
            for outcome in OUTCOMES:
                sent.add_metric([snap.name, outcome], snap.outcomes[outcome])
            pending.add_metric([snap.name], snap.pending)
            up.add_metric([snap.name], 1 if snap.healthy else 0)
        muted = GaugeMetricFamily(
            "gradwatch_alerts_muted",
            "Firing alerts not notified because of inhibition or a silence.",
            labels=["reason"],
        )
        for reason, n in self._notifier.muted_counts().items():
            muted.add_metric([reason], n)
        yield from (sent, pending, up, muted)
        yield GaugeMetricFamily("gradwatch_silences_active", "Active silences.", value=self._silences.active_count())
        synced = CounterMetricFamily(
            "gradwatch_silences_synced_total",
            "Silences changed here by the resync with the other replicas, by action (adopted, expired, refused).",
            labels=["action"],
        )
        for action in ("adopted", "expired", "refused"):
            synced.add_metric([action], self._silences.synced[action])
        yield synced
