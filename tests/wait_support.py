"""The one polling helper of the tests, for conditions with no event to wait on (a thread list, another process's
HTTP answer, a counter on the far side of a socket). Where an event exists, wait on it instead."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["WAIT_S", "wait_until"]

#: Default deadline: generous, since a loaded CI host is slow; a passing condition returns at once.
WAIT_S = 30.0

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T],
    timeout: float = WAIT_S,
    *,
    what: str = "",
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something truthy and return that; AssertionError naming `what` (default:
    the probe's source) after `timeout` seconds, followed by `detail()` when given (a log tail, the last state
    seen). `probe` is called once more at the deadline; a probe that sees the watched process dead raises at once
    (its exception propagates)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    if not value:
        message = f"timed out after {timeout:g} s waiting for {what or _source(probe)}"
        raise AssertionError(f"{message}:\n{detail()}" if detail is not None else message)
    return value


def _source(probe: Callable[[], Any]) -> str:
    try:
        return inspect.getsource(probe).strip()
    except (OSError, TypeError):
        return repr(probe)
