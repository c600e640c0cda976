"""What every alert sink sees and must do: one `Notification` model, one `deliver` method.

Contract
--------
* A `Notification` is an alert as Alertmanager models it: identifying `labels` (stable
  for the alert's lifetime: never values), human `annotations`, a fixed `starts_at`,
  an `ends_at` and a `generator_url` linking back to the server. `status` is "firing"
  while `ends_at` lies in the future and "resolved" once `ends_at` ≤ now; the notifier
  computes both, so sinks only serialise.
* `AlertSink.deliver(batch, timeout_s)` delivers a batch (one Notification per
  fingerprint) or raises `DeliveryError`; `retryable` says whether the same batch may
  succeed later (network trouble, 5xx, 429) or never will (a 4xx: a bug to log once).
  It is called from one delivery thread per sink (gradwatch.server.sinks.worker), never
  on the ingest path, so it may block up to `timeout_s`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["STATUS_FIRING", "STATUS_RESOLVED", "AlertSink", "DeliveryError", "Notification", "rfc3339"]

STATUS_FIRING = "firing"
STATUS_RESOLVED = "resolved"


def rfc3339(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with milliseconds, as Alertmanager's API expects."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Notification:
    """One alert, as delivered (see module docstring)."""

    fingerprint: str
    status: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    starts_at: float
    ends_at: float
    generator_url: str

    def as_json(self) -> dict[str, Any]:
        """The alert in Alertmanager's field names (also the webhook sink's alert shape)."""
        return {
            "status": self.status,
            "labels": dict(self.labels),
            "annotations": dict(self.annotations),
            "startsAt": rfc3339(self.starts_at),
            "endsAt": rfc3339(self.ends_at),
            "generatorURL": self.generator_url,
            "fingerprint": self.fingerprint,
        }


class DeliveryError(Exception):
    """A batch was not delivered. `retryable`: the same batch may succeed later."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class AlertSink(Protocol):
    """Somewhere notifications go. `name` is unique per server and used as a metric label."""

    @property
    def name(self) -> str: ...

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None: ...
