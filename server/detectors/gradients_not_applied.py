"""gradients_not_applied: layers that receive non-zero gradients every step but never change.

Rationale
---------
A parameter forgotten in the optimizer's parameter list (a layer added after the optimizer was built, a
`model.head.parameters()` left out of a concatenation, a second optimizer never stepped) still gets its
gradient computed on every backward pass: the cost of training it is paid and its value never moves. A
deliberate freeze sets `requires_grad=False` (no gradient at all: `frozen_parameters`, info), so gradients
that are computed and never applied are a bug, and a warning.

Judged per layer, vectorised, on every report that carries update ratios: full-statistics reports and the
agent's own update-ratio cadence between them (every step up to step 16, then every 8th: agent
update_cadence.py), so a layer forgotten from the start is seen within its first steps even when an overhead
budget spreads full statistics thousands of steps apart. A full report marks a layer "not applied" when its
gradient norm is positive and finite and its update ratio exactly 0, on a report where some other layer of the
rank did change (the optimizer stepped and applied updates: a learning rate of zero for the whole model, or a
skipped step, moves nothing anywhere and is other detectors' business). The update-ratio reports in between
carry no gradient norms: they extend a marked layer's streak while its update stays exactly 0 and others move,
and never start one (a layer frozen with requires_grad=False after a full report that saw it move is never
marked). `reports` such reports in a row, the first a full report, fire; layers under an `ignore` prefix are
never reported (a parameter group deliberately given a learning rate of 0). Resolves as soon as every layer
with a gradient has moved again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "GradientsNotAppliedConfig", "GradientsNotAppliedDetector"]


@dataclass(frozen=True)
class GradientsNotAppliedConfig(DetectorConfig):
    reports: int = setting(
        3, doc="Reports in a row (the first a full-statistics one) a layer must have a gradient and no update.", ge=1
    )
    ignore: tuple[str, ...] = setting((), doc="Layer name prefixes whose gradients are left unapplied on purpose.")


@dataclass
class _RankState:
    streak: np.ndarray  # per layer: reports in a row with a gradient (seen on the first, a full one) and no update
    ignored: np.ndarray
    grads: np.ndarray  # per layer: the gradient norm on the latest full report (the summary's figure)
    firing: bool = False


class GradientsNotAppliedDetector:
    """Per-layer streaks of a positive gradient with a zero update (module docstring)."""

    def __init__(self, config: GradientsNotAppliedConfig) -> None:
        self._config = config
        self._ranks: dict[int, _RankState] = {}

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        updates, grads = report.update_ratio, report.columns.get("grad_norm")
        if updates is None or report.skipped or (grads is not None and grads.size != updates.size):
            return None
        cfg = self._config
        n = updates.size
        state = self._ranks.get(report.rank)
        if state is None or state.streak.size != n:
            names = list(report.layer_names[:n])
            ignored = np.array([name.startswith(cfg.ignore) for name in names] + [False] * (n - len(names)))
            state = self._ranks[report.rank] = _RankState(np.zeros(n, np.int64), ignored, np.zeros(n))
        held = report.held_layers(n)
        moved = held & np.isfinite(updates) & (updates > 0.0)
        if grads is not None:
            state.grads = grads.copy()  # not a view pinning the frame
            unapplied = held & np.isfinite(grads) & (grads > 0.0) & (updates == 0.0)
        else:  # between full reports: only a layer a full report marked goes on (see the module docstring)
            unapplied = held & (state.streak > 0) & (updates == 0.0)
        if not moved.any():
            return None  # nothing moved anywhere: no optimizer step to compare against (lr 0, a stalled optimizer)
        state.streak = np.where(unapplied, state.streak + 1, 0)
        bad = (state.streak >= cfg.reports) & ~state.ignored
        if not bad.any():
            if state.firing:
                state.firing = False
                return Clear(step=report.step)
            return None
        state.firing = True
        index = np.flatnonzero(bad)
        names = [report.layer_names[i] if i < len(report.layer_names) else str(i) for i in index]
        shown = ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        summary = (
            f"{len(names)} layer(s) on rank {report.rank} received gradients (norm up to "
            f"{float(state.grads[index].max()):.3g}) but never changed for {cfg.reports}+ reports while "
            f"{int(moved.sum())} other layer(s) did, at step {report.step}: {shown}. Left out of the optimizer? "
            f"(A deliberate freeze sets requires_grad=False.)"
        )
        return Fire(step=report.step, value=float(len(names)), summary=summary, layer=names[0])


SPEC = DetectorSpec(
    name="gradients_not_applied",
    severity="warning",
    description="Layers that receive gradients every step but never change (left out of the optimizer).",
    config_type=GradientsNotAppliedConfig,
    factory=lambda config: GradientsNotAppliedDetector(config),
    needs=("update_ratio",),
)
