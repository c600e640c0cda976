"""A generic JSON webhook: POST {"version", "source", "alerts": [...]} to a URL.

For chat bridges and in-house tools that do not speak Alertmanager. Each alert has
Alertmanager's webhook fields (status, labels, annotations, startsAt, endsAt,
generatorURL, fingerprint), so a receiver written for Alertmanager's webhook reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gradwatch.server.sinks.base import Notification
from gradwatch.server.sinks.http import post_json, safe_target

__all__ = ["WEBHOOK_VERSION", "WebhookSink"]

#: Version of the payload below; bumped on any incompatible change.
WEBHOOK_VERSION = "gradwatch/1"


class WebhookSink:
    """POSTs every batch to `url` as one JSON document."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._name = f"webhook:{safe_target(url)}"

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        document = {"version": WEBHOOK_VERSION, "source": "gradwatch", "alerts": [n.as_json() for n in batch]}
        post_json(self._url, document, timeout_s)
