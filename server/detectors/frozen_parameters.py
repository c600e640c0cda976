"""frozen_parameters: layers that never receive a gradient, or never change, over many reports.

Rationale
---------
A layer left out of the optimizer, a branch the forward pass never uses, a `.detach()` in the wrong
place or a `requires_grad=False` that was meant for another module: the run trains, the loss falls a
little, and part of the model silently stays at its initialisation. This is information rather than a
fault, because freezing is also done on purpose (fine-tuning a head on a frozen backbone): the alert
lists what is frozen, and `ignore` names layer prefixes that are frozen by design. (The agent reports
a parameter without a gradient as zeros, whether or not it requires one, so the server cannot tell a
deliberate freeze apart by itself.)

Judged on full-statistics reports, per layer, vectorised: a layer is "without gradient" while its
gradient norm is exactly 0, and "unchanged" while its update ratio is exactly 0 (the optimizer stepped,
nothing moved); a layer frozen for `reports` full reports in a row fires (SageMaker Debugger's
UnchangedTensor judges 3 saves; `reports` = 5 full reports, 50 steps at the default cadence, spares the
layers that a schedule unfreezes after a few steps). Resolves as soon as every layer has moved again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "FrozenParametersConfig", "FrozenParametersDetector"]


@dataclass(frozen=True)
class FrozenParametersConfig(DetectorConfig):
    reports: int = setting(5, doc="Full-statistics reports in a row a layer must stay frozen.", ge=1)
    ignore: tuple[str, ...] = setting((), doc="Layer name prefixes frozen on purpose (never reported).")


@dataclass
class _RankState:
    no_grad: np.ndarray  # per layer: full reports in a row with a zero gradient
    still: np.ndarray  # per layer: full reports in a row with a zero update
    ignored: np.ndarray
    firing: bool = False


class FrozenParametersDetector:
    """Per-layer streaks of zero gradients and zero updates (module docstring)."""

    def __init__(self, config: FrozenParametersConfig) -> None:
        self._config = config
        self._ranks: dict[int, _RankState] = {}

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        grads = report.columns.get("grad_norm")
        if grads is None or report.skipped:
            return None
        cfg = self._config
        n = grads.size
        state = self._ranks.get(report.rank)
        if state is None or state.no_grad.size != n:
            names = list(report.layer_names[:n])
            ignored = np.array([name.startswith(cfg.ignore) for name in names] + [False] * (n - len(names)))
            state = self._ranks[report.rank] = _RankState(np.zeros(n, np.int64), np.zeros(n, np.int64), ignored)
        state.no_grad = np.where(grads == 0.0, state.no_grad + 1, 0)
        updates = report.columns.get("update_ratio")
        if updates is not None and updates.size == n:
            state.still = np.where(updates == 0.0, state.still + 1, 0)
        frozen = ((state.no_grad >= cfg.reports) | (state.still >= cfg.reports)) & ~state.ignored
        frozen &= report.held_layers(n)  # an FSDP2 rank's empty shard has no gradient to receive
        if not frozen.any():
            if state.firing:
                state.firing = False
                return Clear(step=report.step)
            return None
        state.firing = True
        index = np.flatnonzero(frozen)
        names = [report.layer_names[i] if i < len(report.layer_names) else str(i) for i in index]
        no_grad = int(np.count_nonzero(frozen & (state.no_grad >= cfg.reports)))
        shown = ", ".join(repr(name) for name in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        summary = (
            f"{len(names)} layer(s) frozen on rank {report.rank} at step {report.step} for {cfg.reports}+ full "
            f"reports ({no_grad} without any gradient, {len(names) - no_grad} never updated): {shown}"
        )
        return Fire(step=report.step, value=float(len(names)), summary=summary, layer=names[0])


SPEC = DetectorSpec(
    name="frozen_parameters",
    severity="info",
    description="Layers that never receive a gradient or never change.",
    config_type=FrozenParametersConfig,
    factory=lambda config: FrozenParametersDetector(config),
    needs=("columns",),
)
