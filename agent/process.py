"""Process-level safety: forked children and interpreter exit.

Contract
- After `os.fork()` (a forking DataLoader, multiprocessing with the fork start method) every live Monitor
  in the child becomes inert: `step()` and the hooks return at once, nothing touches gRPC (its state is not
  fork-safe: a child that uses it can hang) and no thread is started. `attach()` in such a child returns a
  no-op monitor for the same reason.
- At interpreter exit, live monitors are closed with a short, shared deadline
  (AgentConfig.exit_flush_timeout_s). Launchers that kill workers soon after the training function returns
  (Ray, for one) may not run atexit: call `monitor.close()` in a `finally` there.
- gRPC's own fork handlers (on by default in grpcio 1.80+) restart its poller threads in every forked
  child. With a stream open in the parent, children then die of SIGABRT in a check inside gRPC now and then
  (measured with grpcio 1.85.3: 4 of 200 forks, and 0 of 200 with the handlers off). Our children never use
  gRPC, so `prefer_no_grpc_fork_handlers()` turns them off, before grpc is imported (it reads the setting
  at import), unless the application chose a value for GRPC_ENABLE_FORK_SUPPORT itself. The price: a forked
  child can no longer open gRPC channels of its own (they hang), which with the handlers on is unreliable
  anyway; set GRPC_ENABLE_FORK_SUPPORT=true to keep gRPC's behaviour.
The handlers are registered once, on the first tracked Monitor; this module imports neither torch nor grpc.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import time
import weakref
from typing import Protocol

__all__ = ["forked_from_agent_process", "prefer_no_grpc_fork_handlers", "track", "untrack"]

GRPC_FORK_SUPPORT_ENV = "GRPC_ENABLE_FORK_SUPPORT"

logger = logging.getLogger("gradwatch.agent")


class _Tracked(Protocol):
    def _become_inert_after_fork(self) -> None: ...
    def _close_at_exit(self, deadline: float) -> None: ...


_live: weakref.WeakSet[_Tracked] = weakref.WeakSet()
_registered = False
_agent_started = False  # gRPC was (or may have been) used by this process
_forked_child = False  # this process is a fork of one where _agent_started was true


def prefer_no_grpc_fork_handlers() -> None:
    """Turn gRPC's fork handlers off for this process (see the module docstring) when that is still possible
    and the application has not decided otherwise. Call before the agent first imports grpc."""
    if GRPC_FORK_SUPPORT_ENV in os.environ:
        return  # the application's choice
    if "grpc" in sys.modules:
        logger.info(
            "gradwatch: grpc was imported before attach(), so its fork handlers stay on; forked children "
            "(DataLoader workers) may occasionally crash inside gRPC. Set %s=false before importing grpc "
            "to avoid that.",
            GRPC_FORK_SUPPORT_ENV,
        )
        return
    os.environ[GRPC_FORK_SUPPORT_ENV] = "false"


def track(monitor: _Tracked) -> None:
    """Register a started Monitor for fork and exit handling."""
    global _registered, _agent_started
    if not _registered:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(_close_all_at_exit)
        _registered = True
    _agent_started = True
    _live.add(monitor)


def untrack(monitor: _Tracked) -> None:
    _live.discard(monitor)


def forked_from_agent_process() -> bool:
    """True in a forked child of a process that ran an agent: starting gRPC here is unsafe."""
    return _forked_child


def _after_fork_in_child() -> None:
    # Runs in the child with only the forking thread alive: set flags, take no locks, start nothing.
    global _forked_child
    if _agent_started:
        _forked_child = True
    for monitor in list(_live):
        monitor._become_inert_after_fork()
    _live.clear()


def _close_all_at_exit() -> None:
    monitors = list(_live)
    if not monitors:
        return
    deadline = time.monotonic() + max(getattr(m, "exit_flush_timeout_s", 2.0) for m in monitors)
    for monitor in monitors:
        try:
            monitor._close_at_exit(deadline)
        except Exception:  # never turn interpreter exit into a traceback; strict mode included
            logger.debug("gradwatch: close at exit failed", exc_info=True)
