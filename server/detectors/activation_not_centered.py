"""activation_not_centered: activations feeding the next layer with a mean far from zero for their spread.

Rationale
---------
When every input of a layer has the same sign (sigmoid outputs, or a ReLU pushed far
into its linear regime), the gradients of each unit's weights share a sign too: the
update can only move all of them up or all of them down together, and learning
zig-zags towards the optimum. Zero-centred activations (tanh, batch or layer
normalisation, ELU/SELU) avoid it. SageMaker Debugger has no such rule.

Per hidden activation module (the agent's activation types; the model's output module
is left out) and full-statistics step, the score is |mean| / std of the module's
output. A standard ReLU of a centred input scores about 0.68 (1.25 when its input's mean
equals its std), GELU about 0.5, tanh about 0; a sigmoid of unit-scale inputs about 2.4,
and sigmoid layers stay between 1.5 and 2 as they train (measured on the
`sigmoid_hidden` scenario, deeper layers higher). A module over `max_mean_to_std` on
`consecutive` full reports in a row after `min_reports` warm-up reports fires; the
rank clears after `resolve_after` reports with every module at or under
`clear_mean_to_std`. Modules that are mostly saturated or dead (over half their units)
are left to saturated_activation and dead_relu, and constant outputs (std 0) have no
spread to judge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, Hysteresis, hidden_activation_mask
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "ActivationNotCenteredConfig", "ActivationNotCenteredDetector"]

#: Modules with more than this fraction of dead or saturated units belong to those detectors.
_OTHER_DETECTOR_FRACTION = 0.5


@dataclass(frozen=True)
class ActivationNotCenteredConfig(DetectorConfig):
    max_mean_to_std: float = setting(1.5, doc="Fire when |mean| / std of a hidden activation exceeds this.", gt=0.0)
    clear_mean_to_std: float = setting(1.2, doc="Clear once every module is at or under this (hysteresis).", gt=0.0)
    consecutive: int = setting(5, doc="Full reports in a row over max_mean_to_std before firing.", ge=1)
    min_reports: int = setting(3, doc="Full reports that only warm up.", ge=0)
    resolve_after: int = setting(5, doc="Full reports in a row under clear_mean_to_std before clearing.", ge=1)

    def _check(self) -> None:
        if self.clear_mean_to_std > self.max_mean_to_std:
            raise SettingError("clear_mean_to_std", f"must be ≤ max_mean_to_std ({self.max_mean_to_std})")


class ActivationNotCenteredDetector:
    """Per-rank, per-hidden-activation |mean| / std with hysteresis."""

    def __init__(self, config: ActivationNotCenteredConfig) -> None:
        self._config = config
        self._state = Hysteresis(
            consecutive=config.consecutive, resolve_after=config.resolve_after, min_reports=config.min_reports
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state)

    def observe(self, report: RankReport) -> Verdict | None:
        acts = report.activations
        mean, std = acts.get("mean"), acts.get("std")
        if mean is None or std is None:
            return None
        judged = hidden_activation_mask(report.module_types) & np.isfinite(mean) & (std > 0)
        for other in ("dead_fraction", "saturated_fraction"):
            fraction = acts.get(other)
            if fraction is not None:
                judged &= ~(fraction > _OTHER_DETECTOR_FRACTION)  # NaN (not applicable) keeps the module
        if not judged.any():
            return None
        cfg = self._config
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(judged, np.abs(mean) / std, 0.0)
        outcome = self._state.judge(
            report.rank, judged & (score > cfg.max_mean_to_std), judged & (score > cfg.clear_mean_to_std), score
        )
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        index = outcome.index
        name = report.modules[index]
        summary = (
            f"{report.module_types[index]} layer {name!r} outputs mean {float(mean[index]):.3g} with std "
            f"{float(std[index]):.3g} (|mean|/std {float(score[index]):.2g} > {cfg.max_mean_to_std:g}) on rank "
            f"{report.rank} at step {report.step}: most inputs of the next layer share one sign"
        )
        return Fire(step=report.step, value=float(score[index]), summary=summary, layer=name)


SPEC = DetectorSpec(
    name="activation_not_centered",
    severity="warning",
    description="Hidden activations with a mean far from zero relative to their spread.",
    config_type=ActivationNotCenteredConfig,
    factory=lambda config: ActivationNotCenteredDetector(config),
    needs=("activations",),
)
