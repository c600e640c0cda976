"""Alertmanager API v2: POST /api/v2/alerts with a list of alerts.

One sink per configured URL (every replica of an HA Alertmanager gets every alert;
they deduplicate among themselves). The notifier provides Alertmanager's life cycle
(fixed startsAt, endsAt = now + 4 × resend interval while firing, endsAt ≤ now to
resolve), so this module only serialises. Alertmanager ignores `status` and
`fingerprint` in pushed alerts, so they are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.server.sinks.base import Notification
from gradwatch.server.sinks.http import post_json, safe_target

__all__ = ["AlertmanagerSink"]

PUSH_PATH = "/api/v2/alerts"


class AlertmanagerSink:
    """Pushes notifications to one Alertmanager at `base_url` (e.g. "http://alertmanager:9093")."""

    def __init__(self, base_url: str) -> None:
        self._url = base_url.rstrip("/") + PUSH_PATH
        self._name = f"alertmanager:{safe_target(base_url)}"

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        alerts = []
        for n in batch:
            alert = n.as_json()
            del alert["status"], alert["fingerprint"]
            alerts.append(alert)
        post_json(self._url, alerts, timeout_s)
