"""dead_relu: most units of a ReLU layer never active, report after report.

Rationale
---------
A ReLU unit whose pre-activation is negative for every input outputs 0 and passes
back a zero gradient: it cannot recover by itself. Whole layers die after a too-high
learning rate, a large negative bias or a bad initialisation, and the loss only shows
it as a plateau. SageMaker Debugger's DeadRelu calls a unit dead when it is active
less than 1 % of the time and fires when more than 50 % of a layer's units are dead.

The agent reports, per watched module and full-statistics step, the fraction of units
(channels for convolutions) never positive across the whole batch. That per-batch
measure depends on the batch size: in a batch of 4, a healthy unit active on 15 % of
inputs is silent half the time, so a sparse, healthy layer can read 60 % "dead". So a
layer fires only when its fraction is over `dead_fraction` on `consecutive` full reports
in a row (each a fresh batch) *and* either at least `min_rise` above the layer's own
baseline (the median of its last `window` normal reports: units died, the level did not
just drift with sparsity) or at least `all_dead_fraction` (nearly every unit silent:
dead from the start, whatever the baseline). It clears once every ReLU layer stays at or
under `clear_fraction` for `resolve_after` reports (hysteresis). A layer dying slowly,
over many reports, moves its baseline along and is caught at `all_dead_fraction`.

Only ReLU-family modules (`module_types`) are judged: a LeakyReLU or ELU unit is never
dead, and the model's output module is left out (a final ReLU of a non-negative
regression is not a hidden layer). The first `min_reports` full reports only build the
baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, RELU_TYPES, Hysteresis, hidden_activation_mask
from gradwatch.server.detectors.robust import nanmedian_columns
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "DeadReluConfig", "DeadReluDetector"]


@dataclass(frozen=True)
class DeadReluConfig(DetectorConfig):
    dead_fraction: float = setting(
        0.5, doc="Fire when more than this fraction of a layer's units never activate in a batch.", gt=0.0, le=1.0
    )
    clear_fraction: float = setting(
        0.4, doc="Clear once every layer is at or under this fraction (hysteresis).", ge=0.0, le=1.0
    )
    min_rise: float = setting(
        0.3, doc="... and at least this much above the layer's baseline (median of recent normal reports) ...",
        ge=0.0, le=1.0,
    )  # fmt: skip
    all_dead_fraction: float = setting(0.9, doc="... or at least this fraction, whatever the baseline.", gt=0.0, le=1.0)
    window: int = setting(10, doc="Recent normal full reports forming each layer's baseline.", ge=1)
    consecutive: int = setting(3, doc="Full reports in a row over the thresholds before firing.", ge=1)
    min_reports: int = setting(3, doc="Full reports that only build the baseline (warm-up).", ge=0)
    resolve_after: int = setting(5, doc="Full reports in a row under clear_fraction before clearing.", ge=1)
    module_types: tuple[str, ...] = setting(RELU_TYPES, doc="Module types judged (activation_schema types).")

    def _check(self) -> None:
        if self.clear_fraction > self.dead_fraction:
            raise SettingError("clear_fraction", f"must be ≤ dead_fraction ({self.dead_fraction})")
        if self.all_dead_fraction < self.dead_fraction:
            raise SettingError("all_dead_fraction", f"must be ≥ dead_fraction ({self.dead_fraction})")


class _Baselines:
    """Per rank: the last `window` normal dead fractions of every module, as one (window, modules) array."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._rows: dict[int, np.ndarray] = {}
        self._next: dict[int, int] = {}

    def fit(self, rank: int, modules: int) -> None:
        """Start the rank's rows (again, for a new schema: a restarted agent)."""
        rows = self._rows.get(rank)
        if rows is None or rows.shape[1] != modules:
            self._rows[rank] = np.full((self._window, modules), np.nan)
            self._next[rank] = 0

    def median(self, rank: int) -> np.ndarray:
        return nanmedian_columns(self._rows[rank])  # NaN for a module without a normal reading yet

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._rows, self._next)

    def add(self, rank: int, values: np.ndarray, keep: np.ndarray) -> None:
        """Append one row: `values` where `keep`, NaN elsewhere."""
        at = self._next[rank]
        self._rows[rank][at] = np.where(keep, values, np.nan)  # NaN: not a normal reading, ignored by the median
        self._next[rank] = (at + 1) % self._window


class DeadReluDetector:
    """Per-rank, per-ReLU-module dead-unit fractions against their own baselines, with hysteresis."""

    def __init__(self, config: DeadReluConfig) -> None:
        self._config = config
        self._state = Hysteresis(consecutive=config.consecutive, resolve_after=config.resolve_after)
        self._baselines = _Baselines(config.window)

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._state, self._baselines)

    def observe(self, report: RankReport) -> Verdict | None:
        dead = report.activations.get("dead_fraction")
        if dead is None:
            return None
        cfg = self._config
        judged = hidden_activation_mask(report.module_types, cfg.module_types)
        if not judged.any():
            return None
        finite = judged & np.isfinite(dead)
        rank = report.rank
        self._baselines.fit(rank, dead.size)
        if self._state.judged(rank) < cfg.min_reports:
            self._baselines.add(rank, dead, finite)
            self._state.judge(rank, np.zeros(dead.size, dtype=bool), np.zeros(dead.size, dtype=bool), dead)
            return None
        # The baselines are read only for modules over dead_fraction (most reports have none) and for a summary;
        # a firing rank adds nothing to them, so the summary's are the ones this report was judged against.
        over = finite & (dead > cfg.dead_fraction)
        if over.any():
            with np.errstate(invalid="ignore"):
                over &= (dead - self._baselines.median(rank) >= cfg.min_rise) | (dead >= cfg.all_dead_fraction)
        outcome = self._state.judge(rank, over, finite & (dead > cfg.clear_fraction), dead)
        if not self._state.firing(rank):
            self._baselines.add(rank, dead, finite & ~over)
        if outcome is None:
            return None
        if outcome.kind == CLEAR:
            return Clear(step=report.step)
        baseline = self._baselines.median(rank)
        index = outcome.index
        name, fraction = report.modules[index], float(dead[index])
        usual = f", usually {float(baseline[index]):.0%}" if np.isfinite(baseline[index]) else ""
        summary = (
            f"{fraction:.0%} of the units of {report.module_types[index]} layer {name!r} never activated across "
            f"the batch on rank {report.rank} at step {report.step} (threshold {cfg.dead_fraction:.0%}{usual})"
        )
        return Fire(step=report.step, value=fraction, summary=summary, layer=name)


SPEC = DetectorSpec(
    name="dead_relu",
    severity="warning",
    description="Most units of a ReLU layer never activate, report after report.",
    config_type=DeadReluConfig,
    factory=lambda config: DeadReluDetector(config),
    needs=("activations",),
)
