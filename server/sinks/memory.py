"""InMemorySink: keeps every delivered batch, for tests and embedding (a real sink, not a mock)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from gradwatch.server.sinks.base import Notification

__all__ = ["InMemorySink"]


class InMemorySink:
    """Records batches; `wait_for(predicate)` blocks until the recorded notifications satisfy it."""

    def __init__(self, name: str = "memory") -> None:
        self._name = name
        self._cond = threading.Condition()
        self.batches: list[list[Notification]] = []

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        with self._cond:
            self.batches.append(list(batch))
            self._cond.notify_all()

    @property
    def notifications(self) -> list[Notification]:
        """Every notification delivered so far, in order."""
        with self._cond:
            return [n for batch in self.batches for n in batch]

    def wait_for(self, predicate: Callable[[list[Notification]], bool], timeout: float) -> bool:
        """True once `predicate(notifications)` holds; False after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate([n for b in self.batches for n in b]), timeout)
