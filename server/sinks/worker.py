"""One delivery thread per sink: coalescing, retries with backoff, outcome counters.

Contract
--------
* `submit(notifications)` never blocks and never raises: it puts each notification in
  the worker's pending map (one entry per fingerprint: a newer notification of the
  same alert replaces the older one, so a resolve overtakes a queued fire) and wakes
  the thread. With `policy.max_pending` entries waiting, new fingerprints are dropped
  and counted ("dropped"); the notifier's periodic resend brings firing ones back.
* The thread delivers everything pending as one batch. A retryable DeliveryError is
  retried with exponential backoff and jitter until `policy.deadline_s` has passed
  since the first attempt; before each retry the batch absorbs newer pending
  notifications. Then the batch counts as "failed". Non-retryable errors fail at once.
* Outcomes, per notification: "sent", "retried" (an attempt failed, another follows),
  "failed", "dropped". Failures are logged when a sink starts failing and when it
  recovers, not on every attempt.
* `stop(timeout_s)` interrupts any backoff, makes one last attempt for what is
  pending, and joins the thread within the timeout.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gradwatch.server.sinks.base import AlertSink, DeliveryError, Notification

__all__ = ["OUTCOMES", "DeliveryPolicy", "SinkSnapshot", "SinkWorker"]

log = logging.getLogger(__name__)

OUTCOMES = ("sent", "retried", "failed", "dropped")


@dataclass(frozen=True)
class DeliveryPolicy:
    """How a worker delivers: request timeout, backoff (initial × multiplier^n, capped, ± jitter), deadline."""

    timeout_s: float = 5.0
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 5.0
    jitter: float = 0.2
    deadline_s: float = 60.0
    max_pending: int = 10000

    def backoff_s(self, attempt: int, uniform: float) -> float:
        """Wait before retry number `attempt` (0-based); `uniform` is a random number in [0, 1)."""
        base = min(self.initial_backoff_s * self.multiplier**attempt, self.max_backoff_s)
        return base * (1.0 + self.jitter * (2.0 * uniform - 1.0))


@dataclass(frozen=True)
class SinkSnapshot:
    """A consistent copy of one worker's counters."""

    name: str
    outcomes: dict[str, int]
    pending: int
    healthy: bool


class SinkWorker:
    """Owns one sink and its delivery thread (see module docstring)."""

    def __init__(
        self,
        sink: AlertSink,
        policy: DeliveryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.sink = sink
        self.policy = policy if policy is not None else DeliveryPolicy()
        self._clock = clock
        self._uniform = uniform
        self._lock = threading.Lock()
        self._pending: dict[str, Notification] = {}
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._busy = False
        self._healthy = True
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.sink.name

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"sink worker {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-sink-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, notifications: Iterable[Notification]) -> None:
        """Queue notifications for delivery; never blocks (see module docstring)."""
        with self._lock:
            for n in notifications:
                if n.fingerprint in self._pending or len(self._pending) < self.policy.max_pending:
                    self._pending[n.fingerprint] = n
                else:
                    self._outcomes["dropped"] += 1
        self._wake.set()

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is pending or in flight (for tests and shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and not self._busy, timeout)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Interrupt backoff, try once more for what is pending, join. Idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def snapshot(self) -> SinkSnapshot:
        with self._lock:
            return SinkSnapshot(self.name, dict(self._outcomes), len(self._pending), self._healthy)

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch:
                self._deliver(batch)
            with self._idle:
                self._busy = False
                self._idle.notify_all()
            if self._stopping.is_set() and not self._has_pending():
                return

    def _take(self) -> dict[str, Notification]:
        with self._lock:
            batch, self._pending = self._pending, {}
            self._busy = bool(batch)
            return batch

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def _deliver(self, batch: dict[str, Notification]) -> None:
        policy = self.policy
        started = self._clock()
        attempt = 0
        while True:
            try:
                self.sink.deliver(list(batch.values()), policy.timeout_s)
            except DeliveryError as exc:
                final = not exc.retryable or self._stopping.is_set() or self._clock() - started >= policy.deadline_s
                self._count("failed" if final else "retried", len(batch), healthy=False, problem=str(exc))
                if final:
                    return
                self._stopping.wait(policy.backoff_s(attempt, self._uniform()))
                attempt += 1
                batch.update(self._take_more())
                continue
            except Exception as exc:  # a bug in a sink must not kill its thread
                log.exception("alert sink %s raised unexpectedly", self.name)
                self._count("failed", len(batch), healthy=False, problem=repr(exc))
                return
            self._count("sent", len(batch), healthy=True, problem="")
            return

    def _take_more(self) -> dict[str, Notification]:
        with self._lock:
            more, self._pending = self._pending, {}
            return more

    def _count(self, outcome: str, n: int, *, healthy: bool, problem: str) -> None:
        with self._lock:
            self._outcomes[outcome] += n
            was_healthy, self._healthy = self._healthy, healthy
        if was_healthy and not healthy:
            log.warning("alert sink %s failing (retrying with backoff): %s", self.name, problem)
        elif healthy and not was_healthy:
            log.warning("alert sink %s delivering again", self.name)
        if outcome == "failed":
            log.warning("alert sink %s gave up on %d notification(s): %s", self.name, n, problem)
