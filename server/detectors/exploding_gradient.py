"""exploding_gradient: a rank's gradient norm far above its own recent, robust baseline.

Rationale
---------
Exploding gradients precede loss spikes and NaNs by a few steps; clipping hides the
symptom in the update but not in the pre-clip norm the agent reports. A fixed
threshold cannot work across models (healthy norms range from 1e-3 to 1e3), so each
rank is compared with a robust baseline of its own recent finite norms: the median
and the MAD (scaled by 1.4826 to estimate a standard deviation) over the last
`window` reports. Median and MAD ignore isolated spikes, and only reports taken
while the rank is not firing (and not over threshold) enter the baseline, so an
explosion cannot absorb itself into "normal".

Fires when the norm exceeds max(factor × median, median + mad_k × 1.4826 × MAD) for
`consecutive` reports in a row (one spike is noise; two is a trend), or on sustained
growth: over the last `growth_window` reports the norm rose on ≥ growth_rise_fraction
of them and its log-linear trend grew ≥ growth_factor× across the window (a steady
climb that a lagging baseline might follow; the trend, not last/first, so one final
spike after a slightly rising stretch is not "growth"). The first `min_reports` reports only build the baseline: early
training often starts with large gradients. A non-finite norm is left to the
non_finite detector. Three floors keep noisy, converged or dead runs quiet. Small batches near zero loss
have gradient norms spread over orders of magnitude (a CNN on batches of 8 measured 0.005 to 2.9, a
log-space spread of 1.75), so the norm must also exceed exp(median + log_k × 1.4826 × MAD) of the
baseline's log norms: multiplicative noise is judged on the multiplicative scale (that healthy CNN's
largest jumps measured 2 robust log-deviations, a real explosion 7 to 12 in its first two reports; on runs
with tight norms the bound is below factor × median and changes nothing). And a norm must exceed `start_fraction` of
the run's starting norm (the median of its first `min_reports`: a classifier near zero loss has gradients
of 1e-4 that jump tenfold on one hard example without anything exploding) and `min_norm` (a run whose
units all died has gradients of 1e-16 whose float noise is "thousands of times" its baseline).

A baseline cannot see a run that is broken from its first steps (a learning rate far too high from step 1):
the warm-up admits the explosion and the baseline calls it normal. So, from the first report on and after
the warm-up alike, a norm above `start_factor` × the rank's first positive norm fires too (the same
`consecutive` rule): the first norm is measured before any update, so it is the one value a runaway
optimizer cannot have moved. The healthy catalogue runs (MLP, CNN, GRU, transformer; SGD, Adam, warm-up
and cosine schedules) peak at 1 to 6.4× it; three orders of magnitude above it is a run blowing up,
whatever the model's scale.
Resolves after `resolve_after` consecutive normal reports.
"""

from __future__ import annotations

import collections
import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import MAD_TO_SIGMA, median_sigma
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.detectors.sorted_ring import (
    SortedRing,
    insert_finite,
    mad_of_sorted,
    median_of_sorted,
    remove_finite,
)
from gradwatch.server.report import RankReport
from gradwatch.server.ring import FloatRing
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "ExplodingGradientConfig", "ExplodingGradientDetector"]


@dataclass(frozen=True)
class ExplodingGradientConfig(DetectorConfig):
    window: int = setting(100, doc="Recent finite, non-firing norms forming the baseline.", ge=5)
    min_reports: int = setting(20, doc="Reports that only build the baseline (warm-up).", ge=3)
    factor: float = setting(10.0, doc="Fire above factor × baseline median ...", gt=1.0)
    mad_k: float = setting(20.0, doc="... and above median + mad_k × 1.4826 × MAD.", ge=0.0)
    consecutive: int = setting(2, doc="Reports in a row over the threshold before firing.", ge=1)
    growth_window: int = setting(16, doc="Reports examined by the sustained-growth rule.", ge=3)
    growth_rise_fraction: float = setting(
        0.8, doc="Fraction of reports in growth_window that must rise.", gt=0.0, le=1.0
    )
    growth_factor: float = setting(100.0, doc="Growth across growth_window that fires.", gt=1.0)
    resolve_after: int = setting(20, doc="Consecutive normal reports before a rank clears.", ge=1)
    min_norm: float = setting(
        1e-6, doc="Norms at or below this are numerically zero: never an explosion, whatever the baseline.", ge=0.0
    )
    log_k: float = setting(
        3.0, doc="... and above exp(median + log_k × 1.4826 × MAD) of the log norms (heavy-tailed runs).", ge=0.0
    )
    start_fraction: float = setting(
        0.1,
        doc="Fire only above this fraction of the run's starting norm (median of its first min_reports).",
        ge=0.0,
    )

    start_factor: float = setting(
        1000.0,
        doc="From the first report on: fire above this × the rank's first positive norm (broken from the start).",
        gt=1.0,
    )

    def _check(self) -> None:
        if self.min_reports > self.window:
            raise SettingError("min_reports", f"must be ≤ window ({self.window}), got {self.min_reports}")


