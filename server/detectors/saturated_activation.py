"""saturated_activation: most units of a sigmoid/tanh-like layer stuck in the flat ends of their range.

Rationale
---------
A saturated sigmoid or tanh unit sits where the derivative is nearly zero: it passes
back almost no gradient (the classic cause of vanishing gradients in deep or recurrent
nets) and its output no longer depends on its input. Large initial weights, inputs on
a large scale or a high learning rate push whole layers there. SageMaker Debugger's
SaturatedActivation flags tanh inputs beyond ±9.4999 and sigmoid inputs outside
(−23, 16.99999) with the same 1 %/50 % rule as DeadRelu.

The agent reports, per bounded activation (Sigmoid, Tanh, Hardtanh, Softsign, ...)
and full-statistics step, the fraction of units most of whose outputs over the batch
(more than half) lie within 1 % of the range's ends (NaN for unbounded modules, which
are skipped). Not "every output": with weights drawn too large (a tanh MLP with std 1.5)
nearly every output sits at ±1, yet each unit still meets a few inputs near the middle
of its range in a batch of 64, and "every output" reported 0 %. A layer
over `saturated_fraction` on `consecutive` full reports in a row fires; the rank clears
after `resolve_after` reports with every layer at or under `clear_fraction`. The
model's output module is left out: a classifier's final sigmoid is meant to reach 0
and 1 on easy examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, Hysteresis, output_module_mask
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "SaturatedActivationConfig", "SaturatedActivationDetector"]


@dataclass(frozen=True)
class SaturatedActivationConfig(DetectorConfig):
    saturated_fraction: float = setting(
        0.5, doc="Fire when more than this fraction of a layer's units are saturated for the whole batch.",
        gt=0.0, le=1.0,
    )  # fmt: skip
    clear_fraction: float = setting(
        0.4, doc="Clear once every layer is at or under this fraction (hysteresis).", ge=0.0, le=1.0
    )
    consecutive: int = setting(3, doc="Full reports in a row over saturated_fraction before firing.", ge=1)
    min_reports: int = setting(1, doc="Full reports that only warm up.", ge=0)
    resolve_after: int = setting(5, doc="Full reports in a row under clear_fraction before clearing.", ge=1)

    def _check(self) -> None:
        if self.clear_fraction > self.saturated_fraction:
            raise SettingError("clear_fraction", f"must be ≤ saturated_fraction ({self.saturated_fraction})")


class SaturatedActivationDetector:
    """Per-rank, per-bounded-activation saturated fractions with hysteresis."""

    def __init__(self, config: SaturatedActivationConfig) -> None:
        self._config = config
        self._state = Hysteresis(
            consecutive=config.consecutive, resolve_after=config.resolve_after, min_reports=config.min_reports
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state)

    def observe(self, report: RankReport) -> Verdict | None:
        saturated = report.activations.get("saturated_fraction")
        if saturated is None:
            return None
        judged = np.isfinite(saturated) & ~output_module_mask(saturated.size)
        if not judged.any():
            return None
        cfg = self._config
        outcome = self._state.judge(
            report.rank,
            judged & (saturated > cfg.saturated_fraction),
            judged & (saturated > cfg.clear_fraction),
            saturated,
        )
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        index = outcome.index
        name, fraction = report.modules[index], float(saturated[index])
        summary = (
            f"{fraction:.0%} of the units of {report.module_types[index]} layer {name!r} are saturated (most "
            f"outputs within 1% of the range's ends) on rank {report.rank} at step {report.step} "
            f"(threshold {cfg.saturated_fraction:.0%})"
        )
        return Fire(step=report.step, value=fraction, summary=summary, layer=name)


SPEC = DetectorSpec(
    name="saturated_activation",
    severity="warning",
    description="Most units of a sigmoid/tanh-like layer stay in the flat ends of their range.",
    config_type=SaturatedActivationConfig,
    factory=lambda config: SaturatedActivationDetector(config),
    needs=("activations",),
)
