"""poor_weight_init: at the start of training, an initialisation the network cannot learn well from.

Rationale
---------
The checklist's initialisation failures show in the first reports, long before the
loss says anything clear:

* **variance with depth**: weights too small make activations shrink layer after layer
  (vanishing signal and gradients), too large make them grow (explosion, saturation).
  Judged on the hidden activation modules (in schema order, the model's output module
  left out; two or more needed): the ratio of the largest to the smallest output std
  above `max_std_ratio` (SageMaker Debugger's PoorWeightInitialization fires on a
  max/min activation-input *variance* ratio of 10; a std ratio of 100 is a variance
  ratio of 10⁴, because PyTorch's default initialisation already shrinks the variance
  of a ReLU stack about 6× per layer and still trains);
* **symmetric neurons**: identical rows (a constant initialisation) make every unit of
  a layer compute the same value and receive the same update forever. The agent reports
  each module's spread across units; a module whose spread across units is below
  `max_symmetry` × its overall std (while that std is > 0) has symmetric units;
* **all-zero gradients**: a layer whose weights are all zero and whose gradient is
  exactly zero (a zero initialisation in front of zero weights) never moves.

Only the first `start_reports` full reports of a rank can start the alert (SageMaker
looks at the first 10 steps); a condition must hold on `consecutive` of them in a row, counted from the
rank's first full report. An initialisation fault is there before the first update: a condition that
appears only on a later report was made by training (a learning rate that wrecked good weights within the
first steps makes activations explode with depth too), and blaming the initialisation would send the
on-call engineer to the wrong place (exploding_gradient and loss_divergence judge that run). The agent's first
full report comes at its interval (step 10 by default) or earlier when a server command asks for full
statistics after another alert, so "the first full report" is not always before the damage: a rank whose
gradient norm has already run beyond `runaway_factor` × its first (exploding_gradient's rule for a run broken
from its first steps) starts no alert, whenever its full reports come.
Once firing, later reports keep being judged, and the rank clears after
`resolve_after` full reports with no condition left (training fixed the symmetry, or
the restarted run was initialised well).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, Hysteresis, hidden_activation_mask, output_module_mask
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "PoorWeightInitConfig", "PoorWeightInitDetector"]

#: Floor for stds in the depth ratio: a module whose output is exactly 0 has "vanished", not divided by zero.
_STD_FLOOR = 1e-30


@dataclass(frozen=True)
class PoorWeightInitConfig(DetectorConfig):
    start_reports: int = setting(5, doc="Only the first this many full reports of a rank can start the alert.", ge=1)
    consecutive: int = setting(2, doc="Full reports in a row showing a condition before firing.", ge=1)
    max_std_ratio: float = setting(
        100.0, doc="Largest / smallest output std over the hidden activations beyond which depth is unhealthy.", gt=1.0
    )
    max_symmetry: float = setting(
        1e-3, doc="A module's spread across units below this × its std means symmetric units.", gt=0.0, lt=1.0
    )
    runaway_factor: float = setting(
        1000.0,
        doc="A rank whose gradient norm has grown beyond this × its first (a run wrecked by its first updates, as "
        "exploding_gradient's start rule says) starts no alert: its later reports no longer show the "
        "initialisation.",
        gt=1.0,
    )
    resolve_after: int = setting(5, doc="Full reports in a row with no condition before clearing.", ge=1)


class PoorWeightInitDetector:
    """Depth-wise activation scale, symmetric units and dead-zero layers over a rank's first full reports."""

    def __init__(self, config: PoorWeightInitConfig) -> None:
        self._config = config
        self._state = Hysteresis(consecutive=config.consecutive, resolve_after=config.resolve_after)
        # Per rank: which conditions have held on every full report since the rank's first.
        self._since_start: dict[int, np.ndarray] = {}
        # Per rank: its first finite gradient norm, and whether a later one ran beyond runaway_factor × it.
        self._first_norm: dict[int, float] = {}
        self._ran_away: set[int] = set()

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state, self._since_start, self._first_norm)
        self._ran_away.discard(rank)

    def observe(self, report: RankReport) -> Verdict | None:
        self._watch_runaway(report)
        acts, columns = report.activations, report.columns
        std = acts.get("std")
        grad_norm, weight_norm = columns.get("grad_norm"), columns.get("weight_norm")
        if std is None and (grad_norm is None or weight_norm is None):
            return None
        rank = report.rank
        if self._state.judged(rank) >= self._config.start_reports and not self._state.firing(rank):
            return None  # past the start of training: nothing new is judged
        if rank in self._ran_away and not self._state.firing(rank):
            return None  # training wrecked the weights before this report: it says nothing of the initialisation
        depth, depth_detail = self._depth(report)
        symmetric, spread = self._symmetric(report)
        zero = (
            (grad_norm == 0) & (weight_norm == 0) & report.held_layers(grad_norm.size)
            if grad_norm is not None and weight_norm is not None and grad_norm.size == weight_norm.size
            else np.zeros(0, dtype=bool)
        )
        over = np.concatenate([[depth], symmetric, zero])
        held = self._since_start.get(rank)
        held = over if held is None or held.shape != over.shape else held & over
        self._since_start[rank] = held
        over = over if self._state.firing(rank) else held
        # Worst first: a layer that cannot move, then symmetric units, then a depth trend.
        score = np.concatenate([[1.0], np.full(symmetric.size, 2.0), np.full(zero.size, 3.0)])
        outcome = self._state.judge(rank, over, over, score)
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        at = f"on rank {rank} at step {report.step}"
        index = outcome.index
        if index == 0:
            layer, detail = depth_detail
            return Fire(step=report.step, value=None, summary=f"{detail} {at}", layer=layer)
        index -= 1
        if index < symmetric.size:
            name = report.modules[index]
            summary = (
                f"the units of {report.module_types[index]} layer {name!r} compute the same value (spread across "
                f"units {float(spread[index]):.2g} × its std) {at}: identical weight rows, a constant "
                f"initialisation"
            )
            return Fire(step=report.step, value=float(spread[index]), summary=summary, layer=name)
        name = report.layer_names[index - symmetric.size]
        summary = f"layer {name!r} has all-zero weights and an exactly zero gradient {at}: it cannot learn"
        return Fire(step=report.step, value=0.0, summary=summary, layer=name)

    def _watch_runaway(self, report: RankReport) -> None:
        """Every report (ordinary ones too): the rank's first gradient norm, and whether one ran away from it."""
        norm = report.grad_norm
        if not math.isfinite(norm) or norm <= 0.0 or report.rank in self._ran_away:
            return
        first = self._first_norm.setdefault(report.rank, norm)
        if norm > self._config.runaway_factor * first:
            self._ran_away.add(report.rank)

    def _depth(self, report: RankReport) -> tuple[bool, tuple[str | None, str]]:
        """Whether the hidden activations' std spans more than max_std_ratio, and what to say about it."""
        std = report.activations.get("std")
        if std is None:
            return False, (None, "")
        hidden = np.flatnonzero(hidden_activation_mask(report.module_types) & np.isfinite(std))
        if hidden.size < 2:
            return False, (None, "")
        values = np.maximum(std[hidden].astype(np.float64), _STD_FLOOR)
        low, high = int(np.argmin(values)), int(np.argmax(values))
        ratio = float(values[high] / values[low])
        if ratio <= self._config.max_std_ratio:
            return False, (None, "")
        deeper = low if low > high else high
        trend = "vanishes" if low > high else "explodes"
        name = report.modules[int(hidden[deeper])]
        detail = (
            f"activation scale {trend} with depth: output std {float(values[high]):.3g} at "
            f"{report.modules[int(hidden[high])]!r} vs {float(values[low]):.3g} at "
            f"{report.modules[int(hidden[low])]!r} ({ratio:.3g}× > {self._config.max_std_ratio:g}×)"
        )
        return True, (name, detail)

    def _symmetric(self, report: RankReport) -> tuple[np.ndarray, np.ndarray]:
        """Per module: symmetric units (bool) and spread across units relative to std."""
        std, unit_spread = report.activations.get("std"), report.activations.get("unit_spread")
        if std is None or unit_spread is None:
            return np.zeros(0, dtype=bool), np.zeros(0)
        judged = np.isfinite(unit_spread) & np.isfinite(std) & (std > 0) & ~output_module_mask(std.size)
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = np.where(judged, unit_spread / np.where(judged, std, 1.0), np.inf)
        return judged & (relative < self._config.max_symmetry), relative


SPEC = DetectorSpec(
    name="poor_weight_init",
    severity="warning",
    description="At the start of training: activation scale exploding or vanishing with depth, symmetric "
    "units, or all-zero layers that cannot learn.",
    config_type=PoorWeightInitConfig,
    factory=lambda config: PoorWeightInitDetector(config),
    # Every report (not only full ones): the gradient norm of the rank's first steps is what a runaway is
    # measured against, and the first full report may come after the damage.
)
