"""loss_spike: the loss jumps far above the rank's recent baseline (a transient that may recover).

Rationale
---------
A spike is a warning, not a page: a bad batch, a too-large step that the optimizer recovers from, or
an early sign of trouble (spikes often precede divergence in large runs). It is judged against the
rank's own robust baseline, like loss_divergence, but on single reports: a loss fires when it exceeds
the window median by the largest of (factor − 1) × |median|, mad_k × 1.4826 × MAD and min_rise × the
starting loss level. The three margins together keep it quiet on small noisy batches (MAD), near
convergence where a tiny loss doubles harmlessly (min_rise) and on smooth runs with a tiny MAD
(factor). Abnormal losses never enter the baseline. A spike that does not come back turns into
loss_divergence, which inhibits this detector (one page, for the worse problem).

Resolves after `resolve_after` consecutive reports back under the threshold. The first `min_reports`
losses only build the baseline. Non-finite losses belong to non_finite.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import LossBaseline
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "LossSpikeConfig", "LossSpikeDetector"]


@dataclass(frozen=True)
class LossSpikeConfig(DetectorConfig):
    window: int = setting(200, doc="Recent admitted losses forming the baseline.", ge=10)
    min_reports: int = setting(30, doc="Losses that only build the baseline (warm-up).", ge=5)
    factor: float = setting(4.0, doc="Fire above factor × baseline median ...", gt=1.0)
    mad_k: float = setting(12.0, doc="... and above median + mad_k × 1.4826 × MAD ...", ge=0.0)
    min_rise: float = setting(0.25, doc="... and at least min_rise × the starting loss level above the median.", ge=0.0)
    resolve_after: int = setting(10, doc="Consecutive reports under the threshold before a rank clears.", ge=1)

    def _check(self) -> None:
        if self.min_reports > self.window:
            raise SettingError("min_reports", f"must be ≤ window ({self.window}), got {self.min_reports}")


class LossSpikeDetector:
    """Per-rank single-report jump test against a robust loss baseline (module docstring)."""

    def __init__(self, config: LossSpikeConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)
        self._baselines: defaultdict[int, LossBaseline] = defaultdict(
            lambda: LossBaseline(config.window, config.min_reports)
        )

    def observe(self, report: RankReport) -> Verdict | None:
        loss = report.loss
        if loss is None or not math.isfinite(loss):
            return None
        cfg = self._config
        baseline = self._baselines[report.rank]
        if not baseline.ready:
            baseline.warm(loss)
            return None
        median, threshold = baseline.threshold(cfg.factor, cfg.mad_k, cfg.min_rise)
        kind = self._latch.judge(report.rank, loss > threshold)
        if kind == FIRE:
            ratio = f", {loss / median:.1f}× the baseline median" if median > 0 else ""
            summary = (
                f"loss spiked to {loss:.4g} on rank {report.rank} at step {report.step}{ratio} "
                f"{median:.4g} (threshold {threshold:.4g})"
            )
            return Fire(step=report.step, value=loss, summary=summary)
        baseline.window.append(loss)
        return Clear(step=report.step) if kind == CLEAR else None


SPEC = DetectorSpec(
    name="loss_spike",
    severity="warning",
    description="A loss far above the rank's robust recent baseline (a jump that may recover).",
    config_type=LossSpikeConfig,
    factory=lambda config: LossSpikeDetector(config),
)
