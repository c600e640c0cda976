"""vanishing_gradient: early layers get orders of magnitude less gradient than late ones, or all get ~none.

Rationale
---------
In deep stacks without normalisation or residual connections (and with saturating sigmoid/tanh units,
or long recurrences) each layer multiplies the backward signal by a factor below one: 0.25 per sigmoid
at best, so ten layers cost ~1e-6. The early layers stop learning while the loss still moves a little
through the late ones, which makes the fault easy to miss on a loss chart. Two rules, on full-statistics
reports (per-layer columns), vectorised over layers:

* **depth ratio**: each layer's relative gradient ‖g‖/‖w‖ (scale-free, so layers of different sizes
  compare); the median over the first quarter of the layers (schema order, i.e. input side first),
  divided by the median over the last quarter, below `depth_ratio`. Healthy MLPs, CNNs, GRUs and
  transformers measure 3e-2 to 3 here; an 8-layer sigmoid MLP 1e-5. Needs `min_layers` layers.
* **tiny**: the model's relative gradient ‖g‖/‖w‖ over all layers is positive but below
  `min_relative_grad` (SageMaker Debugger's VanishingGradient uses mean |g| < 1e-7; a relative norm
  does not depend on layer sizes). Exactly zero gradients are frozen_parameters' and poor_weight_init's.

Both rules stand down once the loss has fallen below `solved_fraction` × its starting level (median of the
rank's first `start_losses` losses): a classifier that has separated its data drives its loss, and with it
every gradient, to almost zero, which is success and not a fault. Layers whose weight norm is zero or
non-finite are left out. Fires after `consecutive` full reports in
a row satisfy a rule (the first `min_reports` full reports are skipped: the first steps of a run are
not representative); resolves after `resolve_after` full reports in a row satisfy neither.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import LossStart
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "VanishingGradientConfig", "VanishingGradientDetector"]


@dataclass(frozen=True)
class VanishingGradientConfig(DetectorConfig):
    depth_ratio: float = setting(
        1e-3, doc="Fire when early layers' median relative gradient / late layers' is below this.", gt=0.0, lt=1.0
    )
    min_relative_grad: float = setting(
        1e-7, doc="Fire when the model's ‖gradient‖ / ‖weights‖ is positive and below this.", ge=0.0
    )
    min_layers: int = setting(4, doc="Layers (with non-zero weights) the depth-ratio rule needs.", ge=2)
    min_reports: int = setting(1, doc="Full-statistics reports skipped at the start of a run.", ge=0)
    consecutive: int = setting(3, doc="Full reports in a row that must show the fault before firing.", ge=1)
    resolve_after: int = setting(3, doc="Full reports in a row without it before a rank clears.", ge=1)
    solved_fraction: float = setting(
        0.01, doc="No judgement while the loss is below this fraction of its starting level.", ge=0.0, lt=1.0
    )
    start_losses: int = setting(10, doc="First losses whose median is the starting level.", ge=1)


@dataclass
class _RankState:
    start: LossStart
    seen: int = 0


class VanishingGradientDetector:
    """Depth-ratio and tiny-gradient rules on per-layer gradient and weight norms (module docstring)."""

    def __init__(self, config: VanishingGradientConfig) -> None:
        self._config = config
        self._latch = Latch(consecutive=config.consecutive, resolve_after=config.resolve_after)
        self._ranks: defaultdict[int, _RankState] = defaultdict(lambda: _RankState(LossStart(config.start_losses)))

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        cfg = self._config
        state = self._ranks[report.rank]
        state.start.feed(report.loss)
        grads = report.columns.get("grad_norm")
        weights = report.columns.get("weight_norm")
        if grads is None or weights is None or grads.size != weights.size or report.skipped:
            return None
        state.seen += 1
        if state.seen <= cfg.min_reports:
            return None
        finding = None
        if not state.start.solved(report.loss, cfg.solved_fraction):
            finding = self._judge(np.asarray(grads, dtype=np.float64), np.asarray(weights, dtype=np.float64), report)
        kind = self._latch.judge(report.rank, finding is not None)
        if kind == FIRE:
            return finding
        return Clear(step=report.step) if kind == CLEAR else None

    def _judge(self, grads: np.ndarray, weights: np.ndarray, report: RankReport) -> Fire | None:
        cfg = self._config
        usable = np.isfinite(grads) & np.isfinite(weights) & (weights > 0)
        index = np.flatnonzero(usable)
        if index.size == 0:
            return None
        relative = grads[index] / weights[index]
        overall = math.sqrt(float(np.sum(grads[index] ** 2))) / math.sqrt(float(np.sum(weights[index] ** 2)))
        where = f"on rank {report.rank} at step {report.step}"
        if 0.0 < overall < cfg.min_relative_grad:
            return Fire(
                step=report.step,
                value=overall,
                summary=f"gradients vanished {where}: ‖gradient‖ / ‖weights‖ is {overall:.2e} "
                f"(below {cfg.min_relative_grad:.0e})",
            )
        if index.size < cfg.min_layers:
            return None
        quarter = math.ceil(index.size / 4)
        early = median_of(relative[:quarter])
        late = median_of(relative[-quarter:])
        if late <= 0.0 or early / late >= cfg.depth_ratio:
            return None
        ratio = early / late
        weakest = int(index[int(np.argmin(relative[:quarter]))])
        name = report.layer_names[weakest] if weakest < len(report.layer_names) else None
        return Fire(
            step=report.step,
            value=ratio,
            summary=f"gradients vanish with depth {where}: the first {quarter} layers get {ratio:.1e}× the "
            f"relative gradient of the last {quarter} (weakest: layer {name!r}, ‖g‖/‖w‖ "
            f"{float(relative[int(np.argmin(relative[:quarter]))]):.1e})",
            layer=name,
        )


SPEC = DetectorSpec(
    name="vanishing_gradient",
    severity="warning",
    description="Early layers get orders of magnitude less (relative) gradient than late ones, or all get ~none.",
    config_type=VanishingGradientConfig,
    factory=lambda config: VanishingGradientDetector(config),
)
