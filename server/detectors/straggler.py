"""straggler: a rank persistently slower than its peers.

Rationale
---------
In synchronous data-parallel training the slowest rank sets everyone's pace: a 5 %
slow host costs 5 % of the whole job, and nobody sees it, because every rank's step
*duration* is the same (the fast ranks wait for the slow one in the all-reduce). What
differs is where the time goes: the straggler spends it working, the others waiting.
The agent reports, per step, `between_collectives_s`: the time the rank worked between
collectives (from the previous collective's completion to its arrival at the next, summed
over the step's collectives, measured by its DDP communication hook, agent/collectives.py),
wherever in the step the work sits: data loading, forward, backward, optimizer, host work
after `optimizer.step()`. The fast ranks arrive early and then wait about
max(between) − own between in the collectives, so each rank's busy time is

    busy = median step time − (max over ranks of median between − own median between)

(clipped to [0, step time]; both medians over the rank's last 16 reports). Without that
measure on every live rank (no DDP hook: another wrapper, or the user's own comm hook)
`pre_forward_s` stands in for it (the time from the previous step to the first forward
pass, which sees only the work before the forward); without either, e.g. a model never
called through its forward, busy is the step time, which is right for unsynchronised ranks.
The straggler score, as in NVIDIA's resiliency extension, is the peers' median busy time over the rank's own: 1 for a
rank in step with the others, below `threshold` (0.75) for a straggler. It must hold
for `consecutive` evaluations (one per server tick, about a second) in a row; a rank
clears after `resolve_after` evaluations at or above the threshold. With only pre-forward
times, slowness after the forward pass starts is not seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.robust import peer_medians
from gradwatch.server.ranktable import TIMING_WINDOW, RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "StragglerConfig", "StragglerDetector"]


@dataclass(frozen=True)
class StragglerConfig(DetectorConfig):
    threshold: float = setting(
        0.75, doc="A rank whose score (peers' median busy time / own) is below this is straggling.", gt=0.0, lt=1.0
    )
    min_reports: int = setting(
        8, doc="Reports a rank must have sent before it is judged (or counts as a peer).", ge=1, le=TIMING_WINDOW
    )
    consecutive: int = setting(10, doc="Evaluations (one per server tick) in a row below the threshold.", ge=1)
    resolve_after: int = setting(10, doc="Evaluations in a row at or above the threshold before a rank clears.", ge=1)


class StragglerDetector:
    """Scores every rank's busy time against its peers' on each tick (see module docstring)."""

    def __init__(self, config: StragglerConfig) -> None:
        self._config = config
        self._slow_streak = np.zeros(0, dtype=np.int64)
        self._ok_streak = np.zeros(0, dtype=np.int64)
        self._firing = np.zeros(0, dtype=bool)

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        return ()  # judged on ticks: timings are medians over many reports, evaluating per report adds nothing

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        cfg = self._config
        self._fit(ranks.size)
        live = ranks.live(cfg.min_reports)
        step_time = ranks.step_time()
        live &= np.isfinite(step_time) & (step_time > 0)
        score = np.full(ranks.size, np.inf)
        busy = np.full(ranks.size, np.nan)
        if live.sum() >= 2:
            ready = self._ready(ranks, live)
            wait = np.clip(ready[live].max() - ready[live], 0.0, step_time[live])
            busy[live] = step_time[live] - wait
            peers = peer_medians(busy[live])
            with np.errstate(divide="ignore", invalid="ignore"):
                score[live] = np.where(busy[live] > 0, peers / busy[live], np.inf)
        slow = live & (score < cfg.threshold)
        self._slow_streak = np.where(slow, self._slow_streak + 1, 0)
        self._ok_streak = np.where(slow, 0, self._ok_streak + 1)
        starting = ~self._firing & (self._slow_streak >= cfg.consecutive)
        ending = self._firing & ~slow & ((self._ok_streak >= cfg.resolve_after) | ~live)
        self._firing = (self._firing | starting) & ~ending
        findings = [Finding(int(r), Clear(step=int(ranks.last_step[r]))) for r in np.flatnonzero(ending)]
        for rank in np.flatnonzero(self._firing & slow):
            others = live.copy()
            others[rank] = False
            summary = (
                f"{ranks.describe(np.array([rank]))} is a straggler: score {score[rank]:.2f} (< {cfg.threshold:g}) "
                f"for {int(self._slow_streak[rank])} evaluations; it is busy {busy[rank]:.3g} s per step while its "
                f"{int(others.sum())} peers' median is {float(np.median(busy[others])):.3g} s (step time "
                f"{step_time[rank]:.3g} s; the peers wait for it)"
            )
            findings.append(Finding(int(rank), Fire(step=int(ranks.last_step[rank]), value=float(score[rank]),
                                                    summary=summary)))  # fmt: skip
        return findings

    @staticmethod
    def _ready(ranks: RankTable, live: np.ndarray) -> np.ndarray:
        """Each rank's work before it can join its peers in the step's collectives: the time worked between
        collectives when every live rank measured it (the agent's DDP hook), else the pre-forward time."""
        board = ranks.collectives
        board.fit(ranks.size)
        between = board.between_time()
        if np.isfinite(between[live]).all():
            return np.nan_to_num(between, nan=0.0)
        return np.nan_to_num(ranks.pre_forward_time(), nan=0.0)

    def _fit(self, size: int) -> None:
        extra = size - self._firing.size
        if extra > 0:
            self._slow_streak = np.concatenate([self._slow_streak, np.zeros(extra, dtype=np.int64)])
            self._ok_streak = np.concatenate([self._ok_streak, np.zeros(extra, dtype=np.int64)])
            self._firing = np.concatenate([self._firing, np.zeros(extra, dtype=bool)])


SPEC = DetectorSpec(
    name="straggler",
    severity="warning",
    description="A rank persistently slower than its peers (it holds the whole job back).",
    config_type=StragglerConfig,
    factory=lambda config: StragglerDetector(config),
    # A straggler slows the whole run: its alert explains the throughput drop.
    inhibits=("throughput_drop",),
    scope="run",
    observes=False,
)
