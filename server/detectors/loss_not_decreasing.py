"""loss_not_decreasing: the loss made no progress over a window, while it is still far from where it started.

Rationale
---------
SageMaker Debugger's LossNotDecreasing asks for a 0.1 % drop every 10 steps; on small noisy batches
that fires all the time, and on a converged run it is always true. This detector compares robust
levels instead: the median of the last `smooth` losses against the median of the `smooth` losses at
the start of a sliding `window` (by default its two halves, 100 losses each, so the noise of small
batches averages out). Progress is missing when that relative improvement is below `min_improvement`, and present again
only above twice that (hysteresis: in between, nothing changes). A run whose loss has already fallen
below `settled` × its starting level (median of its first `start_reports` losses) is converging and
left alone: a plateau there is the usual noise floor, and
paging on it would teach people to mute the detector. So it catches a plateau from the start (a
learning rate of zero, a detached loss, frozen weights, labels that cannot be learned) and learning
that stalled early, before the loss had fallen by 30 %. (At 0.5, a healthy ReLU MLP on batches of four
with noisy targets reached its noise floor at 49 % progress in one seed of ten.)

Relative improvement alone measures progress against a loss floor of zero. A language model's cross-entropy
falls towards the data's entropy, far above zero (pytorch/examples' word_language_model Transformer at lr 5:
9.1 → 6.35 over 310 batches, 4 % between the halves of its last window, falling every batch), so a steady
fall is progress whatever its size relative to the loss: the drop between the two levels is also compared
with the noise around the window's linear trend (1.4826 × MAD of the residuals, σ), and a drop above
`significance` × its standard error (for medians of `smooth` values, 1.2533 × σ × √(2 / smooth)) is
progress. A plateau (a learning rate of zero, frozen weights) has a drop within its noise and still fires.

Fires when the condition has held for `consecutive` reports in a row (noise makes single judgements
flicker); resolves after `resolve_after` consecutive reports without it. Non-finite losses are skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from numpy.linalg import _umath_linalg

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import MAD_TO_SIGMA
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.detectors.sorted_ring import SortedRing
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "LossNotDecreasingConfig", "LossNotDecreasingDetector"]

#: Smallest loss scale a relative change is measured against (a loss of exactly 0 has no scale).
_TINY = 1e-12


@dataclass(frozen=True)
class LossNotDecreasingConfig(DetectorConfig):
    window: int = setting(200, doc="Losses between the two levels compared (the patience).", ge=4)
    smooth: int = setting(100, doc="Losses whose median is one level (start of window, end of window).", ge=1)
    start_reports: int = setting(10, doc="First losses whose median is the starting level.", ge=1)
    min_improvement: float = setting(
        0.05, doc="Relative drop of the level across the window below which there is no progress.", ge=0.0
    )
    settled: float = setting(
        0.7,
        doc="A run whose level is below settled × its starting level is converging: never judged.",
        gt=0.0,
        le=1.0,
    )
    significance: float = setting(
        4.0, doc="A drop above this many standard errors of the levels' difference is progress, however small.", ge=0.0
    )
    consecutive: int = setting(10, doc="Reports in a row without progress before firing.", ge=1)
    resolve_after: int = setting(10, doc="Consecutive reports with progress before a rank clears.", ge=1)

    def _check(self) -> None:
        if 2 * self.smooth > self.window:
            raise SettingError("smooth", f"must be ≤ window / 2 ({self.window // 2}), got {self.smooth}")
        if self.start_reports > self.window:
            raise SettingError("start_reports", f"must be ≤ window ({self.window}), got {self.start_reports}")


@dataclass
class _RankState:
    #: The window; slice 0 its first `smooth` losses, slice 1 its last `smooth` (kept sorted: the two levels).
    recent: SortedRing
    initial: float | None = None


class LossNotDecreasingDetector:
    """Per-rank comparison of robust loss levels across a sliding window (module docstring)."""

    def __init__(self, config: LossNotDecreasingConfig) -> None:
        self._config = config
        self._latch = Latch(consecutive=config.consecutive, resolve_after=config.resolve_after)
        halves = ((0, config.smooth), (config.window - config.smooth, config.window))
        self._ranks: defaultdict[int, _RankState] = defaultdict(
            lambda: _RankState(SortedRing(config.window, halves, whole=False))
        )
        self._trend = _LineFit(config.window)

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        loss = report.loss
        if loss is None or not math.isfinite(loss):
            return None
        cfg = self._config
        state = self._ranks[report.rank]
        state.recent.append(loss)
        if state.initial is None and state.recent.count == cfg.start_reports:
            state.initial = median_of(state.recent.values())
        if not state.recent.full or state.initial is None:
            return None
        start = state.recent.slice_median(0)
        level = state.recent.slice_median(1)
        improvement = (start - level) / max(abs(start), _TINY)
        progress = (state.initial - level) / max(abs(state.initial), _TINY)
        settled = progress >= 1.0 - cfg.settled
        # The trend fit only where it can change the verdict (no clear progress yet): not a fit per report. Between
        # no progress and clear progress it decides only between "progress" (over = False) and "in between"
        # (None), which a rank neither firing nor on a streak takes alike: no fit there either.
        unclear = not settled and improvement < 2.0 * cfg.min_improvement
        if unclear and improvement >= cfg.min_improvement and self._latch.at_rest(report.rank):
            unclear = False
        steady = unclear and self._significant_drop(state.recent.values(), start - level)
        stalled = improvement < cfg.min_improvement and not settled and not steady
        over: bool | None = None  # between no progress and clear progress: the streaks stay as they are
        if stalled:
            over = True
        elif settled or steady or improvement >= 2.0 * cfg.min_improvement:
            over = False
        kind = self._latch.judge(report.rank, over)
        if kind == FIRE:
            summary = (
                f"loss not decreasing on rank {report.rank} at step {report.step}: its median over the last "
                f"{cfg.smooth} reports is {level:.4g}, {improvement:+.1%} better than {cfg.window} reports earlier "
                f"and {progress:+.1%} better than at the start ({state.initial:.4g})"
            )
            return Fire(step=report.step, value=level, summary=summary)
        return Clear(step=report.step) if kind == CLEAR else None

    def _significant_drop(self, values: np.ndarray, drop: float) -> bool:
        """The levels' drop exceeds `significance` standard errors of the noise around the window's trend."""
        if drop <= 0.0:
            return False
        residuals = self._trend.residuals(values)
        sigma = MAD_TO_SIGMA * median_of(np.abs(residuals - median_of(residuals)))
        standard_error = 1.2533 * sigma * math.sqrt(2.0 / self._config.smooth)
        return drop > self._config.significance * max(standard_error, _TINY)


class _LineFit:
    """`np.polyfit(arange(n), values, 1)` and its residuals for windows of `n` values, bit for bit: the scaled
    Vandermonde matrix polyfit builds for every call depends on `n` only, so it is built once, and the same
    least-squares solve runs per call: numpy's lstsq kernel (the LAPACK driver np.linalg.lstsq calls, with the
    same matrix and rcond) without the wrapper's argument handling, which cost three times the solve. A solve
    that fails raises, as np.linalg.lstsq does (FloatingPointError instead of LinAlgError). A numpy without
    that kernel gets np.linalg.lstsq. tests/test_server_fast_statistics.py compares the residuals with
    np.polyfit's."""

    __slots__ = ("_lhs", "_rcond", "_scale", "_x")

    def __init__(self, n: int) -> None:
        self._x = np.arange(n, dtype=np.float64)
        lhs = np.vander(self._x + 0.0, 2)  # as np.polyfit(x, y, 1) builds it
        self._scale = np.sqrt((lhs * lhs).sum(axis=0))
        self._lhs = lhs / self._scale
        self._rcond = n * np.finfo(np.float64).eps

    def residuals(self, values: np.ndarray) -> np.ndarray:
        """values − (slope × x + intercept) of the least-squares line through (0..n−1, values)."""
        if _LSTSQ is None:
            coefficients = np.linalg.lstsq(self._lhs, values + 0.0, self._rcond)[0]
        else:
            with np.errstate(invalid="raise", over="ignore", divide="ignore", under="ignore"):
                coefficients = _LSTSQ(self._lhs, values[:, None] + 0.0, self._rcond, signature="ddd->ddid")[0][:, 0]
        slope, intercept = coefficients / self._scale
        return values - (slope * self._x + intercept)


#: numpy's least-squares gufunc for a tall matrix (numpy ≥ 2: lstsq; 1.x: lstsq_n), None when not found.
_LSTSQ = getattr(_umath_linalg, "lstsq", None) or getattr(_umath_linalg, "lstsq_n", None)


SPEC = DetectorSpec(
    name="loss_not_decreasing",
    severity="warning",
    description="No progress of the loss over a window while it is still far from where it started.",
    config_type=LossNotDecreasingConfig,
    factory=lambda config: LossNotDecreasingDetector(config),
)
