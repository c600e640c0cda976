"""Opt-in reactions to a critical alert the server raised for this run (default: observe only).

The server sends a COMMAND_KIND_ALERT command to every rank of a run when a critical detector starts firing
(non_finite, exploding_gradient). The sender thread hands it to `AlertActions.deliver`, which records it and,
for `on_alert="flag"` or `"raise"`, sets `stop_requested` at once (a plain attribute the training loop can
poll, e.g. to checkpoint and stop). At the next `monitor.step()` on the training thread, `poll()` calls the
user's `alert_callback(notice)` if one was given and, with
`on_alert="raise"`, raises `TrainingAlert` once per alert: the one deliberate exception into the training
loop, and only when asked for at attach.

An exception from the callback is the user's code failing, not the agent's: it is logged as the callback's
(logger "gradwatch.agent", with its traceback, every time: at most once per alert) and counted in
`callback_errors`, never in errors.counts() and never re-raised by strict mode; training goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ON_ALERT_CHOICES", "AlertActions", "AlertNotice", "TrainingAlert"]

ON_ALERT_CHOICES: tuple[str, ...] = ("observe", "flag", "raise")

logger = logging.getLogger("gradwatch.agent")


@dataclass(frozen=True)
class AlertNotice:
    """A critical alert for this run, as the server described it."""

    detector: str
    severity: str
    step: int
    rank: int
    summary: str


class TrainingAlert(RuntimeError):
    """Raised by `monitor.step()` after a critical alert, when attached with `on_alert="raise"`."""

    def __init__(self, notice: AlertNotice) -> None:
        super().__init__(f"gradwatch: {notice.severity} alert {notice.detector}: {notice.summary}")
        self.notice = notice


class AlertActions:
    """Delivers alert notices from the sender thread to the training thread (see the module docstring)."""

    def __init__(self, mode: str, callback: Callable[[AlertNotice], object] | None) -> None:
        self._mode = mode
        self._callback = callback
        self._incoming: tuple[int, AlertNotice | None] = (0, None)  # swapped whole by the sender thread
        self._seen = 0
        #: Exceptions the user's callback raised (module docstring).
        self.callback_errors = 0
        self.stop_requested = False
        self.last_alert: AlertNotice | None = None

    def deliver(self, notice: AlertNotice) -> None:
        """Sender thread: record the notice; set the stop flag at once when asked to."""
        self._incoming = (self._incoming[0] + 1, notice)
        self.last_alert = notice
        if self._mode in ("flag", "raise"):
            self.stop_requested = True

    def poll(self) -> None:
        """Training thread, from step(): run the callback and raise, once per notice, as configured."""
        token, notice = self._incoming
        if token == self._seen or notice is None:
            return
        self._seen = token
        if self._callback is not None:
            try:
                self._callback(notice)
            except Exception:
                self.callback_errors += 1
                logger.warning("gradwatch: your alert_callback raised on the %s alert %s at step %d (training goes "
                               "on)", notice.severity, notice.detector, notice.step, exc_info=True)  # fmt: skip
        if self._mode == "raise":
            raise TrainingAlert(notice)
