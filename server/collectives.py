"""Each rank's collective progress, as the agents last said it: what `collective_hang` and `straggler` read.

Contract
--------
* One `CollectiveBoard` per run (`RankTable.collectives`), written by the ingest thread under the store's lock
  from every report and heartbeat that carries a `CollectiveProgress` (agent/collectives.py), from goodbyes and
  from stream ends; read by the run's cross-rank detectors under the same lock.
* Cheap per frame: a few array stores, a dict of at most MAX_GROUPS groups and a tuple of at most MAX_FRAMES
  frames per rank. Vectorised columns (`moved_at`, `paused`, `received_at`, `disconnected_at`) are what the
  detector reads every tick; the per-rank groups and stacks are read only when a run is stuck.
* `moved_at[r]` moves when rank r's collective counters rise (any group's entered or completed) or its
  declared pause ends: collective progress is progress even when no step completes (a long step with many
  collectives). An older snapshot arriving after a newer one (reports are written in batches, heartbeats at
  once) never moves anything backwards.
* `check_progress()` is the wire check (bounds and consistency) the validator applies before anything here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.server.ring import occurrences
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = [
    "MAX_FRAMES",
    "MAX_GROUPS",
    "MAX_TEXT",
    "CollectiveBoard",
    "GroupState",
    "check_progress",
    "format_frame",
    "user_frames",
]

#: Wire bounds of one CollectiveProgress (the agent sends at most 16 groups and 48 frames).
MAX_GROUPS = 32
MAX_FRAMES = 64
MAX_TEXT = 512
#: Recent between-collective times per rank whose median the straggler detector compares.
BETWEEN_WINDOW = 16
#: Path fragments of library code: the frame a person wants is the innermost one outside them.
#: Names starting with "<" are generated code ("<string>", "<frozen ...>").
_LIBRARY = ("/torch/", "/site-packages/", "/dist-packages/", "/gradwatch/", "/lib/python3")


@dataclass(frozen=True, slots=True)
class GroupState:
    """One process group on one rank (see pb.CollectiveGroup)."""

    size: int
    entered: int
    completed: int
    pending_seq: int
    pending_op: str
    pending_numel: int
    pending_s: float

    @property
    def waiting(self) -> bool:
        return self.entered > self.completed

    def describe_pending(self, group: str) -> str:
        op = self.pending_op or "a collective"
        return f"{op} (group {group!r}, seq {self.pending_seq}, {self.pending_numel} elements)"


def check_progress(progress: pb.CollectiveProgress) -> str | None:
    """Why `progress` cannot be accepted, or None when it can."""
    if len(progress.groups) > MAX_GROUPS:
        return f"CollectiveProgress has {len(progress.groups)} groups (at most {MAX_GROUPS})"
    if len(progress.stack) > MAX_FRAMES:
        return f"CollectiveProgress.stack has {len(progress.stack)} frames (at most {MAX_FRAMES})"
    for value in (progress.idle_s, progress.stack_still_s):
        if not (math.isfinite(value) and value >= 0):
            return "CollectiveProgress idle_s and stack_still_s must be finite and >= 0"
    if len(progress.paused) > MAX_TEXT:
        return "CollectiveProgress.paused is too long"
    names = set()
    for group in progress.groups:
        if len(group.group) > MAX_TEXT or len(group.pending_op) > MAX_TEXT or group.group in names:
            return f"CollectiveProgress: group name {group.group[:40]!r} repeated or too long"
        names.add(group.group)
        if group.completed > group.entered or group.pending_seq > group.entered:
            return f"CollectiveProgress: group {group.group[:40]!r} completed or pending beyond entered"
        if not (math.isfinite(group.pending_s) and group.pending_s >= 0):
            return "CollectiveProgress.pending_s must be finite and >= 0"
    for frame in progress.stack:
        if len(frame.file) > MAX_TEXT or len(frame.function) > MAX_TEXT:
            return "CollectiveProgress.stack: file or function name too long"
    return None


def user_frames(stack: tuple[tuple[str, int, str], ...], limit: int = 2) -> list[tuple[str, int, str]]:
    """The innermost `limit` frames of the user's own code (not torch, not a library, not the standard library),
    innermost first; the innermost frame when there is none."""
    own = [f for f in stack if not f[0].startswith("<") and not any(part in f[0] for part in _LIBRARY)][:limit]
    return own or list(stack[:1])


def format_frame(frame: tuple[str, int, str]) -> str:
    return f"{frame[0]}:{frame[1]} in {frame[2]}"


class CollectiveBoard:
    """Per-rank collective progress of one run (see the module docstring)."""

    def __init__(self) -> None:
        self.size = 0
        self.received_at = np.zeros(0)
        self.moved_at = np.zeros(0)
        self.disconnected_at = np.zeros(0)
        self.paused = np.zeros(0, dtype=bool)
        self.known = np.zeros(0, dtype=bool)
        self.stack_still_s = np.zeros(0)
        self.idle_s = np.zeros(0)
        self._total = np.zeros(0, dtype=np.int64)
        self._between = np.zeros((0, BETWEEN_WINDOW))
        self._between_count = np.zeros(0, dtype=np.int64)
        self.groups: list[dict[str, GroupState]] = []
        self.stacks: list[tuple[tuple[str, int, str], ...]] = []
        self.pause_reason: list[str] = []
        self.goodbye_reason: list[str | None] = []

    # ------------------------------------------------------------------ writers (ingest thread)

    def join(self, rank: int, new_session: bool) -> None:
        """A Hello: the rank is connected; a new session (restarted worker) counts its collectives afresh."""
        self.fit(rank + 1)
        self.disconnected_at[rank] = np.nan
        self.goodbye_reason[rank] = None
        if new_session:
            self._total[rank] = -1
            self.groups[rank] = {}
            self.stacks[rank] = ()
            self.known[rank] = False
            self.paused[rank] = False

    def update(self, rank: int, progress: pb.CollectiveProgress, now: float) -> None:
        """A CollectiveProgress from `rank`, received at `now` (already checked by check_progress)."""
        self.fit(rank + 1)
        self.received_at[rank] = now
        total = sum(g.entered + g.completed for g in progress.groups)
        if total < self._total[rank]:
            return  # an older snapshot than one already applied
        if total > self._total[rank]:
            self.moved_at[rank] = now
        self._total[rank] = total
        paused = bool(progress.paused)
        if self.paused[rank] and not paused:
            self.moved_at[rank] = now  # a declared pause ended: its length is not idleness
        self.paused[rank] = paused
        self.pause_reason[rank] = progress.paused
        self.known[rank] = progress.completions_known
        self.idle_s[rank] = progress.idle_s
        self.stack_still_s[rank] = progress.stack_still_s
        self.groups[rank] = {
            g.group: GroupState(
                g.size, g.entered, g.completed, g.pending_seq, g.pending_op, g.pending_numel, g.pending_s
            )
            for g in progress.groups
        }
        self.stacks[rank] = tuple((f.file, f.line, f.function) for f in progress.stack)

    def between(self, rank: int, seconds: float) -> None:
        """A report's between_collectives_s."""
        if not (math.isfinite(seconds) and seconds >= 0):
            return
        self.fit(rank + 1)
        self._between[rank, self._between_count[rank] % BETWEEN_WINDOW] = seconds
        self._between_count[rank] += 1

    def between_many(self, ranks: np.ndarray, seconds: np.ndarray) -> None:
        """Reports' between_collectives_s (in arrival order, a rank possibly more than once): `between()` each."""
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(seconds) & (seconds >= 0)
        ranks, seconds = ranks[ok], seconds[ok]
        if ranks.size == 0:
            return
        self.fit(int(ranks.max()) + 1)
        occurrence, counts = occurrences(ranks)
        keep = occurrence >= counts - BETWEEN_WINDOW
        slots = (self._between_count[ranks] + occurrence) % BETWEEN_WINDOW
        self._between[ranks[keep], slots[keep]] = seconds[keep]
        np.add.at(self._between_count, ranks, 1)

    def goodbye(self, rank: int, reason: str) -> None:
        self.fit(rank + 1)
        self.goodbye_reason[rank] = reason

    def disconnected(self, rank: int, now: float) -> None:
        """The rank's last stream ended without a goodbye (its process may be dead)."""
        self.fit(rank + 1)
        if self.goodbye_reason[rank] is None:
            self.disconnected_at[rank] = now

    # ------------------------------------------------------------------ readers

    def between_time(self) -> np.ndarray:
        """Median recent between-collective time per rank (NaN where the rank never sent one): np.nanmedian's
        values, from one sort (server/detectors/robust.py) rather than its masked-array path for short rows."""
        from gradwatch.server.detectors.robust import nanmedian_columns  # here: the detectors import this module

        rows = np.where(np.arange(BETWEEN_WINDOW) < self._between_count[:, None], self._between, np.nan)
        return nanmedian_columns(rows.T)

    # ------------------------------------------------------------------ internals

    def fit(self, size: int) -> None:
        extra = size - self.size
        if extra <= 0:
            return
        self.received_at = np.concatenate([self.received_at, np.full(extra, np.nan)])
        self.moved_at = np.concatenate([self.moved_at, np.full(extra, np.nan)])
        self.disconnected_at = np.concatenate([self.disconnected_at, np.full(extra, np.nan)])
        self.paused = np.concatenate([self.paused, np.zeros(extra, dtype=bool)])
        self.known = np.concatenate([self.known, np.zeros(extra, dtype=bool)])
        self.stack_still_s = np.concatenate([self.stack_still_s, np.zeros(extra)])
        self.idle_s = np.concatenate([self.idle_s, np.zeros(extra)])
        self._total = np.concatenate([self._total, np.full(extra, -1, dtype=np.int64)])
        self._between = np.vstack([self._between, np.zeros((extra, BETWEEN_WINDOW))])
        self._between_count = np.concatenate([self._between_count, np.zeros(extra, dtype=np.int64)])
        self.groups.extend({} for _ in range(extra))
        self.stacks.extend(() for _ in range(extra))
        self.pause_reason.extend("" for _ in range(extra))
        self.goodbye_reason.extend(None for _ in range(extra))
        self.size = size
