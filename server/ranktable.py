"""The latest state of every rank of one run, as numpy arrays indexed by rank: what cross-rank detectors read.

Contract
--------
* One `RankTable` per run (`RunState.table`), sized to the run's world size (grown if a later Hello says
  more). Every update is O(1) (a few array stores); readers get whole columns and judge all ranks at once
  with numpy, never a Python loop per rank.
* Times are the server's clock (receipt times), so ranks on hosts with skewed clocks compare fairly.
* `progress_at` moves only when a rank's step advances (a report, or a heartbeat that says the training
  thread got further than the last report), never on a bare heartbeat: the agent's sender thread keeps
  beating while the training loop hangs. `heard_at` moves on every frame: a rank whose frames stopped
  altogether is frozen, dead or cut off.
* Timing rows keep each rank's last TIMING_WINDOW step durations and pre-forward times (StepReport
  `step_duration_s`, `pre_forward_s`); `step_time()` and `pre_forward_time()` are their per-rank medians.
* Guarded by the store's lock like the rest of the run; the ingest thread is its only writer.
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.server.collectives import CollectiveBoard
from gradwatch.server.ring import occurrences

__all__ = ["TIMING_WINDOW", "RankTable"]

#: Recent reports per rank whose timings enter the per-rank medians.
TIMING_WINDOW = 16


class RankTable:
    """Per-rank columns of one run (see the module docstring)."""

    def __init__(self, world_size: int) -> None:
        self.size = 0
        self.hosts: list[str] = []
        self.joined = np.zeros(0, dtype=bool)
        self.finished = np.zeros(0, dtype=bool)
        self.last_step = np.zeros(0, dtype=np.int64)
        self.reports = np.zeros(0, dtype=np.int64)
        self.progress_at = np.zeros(0)
        self.heard_at = np.zeros(0)
        self.replica_group = np.zeros(0, dtype=np.int64)
        self.replica_group_size = np.zeros(0, dtype=np.int64)
        self._durations = np.zeros((0, TIMING_WINDOW))
        self._pre_forward = np.zeros((0, TIMING_WINDOW))
        #: Bumped by every write to the timing rows; the medians below are cached against it (ticks read them
        #: several times per pass, and between reports they cannot change).
        self._timings = 0
        self._medians: dict[str, tuple[int, np.ndarray]] = {}
        #: Each rank's collective progress and stuck stack (server/collectives.py), for collective_hang.
        self.collectives = CollectiveBoard()
        self._grow(world_size)

    # ------------------------------------------------------------------ writers

    def join(self, rank: int, world_size: int, host: str, replica_group: int, replica_group_size: int,
             now: float, *, new_session: bool = True) -> None:  # fmt: skip
        """A Hello from `rank`. A new agent session (a restarted worker) counts its steps from 1 again: its step
        and progress start over (now); timing history stays. A reconnect of the same session changes neither."""
        self._grow(max(world_size, rank + 1))
        self.collectives.join(rank, new_session)
        if new_session:
            self.last_step[rank] = -1
            self.progress_at[rank] = now
        self.hosts[rank] = host
        self.joined[rank] = True
        self.finished[rank] = False
        self.heard_at[rank] = now
        self.replica_group[rank] = replica_group if replica_group_size > 1 else rank
        self.replica_group_size[rank] = max(replica_group_size, 1)

    def report(self, rank: int, step: int, duration_s: float, pre_forward_s: float | None, now: float) -> None:
        """A step report from `rank`, received at `now`."""
        if rank >= self.size:
            self._grow(rank + 1)
        self.heard_at[rank] = now
        if step > self.last_step[rank]:
            self.last_step[rank] = step
            self.progress_at[rank] = now
        slot = self.reports[rank] % TIMING_WINDOW
        self.reports[rank] += 1
        # 0 is the agent's "unknown" (its first step): no step takes no time.
        self._durations[rank, slot] = duration_s if math.isfinite(duration_s) and duration_s > 0 else np.nan
        ok = pre_forward_s is not None and math.isfinite(pre_forward_s) and pre_forward_s >= 0
        self._pre_forward[rank, slot] = pre_forward_s if ok else np.nan
        self._timings += 1

    def report_many(self, ranks: np.ndarray, steps: np.ndarray, durations: np.ndarray, pre_forward: np.ndarray,
                    now: float) -> None:  # fmt: skip
        """Reports of `ranks` (in arrival order, a rank possibly more than once), received at `now`: the same
        tables as `report()` once per report, with array operations. `pre_forward`: NaN where a report had none."""
        if ranks.size == 0:
            return
        self._grow(int(ranks.max()) + 1)
        self.heard_at[ranks] = now
        highest = np.full(self.size, -1, dtype=np.int64)
        np.maximum.at(highest, ranks, steps)
        moved = highest > self.last_step
        self.last_step[moved] = highest[moved]
        self.progress_at[moved] = now
        occurrence, counts = occurrences(ranks)
        keep = occurrence >= counts - TIMING_WINDOW  # a rank's last TIMING_WINDOW reports reach its ring
        slots = (self.reports[ranks] + occurrence) % TIMING_WINDOW
        with np.errstate(invalid="ignore"):
            duration_ok = np.isfinite(durations) & (durations > 0)
            pre_ok = np.isfinite(pre_forward) & (pre_forward >= 0)
        self._durations[ranks[keep], slots[keep]] = np.where(duration_ok, durations, np.nan)[keep]
        self._pre_forward[ranks[keep], slots[keep]] = np.where(pre_ok, pre_forward, np.nan)[keep]
        np.add.at(self.reports, ranks, 1)
        self._timings += 1

    def heard(self, rank: int, step: int, now: float) -> None:
        """A heartbeat saying the training thread is at `step`."""
        if rank >= self.size:
            return
        self.heard_at[rank] = now
        if step > self.last_step[rank] and self.reports[rank] > 0:
            self.last_step[rank] = step
            self.progress_at[rank] = now

    def goodbye(self, rank: int) -> None:
        if rank < self.size:
            self.finished[rank] = True

    def leave(self, rank: int) -> None:
        """`rank` went elsewhere (its relay's link to this server ended: the run moved to another replica, or
        the link is down): forgotten until a Hello brings it back, so no detector waits for it or calls it
        stalled or dead. Its step and timing history stay for its return."""
        if rank < self.size:
            self.joined[rank] = False

    # ------------------------------------------------------------------ readers

    def copy(self) -> RankTable:
        """An independent copy (arrays copied): what HTTP readers work on outside the store's lock."""
        clone = object.__new__(RankTable)
        for name, value in vars(self).items():
            setattr(clone, name, value.copy() if isinstance(value, (np.ndarray, list, dict)) else value)
        return clone

    def step_time(self) -> np.ndarray:
        """Median recent step duration per rank (seconds; NaN without reports). Read-only: shared by the readers
        of one pass until the next report."""
        return self._median_of("_durations")

    def pre_forward_time(self) -> np.ndarray:
        """Median recent pre-forward time per rank (seconds; NaN when the rank never said). Read-only."""
        return self._median_of("_pre_forward")

    def _median_of(self, name: str) -> np.ndarray:
        cached = self._medians.get(name)
        if cached is not None and cached[0] == self._timings:
            return cached[1]
        medians = _row_medians(getattr(self, name))
        medians.setflags(write=False)
        self._medians[name] = (self._timings, medians)
        return medians

    def live(self, min_reports: int = 1) -> np.ndarray:
        """Ranks that joined, have not said goodbye and sent at least `min_reports` reports."""
        return self.joined & ~self.finished & (self.reports >= min_reports)

    def describe(self, ranks: np.ndarray, limit: int = 8) -> str:
        """'rank 1 (host-a), rank 3 (host-b)' for the first `limit` of `ranks`, then '… and N more'."""
        picked = [int(r) for r in np.asarray(ranks).ravel()]
        text = ", ".join(f"rank {r} ({self.hosts[r] or 'unknown host'})" for r in picked[:limit])
        return text + (f" and {len(picked) - limit} more" if len(picked) > limit else "")

    # ------------------------------------------------------------------ internals

    def _grow(self, size: int) -> None:
        extra = size - self.size
        if extra <= 0:
            return
        self.hosts.extend([""] * extra)
        self.joined = np.concatenate([self.joined, np.zeros(extra, dtype=bool)])
        self.finished = np.concatenate([self.finished, np.zeros(extra, dtype=bool)])
        self.last_step = np.concatenate([self.last_step, np.full(extra, -1, dtype=np.int64)])
        self.reports = np.concatenate([self.reports, np.zeros(extra, dtype=np.int64)])
        self.progress_at = np.concatenate([self.progress_at, np.full(extra, np.nan)])
        self.heard_at = np.concatenate([self.heard_at, np.full(extra, np.nan)])
        ranks = np.arange(self.size, size, dtype=np.int64)
        self.replica_group = np.concatenate([self.replica_group, ranks])
        self.replica_group_size = np.concatenate([self.replica_group_size, np.ones(extra, dtype=np.int64)])
        self._durations = np.vstack([self._durations, np.full((extra, TIMING_WINDOW), np.nan)])
        self._pre_forward = np.vstack([self._pre_forward, np.full((extra, TIMING_WINDOW), np.nan)])
        self.size = size
        self._timings += 1


def _row_medians(rows: np.ndarray) -> np.ndarray:
    """`np.nanmedian(rows, axis=1)` bit for bit (the rows hold finite values or NaN), NaN for a row without any
    (no all-NaN warnings): one sort of the table, not numpy's masked-array path for short rows (about 15 µs per
    rank and pass at 16 values a row)."""
    from gradwatch.server.detectors.robust import nanmedian_columns  # here: the detectors import this module

    return nanmedian_columns(rows.T)
