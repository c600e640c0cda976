"""non_finite: a NaN or Inf in the loss, a gradient or a weight.

Rationale
---------
One NaN gradient poisons the weights at the next optimizer step and everything
after it; the loss may stay finite for a few steps (or be NaN-skipped by a scaler),
and Prometheus cannot alert on a NaN-valued gauge. So this detector needs no
threshold and no history: any report whose flags, loss, gradient norm or per-layer
columns show a non-finite value fires at once, for that rank and step, naming the
first layer when the agent or the columns know it (NaN provenance). It evaluates
every report, so nothing is sampled away. Mixed-precision loss scalers skip steps
with Inf gradients on purpose; a run that recovers stops being reported and the
alert resolves after `resolve_after` consecutive finite reports from that rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "NonFiniteConfig", "NonFiniteDetector"]


@dataclass(frozen=True)
class NonFiniteConfig(DetectorConfig):
    resolve_after: int = setting(
        20, doc="Consecutive finite reports from a rank before its part of the alert resolves.", ge=1
    )


class NonFiniteDetector:
    """Fires on any non-finite report; clears after a streak of finite ones (per rank)."""

    def __init__(self, config: NonFiniteConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)

    def observe(self, report: RankReport) -> Verdict | None:
        kind = self._latch.judge(report.rank, bool(report.non_finite_kinds))
        if kind == FIRE:
            return Fire(step=report.step, value=_bad_count(report), summary=_summary(report), layer=report.layer_name)
        return Clear(step=report.step) if kind == CLEAR else None


def _bad_count(report: RankReport) -> float | None:
    """Non-finite elements in the implicated layer, when the columns carry counts."""
    if report.non_finite_layer is None:
        return None
    for column in ("grad_non_finite", "weight_non_finite"):
        counts = report.columns.get(column)
        if counts is not None and report.non_finite_layer < counts.size:
            value = float(counts[report.non_finite_layer])
            if value > 0:
                return value
    return None


def _summary(report: RankReport) -> str:
    kinds = list(report.non_finite_kinds)
    what = kinds[0] if len(kinds) < 2 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    where = f" first in layer {report.layer_name!r}" if report.layer_name is not None else ""
    origin = f"; it started in the {report.origin}" if report.origin is not None else ""
    return f"non-finite {what} on rank {report.rank} at step {report.step}{where}{origin}"


SPEC = DetectorSpec(
    name="non_finite",
    severity="critical",
    description="NaN or Inf in the loss, a gradient or a weight.",
    config_type=NonFiniteConfig,
    factory=lambda config: NonFiniteDetector(config),  # type: ignore[arg-type]
    # A NaN makes gradients "explode", the loss jump and the updates blow up too: page once, for the cause.
    inhibits=("exploding_gradient", "loss_divergence", "loss_spike", "update_ratio", "input_not_normalized"),
)
