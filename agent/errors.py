"""The agent's one choke point for internal errors.

Contract: every hook body, `Monitor.step()` and the sender thread route unexpected exceptions through `report(exc,
where)`, most of them by running inside `with guarded(where, add_time):`. In production the error is counted under
`where`, logged once per `where` (logger "gradwatch.agent", never the root logger) and swallowed, so the agent
cannot take the training loop down.
Tests turn on strict mode (`set_strict(True)`, from an autouse fixture) and the same call re-raises, so a
bug in the agent fails the test that triggered it instead of disappearing into a counter.

Counts are process-wide: several monitors in one process share them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

__all__ = ["counts", "guarded", "is_strict", "report", "reset", "set_strict"]

logger = logging.getLogger("gradwatch.agent")

_lock = threading.Lock()  # guards the two containers below; report() may run on any thread
_counts: dict[str, int] = {}
_strict = False


def set_strict(strict: bool) -> None:
    """Re-raise (True) or swallow (False, the default) errors given to `report`."""
    global _strict
    _strict = bool(strict)


def is_strict() -> bool:
    """Whether `report` re-raises."""
    return _strict


def report(exc: BaseException, where: str) -> None:
    """Count `exc` under `where`, log it the first time `where` fails, swallow it unless strict.

    Must be called from an `except` block (in strict mode it re-raises the active exception with its
    traceback intact).
    """
    with _lock:
        first = where not in _counts
        _counts[where] = _counts.get(where, 0) + 1
    if first:
        # exc_info gives the traceback once; later failures at the same place only count.
        logger.warning(
            "gradwatch agent internal error in %s (training continues; further errors here are only counted): %r",
            where,
            exc,
            exc_info=exc,
        )
    if _strict:
        raise exc


class guarded:  # lower case: it reads as a statement, `with errors.guarded(where):`
    """`with guarded(where, add_time):` runs its body as agent code on the user's thread: an `Exception` from
    it goes to `report(exc, where)` (swallowed, or re-raised in strict mode) and execution goes on after the
    block; `add_time(seconds)`, when given, receives the time the block took, whatever happened. `started`
    (perf_counter) is when the block began. Other BaseExceptions (KeyboardInterrupt) pass through untouched.

    A plain class, not a generator context manager: it runs in every watched module's forward hook."""

    __slots__ = ("_add_time", "_where", "started")

    def __init__(self, where: str, add_time: Callable[[float], None] | None = None) -> None:
        self._where = where
        self._add_time = add_time
        self.started = 0.0

    def __enter__(self) -> guarded:
        self.started = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if isinstance(exc, Exception):
                report(exc, self._where)
                return True
            return False
        finally:
            if self._add_time is not None:
                self._add_time(time.perf_counter() - self.started)


def counts() -> dict[str, int]:
    """Internal errors so far, by `where` (a copy)."""
    with _lock:
        return dict(_counts)


def reset() -> None:
    """Forget all counts (tests)."""
    with _lock:
        _counts.clear()
