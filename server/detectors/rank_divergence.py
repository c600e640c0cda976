"""rank_divergence: one rank's loss far from the other ranks' at the same step, sustained.

Rationale
---------
Data-parallel ranks train one model on different slices of the same data, so their
losses at a step scatter around a common value. A rank whose loss sits far outside
that scatter step after step is seeing different data (a corrupted shard, a broken
augmentation, wrong labels, a preprocessing bug on one host) or computing differently
(a faulty device); averaged into the global gradient it degrades the model quietly,
and rank 0's logs never show it. Once every rank has reported a step, each rank's
loss gets a robust z-score across ranks:

    z = (loss − median) / max(1.4826 × MAD, rel_floor × |median|, abs_floor)

Median and MAD are not moved by the outlier itself; the floors stop ranks whose losses
happen to agree closely (MAD ≈ 0) from making ordinary noise look extreme. A rank
fires after `consecutive` complete steps in a row with |z| > z_threshold and clears
after `resolve_after` steps back inside. At least `min_ranks` ranks (3: with two,
neither is "the odd one out") with a finite loss are needed.

A cross-rank z-score needs a majority: with two ranks, or with four ranks of which two
went bad, the median sits between the groups and nobody is "far". So a second rule
judges each rank against **its own past**: every rank keeps a robust baseline of its
own recent losses at complete steps (`own_window`, admitting only losses that were not
departures, after `own_min_steps` of warm-up), and its own z-score is

    s = (loss − own median) / max(1.4826 × own MAD, rel_floor × |own median|, abs_floor)

A rank whose s exceeds z_threshold while at least one other rank's s stays at or below
it (its loss rose, the others' did not) counts a departure step; `consecutive` such steps
in a row fire it, whatever the world size or the majority. Ranks that rise together
(a learning-rate jump, a hard stretch of shared data) name nobody: that is the loss
detectors' fault, not one rank's. Only rises count: training lowers every rank's loss
below its own recent median. Once firing, a rank stays firing while either rule holds
(its baseline admitted nothing since it departed), and clears after `resolve_after`
complete steps with neither. A bad rank's gradients degrade the shared model, so the
healthy ranks' losses rise too, later and less: they were calm when the bad rank
departed, and a rank never starts while no other rank is calm.

What is compared: the loss only. The gradient statistics a rank reports are taken
after the data-parallel all-reduce (identical on every DDP rank) or of its own shard
(FSDP: different by design), so across ranks they carry no divergence signal; a
non-finite loss is the non_finite detector's.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["MAD_TO_SIGMA", "PENDING_STEPS", "SPEC", "RankDivergenceConfig", "RankDivergenceDetector", "robust_z"]

MAD_TO_SIGMA = 1.4826
#: Steps waiting for the other ranks' losses; older ones are dropped (a rank that stopped reporting). The agent
#: writes up to 64 reports at once (sender.PUSH_BATCH_FRAMES), so on a fast job one rank's reports of a step can
#: arrive a few batches after another's: 16 dropped most steps of a millisecond-step job.
PENDING_STEPS = 256


@dataclass(frozen=True)
class RankDivergenceConfig(DetectorConfig):
    z_threshold: float = setting(6.0, doc="A rank's |robust z-score| across ranks above this is divergent.", gt=0.0)
    rel_floor: float = setting(0.1, doc="The z-score's scale is at least this fraction of |median loss| ...", ge=0.0)
    abs_floor: float = setting(1e-6, doc="... and at least this (absolute loss units).", gt=0.0)
    consecutive: int = setting(5, doc="Complete steps in a row beyond the threshold before firing.", ge=1)
    resolve_after: int = setting(20, doc="Complete steps in a row inside before a rank clears.", ge=1)
    min_ranks: int = setting(3, doc="Ranks with a finite loss needed to judge a step.", ge=3)
    own_window: int = setting(50, doc="Own-baseline rule: each rank's recent admitted losses (complete steps).", ge=5)
    own_min_steps: int = setting(20, doc="Complete steps that only build each rank's own baseline.", ge=3)

    def _check(self) -> None:
        if self.own_min_steps > self.own_window:
            raise SettingError("own_min_steps", f"must be ≤ own_window ({self.own_window}), got {self.own_min_steps}")


def robust_z(values: np.ndarray, rel_floor: float, abs_floor: float) -> tuple[np.ndarray, float, float]:
    """Robust z-scores of `values` (finite) across their median; also the median and the MAD."""
    median = median_of(values)
    mad = median_of(np.abs(values - median))
    scale = max(MAD_TO_SIGMA * mad, rel_floor * abs(median), abs_floor)
    return (values - median) / scale, median, mad


class RankDivergenceDetector:
    """Robust z-score of every rank's loss across ranks, per complete step (see module docstring)."""

    def __init__(self, config: RankDivergenceConfig) -> None:
        self._config = config
        #: step -> (loss per rank, NaN until reported; [ranks reported so far])
        self._pending: collections.OrderedDict[int, tuple[np.ndarray, list[int]]] = collections.OrderedDict()
        self._far_streak = np.zeros(0, dtype=np.int64)
        self._near_streak = np.zeros(0, dtype=np.int64)
        self._firing = np.zeros(0, dtype=bool)
        # Own-baseline rule: per rank, a ring of admitted losses (NaN: empty slot), its fill and write position.
        self._own = np.full((0, config.own_window), np.nan)
        self._own_count = np.zeros(0, dtype=np.int64)
        self._own_streak = np.zeros(0, dtype=np.int64)
        self._own_median = np.zeros(0)

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        size = ranks.size
        pending = self._pending.get(report.step)
        if pending is None or pending[0].size != size:
            pending = self._pending[report.step] = (np.full(size, np.nan), [0])
            while len(self._pending) > PENDING_STEPS:
                self._pending.popitem(last=False)
        losses, reported = pending
        if report.rank >= size or not np.isnan(losses[report.rank]):
            return ()  # a resent report of a step already counted
        # An absent loss counts as reported (it just is not judged): NaN marks "not yet", -inf "no loss".
        losses[report.rank] = report.loss if report.loss is not None and math.isfinite(report.loss) else -math.inf
        reported[0] += 1
        if reported[0] < size:
            return ()  # O(1) per report; the O(ranks) judgement runs once per complete step
        del self._pending[report.step]
        return self._judge(losses, report.step, ranks)

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        return ()  # judged per complete step

    def _judge(self, losses: np.ndarray, step: int, ranks: RankTable) -> Sequence[Finding]:
        cfg = self._config
        self._fit(losses.size)
        judged = np.isfinite(losses)
        far = np.zeros(losses.size, dtype=bool)
        z = np.zeros(losses.size)
        median = mad = math.nan
        if judged.sum() >= cfg.min_ranks:
            z[judged], median, mad = robust_z(losses[judged], cfg.rel_floor, cfg.abs_floor)
            far = judged & (np.abs(z) > cfg.z_threshold)
        own, departed = self._own_rule(losses, judged)
        self._far_streak = np.where(far, self._far_streak + 1, 0)
        self._own_streak = np.where(departed, self._own_streak + 1, 0)
        odd = far | (self._firing & (own > cfg.z_threshold))
        self._near_streak = np.where(odd | ~judged, 0, self._near_streak + 1)
        starting = ~self._firing & ((self._far_streak >= cfg.consecutive) | (self._own_streak >= cfg.consecutive))
        ending = self._firing & (self._near_streak >= cfg.resolve_after)
        self._firing = (self._firing | starting) & ~ending
        findings = [Finding(int(r), Clear(step=step)) for r in np.flatnonzero(ending)]
        for rank in np.flatnonzero(self._firing & (odd | starting)):
            where = ranks.describe(np.array([rank]))
            if far[rank]:
                summary = (
                    f"loss on {where} is {z[rank]:+.1f} robust z-scores from the other ranks at step {step}: "
                    f"{losses[rank]:.4g} vs median {median:.4g} (MAD {mad:.3g}) over {int(judged.sum())} ranks, "
                    f"for {int(self._far_streak[rank])} steps in a row"
                )
                value = float(z[rank])
            else:
                others = np.delete(np.arange(losses.size), rank)
                summary = (
                    f"loss on {where} left its own baseline at step {step}: {losses[rank]:.4g}, {own[rank]:+.1f} "
                    f"robust z-scores above its recent median {float(self._own_median[rank]):.4g}, while the other "
                    f"ranks' losses ({', '.join(f'{losses[o]:.4g}' for o in others[:4])}) stayed within theirs"
                )
                value = float(own[rank])
            findings.append(Finding(int(rank), Fire(step=step, value=value, summary=summary)))
        return findings

    def _own_rule(self, losses: np.ndarray, judged: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each rank's z-score against its own baseline (0 while warming up) and which ranks departed this step
        while another rank stayed within its own; admits the losses that did not depart."""
        cfg = self._config
        ready = judged & (self._own_count >= cfg.own_min_steps)
        # Unfilled slots are NaN; a row with no admitted loss yet reads 0 (and is not ready).
        median = np.zeros(losses.size)
        mad = np.zeros(losses.size)
        rows = np.flatnonzero(ready)
        if rows.size:
            median[rows] = np.nanmedian(self._own[rows], axis=1)
            mad[rows] = np.nanmedian(np.abs(self._own[rows] - median[rows, None]), axis=1)
        scale = np.maximum(np.maximum(MAD_TO_SIGMA * mad, cfg.rel_floor * np.abs(median)), cfg.abs_floor)
        own = np.where(ready, (np.where(judged, losses, 0.0) - median) / scale, 0.0)
        self._own_median = median
        rose = ready & (own > cfg.z_threshold)
        calm = ready & ~rose
        # Departed: rose while at least one other judged rank stayed calm.
        departed = rose & ((calm.sum() - calm) > 0)
        admit = judged & ~rose & ~self._firing
        slots = self._own_count % cfg.own_window
        rows = np.flatnonzero(admit)
        self._own[rows, slots[rows]] = losses[rows]
        self._own_count[rows] += 1
        return own, departed

    def _fit(self, size: int) -> None:
        extra = size - self._firing.size
        if extra > 0:
            self._far_streak = np.concatenate([self._far_streak, np.zeros(extra, dtype=np.int64)])
            self._near_streak = np.concatenate([self._near_streak, np.zeros(extra, dtype=np.int64)])
            self._firing = np.concatenate([self._firing, np.zeros(extra, dtype=bool)])
            self._own_streak = np.concatenate([self._own_streak, np.zeros(extra, dtype=np.int64)])
            self._own_count = np.concatenate([self._own_count, np.zeros(extra, dtype=np.int64)])
            self._own = np.vstack([self._own, np.full((extra, self._config.own_window), np.nan)])


SPEC = DetectorSpec(
    name="rank_divergence",
    severity="warning",
    description="One rank's loss far from the other ranks' at the same steps (bad data or a faulty device).",
    config_type=RankDivergenceConfig,
    factory=lambda config: RankDivergenceDetector(config),
    scope="run",
)
