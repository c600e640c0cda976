"""update_ratio: a layer's |Δw| / |w| per optimizer step stays far from healthy (learning rate off for it).

Rationale
---------
The size of an update relative to the weights it changes is the most direct read of whether a learning
rate suits a layer: around 1e-3 per step is the usual rule of thumb; near 1 the layer is rewritten every
step (it cannot accumulate anything, and divergence or dead units follow); near zero it does not learn.
SageMaker Debugger's WeightUpdateRatio fires above 10 or below 1e-8; 10 means the weights grew tenfold in
one step, far past the point of damage, so the upper bound here is `high` = 0.3 (healthy MLPs, CNNs, GRUs
and transformers with SGD or Adam measure 1e-4 to 6e-2 as a per-layer median, single reports up to
0.11 on batches of four). The lower bound keeps SageMaker's 1e-8.

Judged on full-statistics reports, per layer, vectorised: the median of each layer's last `window`
ratios (one report never decides). A layer fires when that median is above `high` or positive and below
`low`; exactly zero (a layer that does not change) belongs to frozen_parameters. The low rule stands down
once the loss is below `solved_fraction` × its starting level (median of the first `start_losses`
losses): a solved task has tiny gradients and so tiny updates. Layers with a
non-finite ratio (zero weights) are left out. The first `min_reports` full reports only fill the window
(Adam's first steps move every weight by about the learning rate). Resolves after `resolve_after` full
reports in a row with every layer in range.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import LossStart, nanmedian_columns
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "UpdateRatioConfig", "UpdateRatioDetector"]


@dataclass(frozen=True)
class UpdateRatioConfig(DetectorConfig):
    high: float = setting(0.3, doc="Fire when a layer's median update ratio is above this.", gt=0.0)
    low: float = setting(1e-8, doc="Fire when a layer's median update ratio is positive and below this.", ge=0.0)
    window: int = setting(5, doc="Full-statistics reports whose per-layer median is judged.", ge=1)
    min_reports: int = setting(5, doc="Full reports that only fill the window (warm-up).", ge=0)
    resolve_after: int = setting(3, doc="Full reports in a row with all layers in range before a rank clears.", ge=1)
    solved_fraction: float = setting(
        0.01, doc="The low rule stands down while the loss is below this fraction of its start.", ge=0.0, lt=1.0
    )
    start_losses: int = setting(10, doc="First losses whose median is the starting level.", ge=1)

    def _check(self) -> None:
        if self.low >= self.high:
            raise SettingError("low", f"must be < high ({self.high}), got {self.low}")
        if self.min_reports < self.window - 1:
            raise SettingError("min_reports", f"must be ≥ window - 1 ({self.window - 1}), got {self.min_reports}")


@dataclass
class _RankState:
    ratios: np.ndarray  # (window, layers), NaN where unknown
    start: LossStart
    seen: int = 0


class UpdateRatioDetector:
    """Per-layer rolling median of the update ratio against [low, high] (module docstring)."""

    def __init__(self, config: UpdateRatioConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)
        self._ranks: defaultdict[int, _RankState] = defaultdict(
            lambda: _RankState(np.full((config.window, 0), np.nan), LossStart(config.start_losses))
        )

    def observe(self, report: RankReport) -> Verdict | None:
        cfg = self._config
        state = self._ranks[report.rank]
        state.start.feed(report.loss)
        ratio = report.columns.get("update_ratio")
        if ratio is None or report.skipped:
            return None
        if state.ratios.shape[1] != ratio.size:
            state.ratios = np.full((cfg.window, ratio.size), np.nan)
            state.seen = 0
        state.ratios[state.seen % cfg.window] = ratio
        state.seen += 1
        if state.seen <= cfg.min_reports:
            return None
        with np.errstate(all="ignore"):
            held = np.where(np.isfinite(state.ratios), state.ratios, np.nan)
            known = np.sum(np.isfinite(held), axis=0) > 0
            median = np.full(ratio.size, np.nan)
            median[known] = nanmedian_columns(held[:, known])
            too_high = known & (median > cfg.high)
            too_low = known & (median > 0.0) & (median < cfg.low)
        if state.start.solved(report.loss, cfg.solved_fraction):
            too_low[:] = False
        kind = self._latch.judge(report.rank, bool(too_high.any() or too_low.any()))
        if kind == FIRE:
            return self._fire(report, median, too_high, too_low)
        return Clear(step=report.step) if kind == CLEAR else None

    def _fire(self, report: RankReport, median: np.ndarray, too_high: np.ndarray, too_low: np.ndarray) -> Fire:
        cfg = self._config
        # The worst layer: furthest (in log terms) outside its bound.
        with np.errstate(divide="ignore"):
            distance = np.where(too_high, np.log(median / cfg.high), 0.0)
            distance = np.where(too_low, np.log(cfg.low / median), distance)
        worst = int(np.argmax(distance))
        name = report.layer_names[worst] if worst < len(report.layer_names) else None
        value = float(median[worst])
        direction = "above" if too_high[worst] else "below"
        bound = cfg.high if too_high[worst] else cfg.low
        count = int(np.count_nonzero(too_high | too_low))
        hint = "learning rate too high for it" if too_high[worst] else "learning rate too low for it"
        summary = (
            f"update/weight ratio of layer {name!r} on rank {report.rank} at step {report.step} is {value:.2e} "
            f"(median of {cfg.window} reports), {direction} {bound:.0e}: {hint}; {count} layer(s) out of range"
        )
        return Fire(step=report.step, value=value, summary=summary, layer=name)


SPEC = DetectorSpec(
    name="update_ratio",
    severity="warning",
    description="A layer's update/weight ratio per step stays far from healthy (learning rate off for it).",
    config_type=UpdateRatioConfig,
    factory=lambda config: UpdateRatioDetector(config),
)
