"""Collective progress and the training thread's stack: what the server needs to localise a hang.

In a hang every rank waits in a collective for one that never arrives, and every rank stops reporting at
once. To name the culprit the server compares, per process group, how far each rank got. `CollectiveTracker`
gathers that on the agent, cheaply and without host synchronisation, from what PyTorch itself keeps:

* **Sequence numbers** per process group (`ProcessGroup._get_sequence_number_for_group()`): the backend's
  count of collectives issued on the group, identical across members after the same collectives.
* **The flight recorder** (`torch._C._distributed_c10d._dump_fr_trace_json`; recorded by default for gloo
  and NCCL in torch 2.13): its status (tens of microseconds, read on the sender thread) gives each group's
  last enqueued and last completed collective; its entries (the whole ring buffer, up to tenths of a second
  to read and parse) give the operation, sizes and age of the collective still in flight, and are read only
  when the training thread has been idle past its threshold with a collective in flight. The training
  thread pays nothing beyond what torch already records. Without a recorder, `completions_known` is False
  and only the entered sequence numbers travel.
* **A DDP communication hook** that averages the bucket like DDP's default (an asynchronous sum all-reduce,
  then a division by the group size on the thread that completes it) and notes when each bucket arrives
  and when its all-reduce completes: `take_between()` is the time this rank worked between collectives since
  the last report (the previous collective's completion to its arrival at the next, overlap counted 0),
  which names a straggler wherever in the step it is slow. Opt-in (`ddp_comm_hook=True`): it takes DDP's one
  hook slot (a user's own `register_comm_hook` after attach would then fail) and costs an extra pass over each
  bucket; not installed when the model is not DDP or the user registered their own hook first.

The sender thread calls `progress()` for every heartbeat (every `HEARTBEAT_S` while tracking) and for each
report (so a report carries the rank's progress when the sender handled it, at most a batching interval after
the step); it keeps running while the training thread is stuck. When the training thread has not called
`monitor.step()` for longer than max(STACK_FLOOR_S, STACK_FACTOR × its median recent step time), the
progress carries that thread's Python stack (`sys._current_frames()`, file:line per frame, innermost first,
at most MAX_FRAMES) and how long the stack has stayed unchanged: a blocked thread's stack does not move.

`pause(reason)` marks a declared pause (a checkpoint, an evaluation): the server does not judge a paused run.

Threads: `on_step`, `pause`/`resume` run on the training thread; the hook on whichever thread DDP runs it
(autograd's, and a backend thread for the completion); `progress` on the sender thread. They share only
single attribute stores and reads of immutable values (atomic under the GIL), so nothing here locks.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from gradwatch.agent import errors
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["HEARTBEAT_S", "MAX_FRAMES", "STACK_FACTOR", "STACK_FLOOR_S", "CollectiveTracker", "capture_stack"]

logger = logging.getLogger("gradwatch.agent")

#: Heartbeat period while collectives are tracked: the server's view of a stuck rank is at most this old.
HEARTBEAT_S = 2.0
#: The training thread's stack is sent once it has been idle max(STACK_FLOOR_S, STACK_FACTOR × median step).
STACK_FLOOR_S = 2.0
STACK_FACTOR = 5.0
#: Bounds of what travels: frames per stack, process groups, characters per string.
MAX_FRAMES = 48
MAX_GROUPS = 16
MAX_TEXT = 200
#: Recent step durations whose median sets the idle threshold.
STEP_WINDOW = 16
#: A progress snapshot is reused for reports made within this long (one flight-recorder read per window).
SNAPSHOT_TTL_S = 0.25


def capture_stack(thread_id: int, limit: int = MAX_FRAMES) -> list[tuple[str, int, str]]:
    """(file, line, function) of each frame of thread `thread_id`, innermost first; [] if it is gone."""
    frame = sys._current_frames().get(thread_id)
    out: list[tuple[str, int, str]] = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno or 0, code.co_name))
        frame = frame.f_back
    return out


class CollectiveTracker:
    """One monitor's view of its rank's collectives and training thread (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, *, enabled: bool = True, comm_hook: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        """Active only in an initialised torch.distributed job with `enabled`; `install()` adds the DDP hook
        when `comm_hook`. Never raises for a missing feature of the backend (it sends less)."""
        self._clock = clock
        self._comm_hook = comm_hook
        self.active = enabled and dist.is_available() and dist.is_initialized()
        self._fr_status, self._fr_entries = _flight_recorder()
        self._thread_id = threading.get_ident()
        self._last_step_at = clock()
        self._durations: deque[float] = deque(maxlen=STEP_WINDOW)
        self._paused: list[str] = []
        self._stack_key: tuple[str, int] | None = None
        self._stack_since = 0.0
        self._cached: tuple[float, pb.CollectiveProgress] | None = None
        # Hook state (see _hook): busy seconds since the last take, the latest completion, the hook's switch.
        self._between = 0.0
        self._between_seen = False
        self._completed_at: float | None = None
        self._hooked = False
        self._hook_on = True

    @property
    def hooked(self) -> bool:
        """True when the DDP communication hook is installed (between-collectives times are measured)."""
        return self._hooked

    # ------------------------------------------------------------------ training thread

    def on_step(self) -> None:
        """monitor.step() was called on this thread: it advanced."""
        now = self._clock()
        self._durations.append(now - self._last_step_at)
        self._last_step_at = now
        self._thread_id = threading.get_ident()

    def take_between(self) -> float | None:
        """Seconds worked between collectives since the previous call; None when the hook saw no collective."""
        if not self._between_seen:
            return None
        between, self._between, self._between_seen = self._between, 0.0, False
        return between

    def pause(self, reason: str) -> None:
        self._paused.append(reason[:MAX_TEXT] or "paused")

    def resume(self) -> None:
        """End the innermost pause; the idle clock starts again (a pause is not idleness)."""
        if self._paused:
            self._paused.pop()
        self._last_step_at = self._clock()

    def close(self) -> None:
        """Stop timing (DDP keeps the hook, which then only all-reduces, as its default would). Progress is
        still read for the frames the sender delivers while closing."""
        self._hook_on = False

    # ------------------------------------------------------------------ sender thread

    def progress(self, *, fresh: bool = False) -> pb.CollectiveProgress | None:
        """This rank's collective progress now (a snapshot at most SNAPSHOT_TTL_S old unless `fresh`); None
        when not tracking."""
        if not self.active:
            return None
        now = self._clock()
        cached = self._cached
        if not fresh and cached is not None and now - cached[0] < SNAPSHOT_TTL_S:
            return cached[1]
        try:
            progress = self._build(now)
        except Exception as exc:
            errors.report(exc, "collectives.progress")
            return None
        self._cached = (now, progress)
        return progress

    def _build(self, now: float) -> pb.CollectiveProgress:
        idle = max(0.0, now - self._last_step_at)
        stuck = idle > self._stack_threshold()
        progress = pb.CollectiveProgress(idle_s=idle, paused=self._paused[-1] if self._paused else "")
        status = self._status()
        groups = _groups()[:MAX_GROUPS]
        counts = {}
        known = status is not None
        for name, group in groups:
            entered, completed = (status or {}).get(name) or (int(group._get_sequence_number_for_group()), None)
            # The recorder lists a group from its first collective on; before that there is nothing to complete.
            known &= completed is not None or entered == 0
            counts[name] = (entered, entered if completed is None else min(entered, completed))
        progress.completions_known = known
        # The recorder's entries are read only for a thread idle past its threshold with a collective in flight:
        # the whole buffer comes back (thousands of entries, tenths of a second), which a healthy step never pays.
        in_flight = any(done < entered for entered, done in counts.values())
        pending = self._pending() if stuck and in_flight else {}
        for name, group in groups:
            entered, completed = counts[name]
            item = progress.groups.add(group=name[:MAX_TEXT], size=int(group.size()), entered=entered,
                                       completed=completed)  # fmt: skip
            if completed < entered:
                item.pending_seq = completed + 1
                oldest = pending.get(name)
                if oldest is not None and oldest[0] == item.pending_seq:
                    _, op, numel, created_ns = oldest
                    item.pending_op, item.pending_numel = op[:MAX_TEXT], numel
                    item.pending_s = max(0.0, time.time() - created_ns / 1e9) if created_ns else 0.0
        if stuck:
            stack = capture_stack(self._thread_id)
            key = (stack[0][0], stack[0][1]) if stack else None
            if key != self._stack_key:
                self._stack_key, self._stack_since = key, now
            progress.stack_still_s = now - self._stack_since
            for file, line, function in stack:
                progress.stack.add(file=file[-MAX_TEXT:], line=line, function=function[:MAX_TEXT])
        else:
            self._stack_key = None
        return progress

    def _stack_threshold(self) -> float:
        recent = list(self._durations)
        return max(STACK_FLOOR_S, STACK_FACTOR * statistics.median(recent)) if recent else STACK_FLOOR_S

    def _status(self) -> dict[str, tuple[int, int]] | None:
        """Group name -> (last enqueued, last completed) collective from the flight recorder's status (tens of
        microseconds: no entries); None without a recorder."""
        if self._fr_status is None:
            return None
        try:
            status = json.loads(self._fr_status()).get("pg_status", {})
            # -1: none yet.
            return {str(k): (max(0, int(v["last_enqueued_collective"])), max(0, int(v["last_completed_collective"])))
                    for k, v in status.items()}  # fmt: skip
        except Exception:
            return None

    def _pending(self) -> dict[str, tuple[int, str, int, int]]:
        """Group name -> (seq, op, numel, created ns) of its oldest in-flight collective (flight recorder)."""
        if self._fr_entries is None:
            return {}
        try:
            dump = json.loads(self._fr_entries())
        except Exception:
            return {}
        out: dict[str, tuple[int, str, int, int]] = {}
        for entry in dump.get("entries", ()):
            if entry.get("retired") or entry.get("is_p2p"):
                continue
            group = entry.get("process_group") or ("",)
            name = str(group[0])
            seq = int(entry.get("collective_seq_id", 0))
            if name in out and out[name][0] <= seq:
                continue
            op = str(entry.get("profiling_name", "")).split(":")[-1]
            numel = sum(_numel(size) for size in entry.get("input_sizes", ()))
            out[name] = (seq, op, numel, int(entry.get("time_created_ns") or 0))
        return out

    # ------------------------------------------------------------------ the DDP hook

    def install(self, model: torch.nn.Module) -> None:
        """Register the communication hook on a DDP `model` that has none (see the module docstring)."""
        if self.active and self._comm_hook:
            self._hooked = self._install_hook(model)

    def _install_hook(self, model: torch.nn.Module) -> bool:
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel) or getattr(model, "_comm_hooks", None):
            return False
        group = model.process_group
        size = group.size()

        # No annotations: DDP checks them against its own types, and `from __future__ import annotations` would
        # hand it strings. It averages like DDP's default (which folds the division into its copy of the
        # gradients into the bucket, a copy a hook cannot change): sum, then divide once the all-reduce
        # completes, on the thread that completes it. That division is an extra pass over the bucket; on a CPU
        # job it still showed in the training thread's time (bench/RESULTS.md).
        def gradwatch_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            if self._hook_on:
                self._arrived(time.perf_counter())
            future = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
            return future.then(lambda done: self._completed(done).div_(size))

        try:
            model.register_comm_hook(None, gradwatch_allreduce)
        except Exception as exc:  # e.g. called after training started: run without between-collective times
            logger.warning("gradwatch: no DDP communication hook (%s); straggler timing uses pre-forward times", exc)
            return False
        return True

    def _arrived(self, at: float) -> None:
        last = self._completed_at
        if last is not None and at > last:
            self._between += at - last
        self._between_seen = True

    def _completed(self, future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        now = time.perf_counter()
        if self._hook_on and (self._completed_at is None or now > self._completed_at):
            self._completed_at = now
        return future.value()[0]


def _numel(size: Any) -> int:
    count = 1
    for dim in size:
        count *= int(dim)
    return count


def _groups() -> list[tuple[str, Any]]:
    """(name, group) of every process group of this process, default group first."""
    world = dist.distributed_c10d._world
    try:
        named = list(world.pg_names.items())
    except RuntimeError:  # changed while copied (a group being created): next time
        return []
    default = world.default_pg
    named.sort(key=lambda item: (item[0] is not default, item[1]))
    return [(name, group) for group, name in named]


def _flight_recorder() -> tuple[Callable[[], bytes] | None, Callable[[], bytes] | None]:
    """The recorder's readers (status only; every entry), if this torch has one."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # type: ignore[attr-defined]  # not in stubs
    except ImportError:
        return None, None

    def status() -> bytes:
        return _dump_fr_trace_json(False, True)

    def entries() -> bytes:
        return _dump_fr_trace_json(True, True)

    return status, entries
