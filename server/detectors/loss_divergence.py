"""loss_divergence: the loss has climbed far above the run's own baseline and stays there, or keeps rising.

Rationale
---------
A diverging run (learning rate too high, a bad batch that wrecked the weights, an optimizer state blown
up) burns accelerator time until someone looks at a chart; it pages, because waiting rarely fixes it.
What separates divergence from a loss spike is persistence, so this detector never judges one report:

* **level**: the median of the last `duration` losses exceeds the baseline median by the largest of
  (factor − 1) × |median|, mad_k × 1.4826 × MAD and min_rise × the starting loss level. The baseline is
  the rank's recent losses (`window`), admitting only those that were not abnormal, so an excursion
  never becomes "normal"; the starting level (the larger of the first loss and the median of the first
  `min_reports` losses: a run that converges within its warm-up has a tiny median there, its first loss
  says what the task's losses are) keeps a converged run, whose loss is tiny and whose relative noise is
  large, from paging on harmless wiggles.
* **trend**: over the last `trend_window` losses, the medians of four consecutive blocks rise block
  after block and the last is at least `trend_factor` × the first, and above the baseline threshold's
  min_rise margin: a steady climb, caught before it reaches the level rule.

* **runaway from the start**: the median of the last `duration` losses (at least three) exceeds the
  rank's first loss by (start_factor − 1) × |first loss|. A baseline cannot judge a run that is broken
  from its first steps (its warm-up admits the catastrophe as normal); the first loss is taken before any
  update, so no runaway optimizer can have moved it. Training lowers the loss from its untrained value
  (the healthy catalogue runs peak at 1 to 1.7× it); two orders of magnitude above it is a broken run at
  any scale. This rule also judges the warm-up.

The first `min_reports` losses only build the baseline (only the runaway rule judges them). Non-finite
losses belong to non_finite (which inhibits this detector). Resolves after `resolve_after` consecutive
reports with neither rule holding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import LossBaseline
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.detectors.sorted_ring import SortedRing
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "LossDivergenceConfig", "LossDivergenceDetector"]


@dataclass(frozen=True)
class LossDivergenceConfig(DetectorConfig):
    window: int = setting(200, doc="Recent admitted losses forming the baseline.", ge=10)
    min_reports: int = setting(
        30, doc="Losses that only build the baseline (warm-up); their median is the starting level.", ge=5
    )
    factor: float = setting(3.0, doc="Level rule: recent median above factor × baseline median ...", gt=1.0)
    mad_k: float = setting(10.0, doc="... and above median + mad_k × 1.4826 × MAD ...", ge=0.0)
    min_rise: float = setting(0.2, doc="... and at least min_rise × the starting loss level above the median.", ge=0.0)
    duration: int = setting(10, doc="Recent losses whose median the level rule judges (persistence).", ge=1)
    trend_window: int = setting(80, doc="Losses the trend rule examines (four blocks).", ge=8)
    trend_factor: float = setting(2.0, doc="Trend rule: last block median ≥ this × the first block median.", gt=1.0)
    resolve_after: int = setting(20, doc="Consecutive normal reports before a rank clears.", ge=1)
    start_factor: float = setting(
        100.0,
        doc="Runaway rule, from the first reports on: recent median above this × the rank's first loss.",
        gt=1.0,
    )

    def _check(self) -> None:
        if self.min_reports > self.window:
            raise SettingError("min_reports", f"must be ≤ window ({self.window}), got {self.min_reports}")
        if self.duration > self.trend_window:
            raise SettingError("duration", f"must be ≤ trend_window ({self.trend_window}), got {self.duration}")


#: SortedRing slice of the last `duration` losses (after the four trend blocks).
_TAIL = 4


@dataclass
class _RankState:
    baseline: LossBaseline
    recent: SortedRing
    #: The rank's first finite, non-zero loss (before any update): the runaway rule's reference.
    first: float | None = None


class LossDivergenceDetector:
    """Per-rank level and trend rules on the loss (module docstring)."""

    def __init__(self, config: LossDivergenceConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)
        block, span = config.trend_window // 4, config.trend_window
        # The trend rule's four blocks (the first 4 × block losses of the window) and the last `duration`.
        slices = (*((i * block, (i + 1) * block) for i in range(4)), (span - config.duration, span))
        self._ranks: defaultdict[int, _RankState] = defaultdict(
            lambda: _RankState(
                LossBaseline(config.window, config.min_reports, sorted_window=True),
                SortedRing(span, slices, whole=False),
            )
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        loss = report.loss
        if loss is None or not math.isfinite(loss):
            return None  # no loss, or non_finite's
        cfg = self._config
        state = self._ranks[report.rank]
        recent = state.recent
        recent.append(loss)
        if state.first is None and loss != 0.0:
            state.first = loss
        # The median of the last `duration` losses: what the runaway and the level rules judge (taken once).
        tail = self._tail_median(recent) if recent.count >= min(3, cfg.duration) else None
        runaway = self._runaway(tail, state.first)
        if not state.baseline.ready:
            state.baseline.warm(loss)
            kind = self._latch.judge(report.rank, runaway is not None)
            if kind == FIRE and runaway is not None and state.first is not None:
                return self._fire_runaway(report, runaway, state.first)
            return Clear(step=report.step) if kind == CLEAR else None
        level = tail if tail is not None and recent.count >= cfg.duration else -math.inf
        # A level and a loss at or under the least the threshold can be are under it: every use of the threshold
        # below (level above it, the loss admitted under it; the summary names it only for a level above it)
        # then answers the same with that bound, and the MAD is not taken (most reports).
        median, threshold = state.baseline.least_threshold(cfg.factor, cfg.min_rise)
        if not (level <= threshold and loss <= threshold):
            median, threshold = state.baseline.threshold(cfg.factor, cfg.mad_k, cfg.min_rise)
        growth = self._trend(recent, median, state.baseline.scale)
        kind = self._latch.judge(report.rank, level > threshold or growth is not None or runaway is not None)
        if kind == FIRE:
            if runaway is not None and state.first is not None and not level > threshold and growth is None:
                return self._fire_runaway(report, runaway, state.first)
            return self._fire(report, level, median, threshold, growth)
        if kind == CLEAR:
            return Clear(step=report.step)
        if not self._latch.firing(report.rank) and loss <= threshold:
            state.baseline.window.append(loss)
        return None

    def _tail_median(self, recent: SortedRing) -> float:
        """Median of the last `duration` held losses (all of them while fewer are held)."""
        if recent.full:
            return recent.slice_median(_TAIL)
        return median_of(recent.values()[-self._config.duration :])

    def _runaway(self, tail: float | None, first: float | None) -> float | None:
        """`tail` (the median of the last `duration` losses, three at least; None while fewer are held) when
        it is start_factor × above the first loss, else None."""
        if first is None or tail is None:
            return None
        return tail if tail - first > (self._config.start_factor - 1.0) * abs(first) else None

    def _fire_runaway(self, report: RankReport, level: float, first: float) -> Fire:
        summary = (
            f"loss ran away on rank {report.rank} at step {report.step}: the median of the last losses is "
            f"{level:.4g}, far above the rank's first loss {first:.4g} (> {self._config.start_factor:g}×): broken "
            f"since its first steps (learning rate far too large?), before any baseline could form"
        )
        return Fire(step=report.step, value=level, summary=summary)

    def _trend(self, recent: SortedRing, median: float, initial: float) -> float | None:
        """Growth first → last block when the four block medians rise steadily, else None."""
        cfg = self._config
        if not recent.full:
            return None
        # Finite losses: b1 > b0 exactly when b1 − b0 > 0 (the difference of two floats never rounds to 0). Each
        # block's median is taken only while the blocks before it rise (a falling loss stops at the second).
        b0 = recent.slice_median(0)
        if b0 <= 0.0:
            return None
        b1 = recent.slice_median(1)
        if not b0 < b1:
            return None
        b2 = recent.slice_median(2)
        if not b1 < b2:
            return None
        b3 = recent.slice_median(3)
        if not b2 < b3:
            return None
        growth = b3 / b0
        if growth < cfg.trend_factor or b3 - median < cfg.min_rise * abs(initial):
            return None
        return growth

    def _fire(self, report: RankReport, level: float, median: float, threshold: float, growth: float | None) -> Fire:
        where = f"on rank {report.rank} at step {report.step}"
        if level > threshold:
            summary = (
                f"loss diverged {where}: the median of the last {self._config.duration} losses is {level:.4g}, "
                f"{level / median:.1f}× the baseline median {median:.4g} (threshold {threshold:.4g})"
                if median > 0
                else f"loss diverged {where}: recent median {level:.4g} above threshold {threshold:.4g}"
            )
            return Fire(step=report.step, value=level, summary=summary)
        summary = (
            f"loss rising steadily {where}: it grew {growth:.1f}× over the last {self._config.trend_window} "
            f"reports (baseline median {median:.4g})"
        )
        return Fire(step=report.step, value=report.loss, summary=summary)


SPEC = DetectorSpec(
    name="loss_divergence",
    severity="critical",
    description="Loss far above the rank's robust baseline for a sustained stretch, or rising steadily.",
    config_type=LossDivergenceConfig,
    factory=lambda config: LossDivergenceDetector(config),
    # A diverging loss also jumps: one page, for the divergence.
    inhibits=("loss_spike",),
)
