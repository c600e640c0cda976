"""The log sink: one line per notification on the "gradwatch.alerts" logger.

Firing alerts log at WARNING (visible with no logging configured), resolutions at INFO. An alert
that is still firing is re-sent every resend interval: those repeats are not logged again (one line
when it fires, one when it resolves). The logger is the server's; this module never configures logging.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gradwatch.server.sinks.base import STATUS_FIRING, Notification

__all__ = ["LOGGER_NAME", "LogSink"]

LOGGER_NAME = "gradwatch.alerts"
#: Firing alerts remembered (to skip their re-sends); the oldest are forgotten first.
MAX_TRACKED = 10_000


class LogSink:
    """Logs each notification; never fails."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        #: fingerprint -> startsAt of the firing alerts logged; bounded by the alerts that can fire at once.
        self._firing: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "log"

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        for n in batch:
            if n.status == STATUS_FIRING:
                if self._firing.get(n.fingerprint) == n.starts_at:
                    continue  # a re-send of an alert already logged as firing
                self._firing[n.fingerprint] = n.starts_at
                while len(self._firing) > MAX_TRACKED:
                    del self._firing[next(iter(self._firing))]
            else:
                self._firing.pop(n.fingerprint, None)
            level = logging.WARNING if n.status == STATUS_FIRING else logging.INFO
            labels = " ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
            self._log.log(level, "alert %s %s: %s", n.status, labels, n.annotations.get("summary", ""))