class _NormBaseline:
    """The baseline's norms kept sorted as they slide (`ring`: median and MAD), and the logs of its positive
    norms kept sorted too (`log_bound`): the same statistics as numpy over the held values, bit for bit."""

    __slots__ = ("_logs", "_sorted_logs", "ring")

    def __init__(self, window: int) -> None:
        self.ring = SortedRing(window)
        #: The log of the norm in the same ring slot (meaningless where that norm is not positive).
        self._logs = np.zeros(window)
        self._sorted_logs: list[float] = []

    def append(self, norm: float) -> None:
        """Add a finite norm (the oldest leaves a full window)."""
        ring = self.ring
        slot = ring.count % ring.capacity
        if ring.full and ring.unordered()[slot] > 0.0:
            remove_finite(self._sorted_logs, float(self._logs[slot]))
        if norm > 0.0:
            log = float(np.log(np.float64(norm)))  # numpy's log, as _log_bound takes it over the window
            self._logs[slot] = log
            insert_finite(self._sorted_logs, log)
        ring.append(norm)

    def log_bound(self, log_k: float) -> float:
        """`_log_bound(held norms, log_k)`, from the sorted logs."""
        logs = self._sorted_logs
        if not logs:
            return 0.0
        centre = median_of_sorted(logs, self._held_logs)
        spread = MAD_TO_SIGMA * mad_of_sorted(logs, centre)
        return math.exp(min(centre + log_k * spread, 700.0))

    def _held_logs(self) -> np.ndarray:
        held = self.ring.unordered()
        return np.log(held[held > 0.0])


class _Recent:
    """The last `growth_window` norms (`ring`) and how many of their consecutive differences are rises, counted
    as the window slides (`np.count_nonzero(np.diff(ring.values()) > 0)` without a numpy call per report)."""

    __slots__ = ("_newest", "_steps", "ring", "rises")

    def __init__(self, window: int) -> None:
        self.ring = FloatRing(window)
        self._steps: collections.deque[bool] = collections.deque(maxlen=window - 1)  # rise of each pair, oldest first
        self._newest = 0.0
        self.rises = 0

    def append(self, norm: float) -> None:
        if self.ring.count:
            steps = self._steps
            if len(steps) == steps.maxlen:  # the oldest pair leaves with the oldest norm
                self.rises -= steps[0]
            rise = norm > self._newest
            steps.append(rise)
            self.rises += rise
        self._newest = norm
        self.ring.append(norm)

    def may_grow(self, fraction: float) -> bool:
        """The window is full and at least `fraction` of its differences rise: the growth rule's first test."""
        return self.ring.full and float(self.rises) / (self.ring.capacity - 1) >= fraction


@dataclass
class _RankState:
    baseline: _NormBaseline
    recent: _Recent
    start: float = 0.0
    #: The rank's first positive finite norm (taken before any update): the runaway rule's reference.
    first: float = 0.0


