"""The log sink: one line per notification on the "gradwatch.alerts" logger.

Firing alerts log at WARNING (visible with no logging configured), resolutions at INFO.
The logger is the server's; this module never configures logging.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gradwatch.server.sinks.base import STATUS_FIRING, Notification

__all__ = ["LOGGER_NAME", "LogSink"]

LOGGER_NAME = "gradwatch.alerts"


class LogSink:
    """Logs each notification; never fails."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else logging.getLogger(LOGGER_NAME)

    @property
    def name(self) -> str:
        return "log"

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        for n in batch:
            level = logging.WARNING if n.status == STATUS_FIRING else logging.INFO
            labels = " ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
            self._log.log(level, "alert %s %s: %s", n.status, labels, n.annotations.get("summary", ""))
