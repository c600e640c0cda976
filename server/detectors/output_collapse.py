"""output_collapse: the model gives (nearly) the same output for every input.

Rationale
---------
A network that stopped using its input (dead or saturated layers in front of the head,
a learning rate that wiped the weights, a big net memorising a tiny set, a head that
only learnt the label prior) outputs one constant vector: the loss can look reasonable
(the prior's cross-entropy) while accuracy is that of a constant guess.

The agent reports, on full-statistics steps, the output's spread across the batch (the
mean over output units of their batch std) and its RMS over all elements. Their ratio
is scale-free: a healthy model's outputs vary with the input by a sizeable share of
their magnitude, a collapsed one's by almost nothing. An output that is exactly 0
everywhere counts as collapsed. A ratio under `min_relative_spread` on `consecutive`
full reports in a row after `min_reports` warm-up reports fires; the rank clears after
`resolve_after` reports above `clear_relative_spread`. Batches of one sample carry no
spread and are not judged (the agent leaves the spread out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, Hysteresis
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "OutputCollapseConfig", "OutputCollapseDetector"]


@dataclass(frozen=True)
class OutputCollapseConfig(DetectorConfig):
    min_relative_spread: float = setting(
        0.01, doc="Fire when the output's spread across the batch is under this × its RMS.", gt=0.0, lt=1.0
    )
    clear_relative_spread: float = setting(
        0.02, doc="Clear once the relative spread is above this (hysteresis).", gt=0.0, lt=1.0
    )
    consecutive: int = setting(3, doc="Full reports in a row under min_relative_spread before firing.", ge=1)
    min_reports: int = setting(1, doc="Full reports that only warm up.", ge=0)
    resolve_after: int = setting(5, doc="Full reports in a row above clear_relative_spread before clearing.", ge=1)

    def _check(self) -> None:
        if self.clear_relative_spread < self.min_relative_spread:
            raise SettingError("clear_relative_spread", f"must be ≥ min_relative_spread ({self.min_relative_spread})")


class OutputCollapseDetector:
    """Per-rank output spread relative to the output's RMS, with hysteresis."""

    def __init__(self, config: OutputCollapseConfig) -> None:
        self._config = config
        self._state = Hysteresis(
            consecutive=config.consecutive, resolve_after=config.resolve_after, min_reports=config.min_reports
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state)

    def observe(self, report: RankReport) -> Verdict | None:
        spread, rms = report.output_spread, report.output_rms
        if spread is None or rms is None or not (math.isfinite(spread) and math.isfinite(rms)):
            return None  # a NaN output is non_finite's
        relative = spread / rms if rms > 0 else 0.0
        cfg = self._config
        outcome = self._state.judge(
            report.rank,
            np.array([relative < cfg.min_relative_spread]),
            np.array([relative <= cfg.clear_relative_spread]),
            np.array([relative]),
        )
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        summary = (
            f"the model gives nearly the same output for every input on rank {report.rank} at step {report.step}: "
            f"spread across the batch {spread:.3g} is {relative:.2g}× the output's RMS {rms:.3g} "
            f"(threshold {cfg.min_relative_spread:g}×)"
        )
        return Fire(step=report.step, value=relative, summary=summary, layer="output")


SPEC = DetectorSpec(
    name="output_collapse",
    severity="warning",
    description="The model gives (nearly) the same output for different inputs.",
    config_type=OutputCollapseConfig,
    factory=lambda config: OutputCollapseDetector(config),
    needs=("output_spread",),
)
