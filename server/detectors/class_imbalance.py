"""class_imbalance: the labels seen so far are skewed beyond a ratio between the rarest and commonest class.

Rationale
---------
With a heavily skewed label distribution a classifier learns to predict the majority
and its loss still looks fine; the checklist asks for balanced classes (or re-weighting,
re-sampling, augmenting the rare classes). SageMaker Debugger's ClassImbalance fires
when the smallest:largest class count passes 1:10 after 500 samples.

The agent sends, on full-statistics steps, a class histogram of the integer labels
passed to `monitor.step(loss, labels=y)` (classes 0..n-1, n the highest label seen
plus one; negative labels such as an ignore_index are not counted). Counts accumulate
per rank over the run. Once at least `min_samples` labels are seen *and* at least
`min_per_class` per class on average (so 100 classes need 2,000 labels: chance alone
leaves a class short in a small sample), the ratio rarest:commonest under `min_ratio`
fires at once, a class never seen within 0..n-1 included; it clears when the ratio
rises above `clear_ratio` (the sampler was fixed, or a run restarted). Accumulating
counts is already an average, so no streak is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "ClassImbalanceConfig", "ClassImbalanceDetector"]


@dataclass(frozen=True)
class ClassImbalanceConfig(DetectorConfig):
    min_ratio: float = setting(0.1, doc="Fire when rarest / commonest class count is under this.", gt=0.0, lt=1.0)
    clear_ratio: float = setting(0.15, doc="Clear once the ratio is above this (hysteresis).", gt=0.0, le=1.0)
    min_samples: int = setting(500, doc="Labels seen before judging.", ge=1)
    min_per_class: float = setting(20.0, doc="... and at least this many labels per class on average.", ge=0.0)
    max_classes: int = setting(1024, doc="Classes tracked per rank (higher labels are ignored).", ge=2)

    def _check(self) -> None:
        if self.clear_ratio < self.min_ratio:
            raise SettingError("clear_ratio", f"must be ≥ min_ratio ({self.min_ratio})")


@dataclass
class _RankState:
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    firing: bool = False


class ClassImbalanceDetector:
    """Per-rank accumulated label histogram, rarest:commonest ratio with hysteresis."""

    def __init__(self, config: ClassImbalanceConfig) -> None:
        self._config = config
        self._ranks: dict[int, _RankState] = {}

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        histogram = report.label_histogram
        if histogram is None or histogram.size == 0:
            return None
        cfg = self._config
        state = self._ranks.get(report.rank)
        if state is None:
            state = self._ranks[report.rank] = _RankState()
        new = np.nan_to_num(histogram[: cfg.max_classes].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if new.size > state.counts.size:
            state.counts = np.concatenate([state.counts, np.zeros(new.size - state.counts.size)])
        state.counts[: new.size] += np.maximum(new, 0.0)
        counts = state.counts
        total = float(counts.sum())
        if counts.size < 2 or total < cfg.min_samples or total < cfg.min_per_class * counts.size:
            return None
        rare, common = int(np.argmin(counts)), int(np.argmax(counts))
        ratio = float(counts[rare] / counts[common])
        if state.firing and ratio > cfg.clear_ratio:
            state.firing = False
            return Clear(step=report.step)
        if not state.firing and ratio >= cfg.min_ratio:
            return None
        state.firing = True
        summary = (
            f"labels are imbalanced on rank {report.rank} at step {report.step}: class {rare} has "
            f"{counts[rare]:.0f} of {total:.0f} labels seen, class {common} has {counts[common]:.0f} "
            f"(ratio 1:{1 / ratio if ratio > 0 else float('inf'):.0f}, threshold 1:{1 / cfg.min_ratio:.0f})"
        )
        return Fire(step=report.step, value=ratio, summary=summary, layer=None)


SPEC = DetectorSpec(
    name="class_imbalance",
    severity="warning",
    description="The label histogram is skewed beyond a ratio once enough labels are seen.",
    config_type=ClassImbalanceConfig,
    factory=lambda config: ClassImbalanceDetector(config),
    needs=("label_histogram",),
)