class ExplodingGradientDetector:
    """Per-rank robust-baseline and sustained-growth checks on the gradient norm."""

    def __init__(self, config: ExplodingGradientConfig) -> None:
        self._config = config
        self._latch = Latch(consecutive=config.consecutive, resolve_after=config.resolve_after)
        self._ranks: defaultdict[int, _RankState] = defaultdict(
            lambda: _RankState(_NormBaseline(config.window), _Recent(config.growth_window))
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        norm = report.grad_norm
        if not math.isfinite(norm):
            return None  # non_finite owns this report
        cfg = self._config
        state = self._ranks[report.rank]
        state.recent.append(norm)
        if state.first <= 0.0 and norm > 0.0:
            state.first = norm
        runaway = state.first > 0.0 and norm > max(cfg.start_factor * state.first, cfg.min_norm)
        baseline = state.baseline
        if baseline.ring.count < cfg.min_reports:
            baseline.append(norm)
            if baseline.ring.count == cfg.min_reports:
                state.start = median_of(baseline.ring.values())
            return self._warming(report, norm, runaway)

        median = baseline.ring.median()
        if median <= 0.0:
            # A baseline of zero gradients (frozen or not yet training) gives no scale to judge by.
            baseline.append(norm)
            return None
        if self._quiet(state, norm, median):
            kind = self._latch.judge(report.rank, runaway, still=runaway)
            if kind == FIRE:  # (only a runaway fires here, and it is under the threshold)
                return self._fire_runaway(report, norm, state.first)
            over = runaway
        else:
            mad = baseline.ring.mad(median)
            floor = max(cfg.min_norm, cfg.start_fraction * state.start, baseline.log_bound(cfg.log_k))
            threshold = max(cfg.factor * median, median + cfg.mad_k * MAD_TO_SIGMA * mad, floor)
            over = norm > threshold or runaway
            growth = self._growth(state.recent) if norm > floor else None
            kind = self._latch.judge(report.rank, over, still=over or growth is not None, now=growth is not None)
            if kind == FIRE:
                if runaway and norm <= threshold:
                    return self._fire_runaway(report, norm, state.first)
                return self._fire(report, norm, median, mad, threshold, growth)
        if kind == CLEAR:
            return Clear(step=report.step)
        if not self._latch.firing(report.rank) and not over:
            baseline.append(norm)  # a lone spike stays out of the baseline
        return None

    def _quiet(self, state: _RankState, norm: float, median: float) -> bool:
        """Most reports: under the threshold (at least factor × median) and too few rises for the growth rule, so
        only the runaway rule can judge; the MAD and the log bound are not needed."""
        cfg = self._config
        return norm <= cfg.factor * median and not state.recent.may_grow(cfg.growth_rise_fraction)

    def _warming(self, report: RankReport, norm: float, runaway: bool) -> Verdict | None:
        """A warm-up report: only the runaway rule judges it (the baseline is not ready)."""
        kind = self._latch.judge(report.rank, runaway)
        if kind == FIRE:
            return self._fire_runaway(report, norm, self._ranks[report.rank].first)
        if kind == CLEAR:
            return Clear(step=report.step)
        return None

    def _fire_runaway(self, report: RankReport, norm: float, first: float) -> Fire:
        summary = (
            f"gradient norm {norm:.3g} on rank {report.rank} at step {report.step} is {norm / first:.3g}× the "
            f"rank's first norm {first:.3g} (> {self._config.start_factor:g}×): the run has been blowing up "
            f"since its first steps (learning rate or loss scale far too large), before any baseline could form"
        )
        return Fire(step=report.step, value=norm, summary=summary)

    def _growth(self, recent: _Recent) -> float | None:
        """Trend growth across the window when the sustained-growth rule holds, else None."""
        cfg = self._config
        if not recent.may_grow(cfg.growth_rise_fraction):
            return None
        values = recent.ring.values()
        if values.min() <= 0.0:
            return None
        # Least-squares slope of log(norm) over the window: growth = exp(slope × span).
        logs = np.log(values)
        x = np.arange(values.size, dtype=np.float64) - (values.size - 1) / 2.0
        slope = float(np.dot(x, logs - logs.mean()) / np.dot(x, x))
        ratio = math.exp(min(slope * (values.size - 1), 700.0))
        return ratio if ratio >= cfg.growth_factor else None

    def _fire(
        self,
        report: RankReport,
        norm: float,
        median: float,
        mad: float,
        threshold: float,
        growth: float | None,
    ) -> Fire:
        baseline = f"baseline median {median:.3g}, MAD {mad:.3g}, threshold {threshold:.3g}"
        if norm > threshold:
            summary = (
                f"gradient norm {norm:.3g} on rank {report.rank} at step {report.step} is "
                f"{norm / median:.0f}× the baseline median ({baseline})"
            )
        else:
            summary = (
                f"gradient norm on rank {report.rank} grew {growth:.0f}× over the last "
                f"{self._config.growth_window} reports to {norm:.3g} at step {report.step} ({baseline})"
            )
        return Fire(step=report.step, value=norm, summary=summary)


def _log_bound(held: np.ndarray, log_k: float) -> float:
    """exp(median + log_k × 1.4826 × MAD) of the log of the positive baseline norms (0 when there are none).
    What `_NormBaseline.log_bound` computes from its sorted logs (the property tests compare the two)."""
    positive = held[held > 0.0]
    if positive.size == 0:
        return 0.0
    logs = np.log(positive)
    centre, spread = median_sigma(logs)
    return math.exp(min(centre + log_k * spread, 700.0))


SPEC = DetectorSpec(
    name="exploding_gradient",
    severity="critical",
    description="Gradient norm far above the rank's robust recent baseline, or growing steadily.",
    config_type=ExplodingGradientConfig,
    factory=lambda config: ExplodingGradientDetector(config),
    # Exploding gradients make the loss jump or diverge and the updates too large: one page, for the cause.
    inhibits=("loss_spike", "loss_divergence", "update_ratio"),
)
