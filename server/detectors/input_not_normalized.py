"""input_not_normalized: input batches far from zero mean and unit scale, or holding NaN/Inf.

Rationale
---------
Inputs on a large scale (raw pixels in 0..255, unscaled physical units) or far from
zero mean make the first layer's pre-activations large and one-signed: saturation,
dead units, a zig-zagging first layer and, with a learning rate tuned for normalised
data, divergence or NaN. Mean-centring and scaling the inputs is the checklist's cheap
fix. SageMaker Debugger's CheckInputImages fires when |mean of the input| > 0.2 after
500 samples.

The agent reports, on full-statistics steps, each input feature's mean and std over
the batch (channels for images, the last dimension otherwise; up to 1024 features).
Per report, over the features that vary (std > 0; a constant feature such as a bias
column is left alone):

* off-centre: the median over features of |mean| exceeds `max_abs_mean` *and* the
  median of |mean| / std exceeds `max_mean_to_std` (far from zero for its spread);
* off-scale: the input's RMS (over all features) is above `max_rms` or below `min_rms`.

Either on `consecutive` full reports in a row fires; the rank clears after
`resolve_after` reports where both measures are back within the thresholds × `clear_factor`
(hysteresis). Medians keep one odd feature or one odd batch from paging. A NaN or Inf
in the input (the agent checks every step, not only full ones) fires at once and
clears after `resolve_after` finite reports; non_finite pages for it too when the loss
goes NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Hysteresis, Latch
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "InputNotNormalizedConfig", "InputNotNormalizedDetector"]


@dataclass(frozen=True)
class InputNotNormalizedConfig(DetectorConfig):
    max_abs_mean: float = setting(0.5, doc="Off-centre needs the features' median |mean| above this ...", ge=0.0)
    max_mean_to_std: float = setting(1.0, doc="... and their median |mean| / std above this.", ge=0.0)
    max_rms: float = setting(10.0, doc="Off-scale: the input's RMS above this.", gt=0.0)
    min_rms: float = setting(1e-3, doc="Off-scale: the input's RMS below this.", ge=0.0)
    clear_factor: float = setting(
        0.8, doc="Clear when the measures are within the thresholds scaled by this (min_rms by its inverse).",
        gt=0.0, le=1.0,
    )  # fmt: skip
    consecutive: int = setting(3, doc="Full reports in a row off-centre or off-scale before firing.", ge=1)
    resolve_after: int = setting(5, doc="Reports in a row back within the thresholds before clearing.", ge=1)

    def _check(self) -> None:
        if self.min_rms >= self.max_rms:
            raise SettingError("min_rms", f"must be < max_rms ({self.max_rms})")


class InputNotNormalizedDetector:
    """Per-rank input centring and scale (hysteresis), and non-finite inputs (at once)."""

    def __init__(self, config: InputNotNormalizedConfig) -> None:
        self._config = config
        self._state = Hysteresis(consecutive=config.consecutive, resolve_after=config.resolve_after)
        self._non_finite = Latch(resolve_after=config.resolve_after)

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state, self._non_finite)

    def observe(self, report: RankReport) -> Verdict | None:
        mean, std = report.input_mean, report.input_std
        stats_bad = mean is not None and std is not None and not (np.isfinite(mean).all() and np.isfinite(std).all())
        non_finite = self._non_finite.judge(report.rank, report.input_non_finite or stats_bad)
        if non_finite == FIRE:
            summary = f"the input batch holds NaN or Inf values on rank {report.rank} at step {report.step}"
            return Fire(step=report.step, value=None, summary=summary, layer="input")
        if self._non_finite.firing(report.rank):
            return None
        if non_finite == CLEAR and not self._state.firing(report.rank):
            return Clear(step=report.step)
        if mean is None or std is None or mean.size == 0:
            return None
        return self._judge_distribution(report, mean, std)

    def _judge_distribution(self, report: RankReport, mean: np.ndarray, std: np.ndarray) -> Verdict | None:
        cfg = self._config
        varying = std > 0
        abs_mean = np.abs(mean[varying])
        centre = median_of(abs_mean) if abs_mean.size else 0.0
        ratio = median_of(abs_mean / std[varying]) if abs_mean.size else 0.0
        rms = math.sqrt(float(np.mean(np.square(mean, dtype=np.float64) + np.square(std, dtype=np.float64))))
        k = cfg.clear_factor
        off_centre = centre > cfg.max_abs_mean and ratio > cfg.max_mean_to_std
        still_off_centre = centre > k * cfg.max_abs_mean and ratio > k * cfg.max_mean_to_std
        off_scale = rms > cfg.max_rms or rms < cfg.min_rms
        still_off_scale = rms > k * cfg.max_rms or rms < cfg.min_rms / k
        score = np.array([ratio, rms])
        outcome = self._state.judge(
            report.rank,
            np.array([off_centre, off_scale]),
            np.array([still_off_centre, still_off_scale]),
            np.array([1.0, 2.0]),  # name the scale first when both hold: it is the bigger problem
        )
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        worst = int(np.argmax(np.where(varying, np.abs(mean) / np.where(varying, std, 1.0), -np.inf)))
        feature = f"feature {worst}: mean {float(mean[worst]):.3g}, std {float(std[worst]):.3g}"
        if outcome.index == 1:
            summary = (
                f"input batches are off-scale on rank {report.rank} at step {report.step}: RMS {rms:.3g} "
                f"(expected within [{cfg.min_rms:g}, {cfg.max_rms:g}]; {feature})"
            )
        else:
            summary = (
                f"input batches are not centred on rank {report.rank} at step {report.step}: median |mean| "
                f"{centre:.3g} and median |mean|/std {ratio:.2g} over the features ({feature})"
            )
        return Fire(step=report.step, value=float(score[outcome.index]), summary=summary, layer="input")


SPEC = DetectorSpec(
    name="input_not_normalized",
    severity="warning",
    description="Input batches far from zero mean and unit scale, or holding NaN/Inf.",
    config_type=InputNotNormalizedConfig,
    factory=lambda config: InputNotNormalizedDetector(config),
)
