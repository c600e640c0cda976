"""update_ratio: a layer's |Δw| / |w| per optimizer step stays far from healthy (learning rate off for it).

Rationale
---------
The size of an update relative to the weights it changes is the most direct read of whether a learning
rate suits a layer: around 1e-3 per step is the usual rule of thumb; near 1 the layer is rewritten every
step (it cannot accumulate anything, and divergence or dead units follow); near zero it does not learn.
SageMaker Debugger's WeightUpdateRatio fires above 10 or below 1e-8; 10 means the weights grew tenfold in
one step, far past the point of damage, so the upper bound here is `high` = 0.3 (healthy MLPs, CNNs, GRUs
and transformers with SGD or Adam measure 1e-4 to 6e-2 as a per-layer median, single reports up to
0.11 on batches of four). The lower bound keeps SageMaker's 1e-8.

Judged per layer, vectorised, on every report that carries the ratio: full-statistics reports and the
agent's own update cadence between them (every step at the start of a run, then every few steps;
agent/update_cadence.py), against the weights before the step. A layer fires when the median of its last
`window` ratios (one report never decides) is above `high` or positive and below `low`; exactly zero (a
layer that does not change) belongs to frozen_parameters.

The scale is absolute, so the high rule needs no baseline and judges from the `first_reports`-th report
on: a learning rate that rewrites the layers from the first steps (Adam at 0.3 moves every weight by 0.3
on its first step, several times the weights of a default-initialised layer) is often over within a few
steps, once the weights have grown (normalised layers absorb it), so waiting for a baseline or for the
full-statistics cadence missed it. Adam's healthy first steps move every weight by about the learning
rate (1e-3: ratios near 1e-2). A layer that starts at zero (its first ratio not finite: no scale) is left
out of the high rule for its first `zero_start_reports` reports, since its first updates are all of its
weights by construction. The low rule judges after `min_reports` reports and stands down once the loss
is below `solved_fraction` × its starting level (median of the first `start_losses` losses): a solved
task has tiny gradients and so tiny updates. Layers with a non-finite ratio are left out. Resolves after
`resolve_after` reports in a row with every layer in range.

A learning rate raised mid-run (a schedule or a hand-edited config gone wrong) often stays under `high`: the
weights of normalised layers grow until the ratio falls back within a few steps. So a **jump rule** compares
each layer with its own level (median of its last `baseline_reports` admitted ratios, judged once half of
them are in): a ratio above `jump_floor` and at least `jump_factor` × that level, followed by reports still
at least `jump_hold` × the level (`jump_reports` in a row, the first included), fires. Schedules move the rate
gradually (a warm-up doubles it at most between two reports) or down; an order of magnitude between two
reports, to a ratio above the healthy range's upper end, that lasts, is not training as planned, while one
outsized update (a bad batch) does not last. The floor and the full factor apply to the first report only:
with the agent measuring every 8 steps, a normalised model's jump has often decayed under the floor by the
next report while still far above the layer's level (three of six learning-rate jumps of the matrix's tuning
seeds were missed when every report had to clear the floor), and a batch-normalised CNN's SGD jump of 30×
measured 15× its level at the first report and 4.7× at the next (a held-out matrix seed missed while the
factor held for every report): lasting means staying several times the level, not staying at the jump. The
level is recent (4 reports): Adam's ratios fall tenfold over a run's first 50 steps, and the agent's dense
first reports kept a longer window's median far above the layer's ratio before
the jump. It is the lower of that median and the newest admitted ratio: a converging model's SGD updates
shrink with its gradients, 2.5× a report (8 steps) on a held-out 4-rank MLP, where the median of the last 4
reports sat 4× above the newest; its 30× jump then read 2.7×, missed. A ratio that falls between reports is
where the layer is now; a single low report would need a 10× jump over the floor and a next report 3× over
it to fire. Ratios over the jump threshold never enter the level.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.detectors.robust import LossStart, nanmedian_columns
from gradwatch.server.report import RankReport
from gradwatch.server.settings import SettingError, setting

__all__ = ["SPEC", "UpdateRatioConfig", "UpdateRatioDetector"]

#: Values under this cannot overflow in a median's (a + b) / 2.
MEDIAN_BOUND = 8e307


@dataclass(frozen=True)
class UpdateRatioConfig(DetectorConfig):
    high: float = setting(0.3, doc="Fire when a layer's median update ratio is above this.", gt=0.0)
    low: float = setting(1e-8, doc="Fire when a layer's median update ratio is positive and below this.", ge=0.0)
    window: int = setting(5, doc="Recent reports carrying the ratio whose per-layer median is judged.", ge=1)
    first_reports: int = setting(
        3, doc="The high rule judges from this report on (absolute scale: no baseline needed).", ge=1
    )
    min_reports: int = setting(5, doc="Reports that only fill the window before the low rule judges.", ge=0)
    zero_start_reports: int = setting(
        16, doc="A layer that started at zero is left out of the high rule for this many reports.", ge=0
    )
    jump_factor: float = setting(
        10.0,
        doc="Jump rule: a layer's ratio at least this × its own recent level (median of baseline_reports) ...",
        gt=1.0,
    )
    jump_floor: float = setting(0.05, doc="... and above this where it starts ...", ge=0.0)
    jump_hold: float = setting(
        3.0, doc="... then at least this × the level on the reports after it (jump_reports in a row).", gt=1.0
    )
    jump_reports: int = setting(2, doc="Reports in a row a jump must last (its first included).", ge=1)
    baseline_reports: int = setting(
        4,
        doc="A layer's recent admitted ratios forming its level: their median, or the newest if lower (judged once "
        "half of them are in).",
        ge=2,
    )
    resolve_after: int = setting(3, doc="Reports in a row with all layers in range before a rank clears.", ge=1)
    solved_fraction: float = setting(
        0.01, doc="The low rule stands down while the loss is below this fraction of its start.", ge=0.0, lt=1.0
    )
    start_losses: int = setting(10, doc="First losses whose median is the starting level.", ge=1)

    def _check(self) -> None:
        if self.low >= self.high:
            raise SettingError("low", f"must be < high ({self.high}), got {self.low}")
        if self.min_reports < self.window - 1:
            raise SettingError("min_reports", f"must be ≥ window - 1 ({self.window - 1}), got {self.min_reports}")


@dataclass
class _RankState:
    ratios: np.ndarray  # (window, layers), NaN where unknown
    start: LossStart
    seen: int = 0
    #: Layers whose first ratio was not finite (weights all zero before their first update).
    zero_start: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: (baseline_reports, layers) ring of each layer's admitted ratios (NaN: a jumping or unknown one).
    level: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    admitted: int = 0
    #: Per layer: reports in a row over the jump threshold.
    streak: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class UpdateRatioDetector:
    """Per-layer rolling median of the update ratio against [low, high] (module docstring)."""

    def __init__(self, config: UpdateRatioConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)
        self._ranks: defaultdict[int, _RankState] = defaultdict(
            lambda: _RankState(np.full((config.window, 0), np.nan), LossStart(config.start_losses))
        )

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch, self._ranks)

    def observe(self, report: RankReport) -> Verdict | None:
        cfg = self._config
        state = self._ranks[report.rank]
        state.start.feed(report.loss)
        ratio = report.update_ratio
        if ratio is None or report.skipped:
            return None
        if state.ratios.shape[1] != ratio.size:  # a new schema (a restarted agent): everything starts again
            state.ratios = np.full((cfg.window, ratio.size), np.nan)
            state.level = np.full((cfg.baseline_reports, ratio.size), np.nan)
            state.streak = np.zeros(ratio.size, dtype=np.int64)
            state.seen = state.admitted = 0
        if state.seen == 0:
            state.zero_start = ~np.isfinite(ratio)
        state.ratios[state.seen % cfg.window] = ratio
        state.seen += 1
        jumped, level = self._jump(state, ratio)
        judge_high, judge_low = state.seen >= cfg.first_reports, state.seen > cfg.min_reports
        if not (judge_high or judge_low or jumped.any()):
            return None
        with np.errstate(all="ignore"):
            held = np.where(np.isfinite(state.ratios), state.ratios, np.nan)
            median = None  # (most reports) not taken where no layer's median can be out of range
            too_high, too_low = np.zeros(ratio.size, dtype=bool), np.zeros(ratio.size, dtype=bool)
            if self._may_leave_range(held, judge_high, judge_low):
                known = np.sum(np.isfinite(held), axis=0) > 0
                median = np.full(ratio.size, np.nan)
                median[known] = nanmedian_columns(held[:, known])
                too_high = known & (median > cfg.high) & judge_high
                too_low = known & (median > 0.0) & (median < cfg.low) & judge_low
        if state.seen <= cfg.zero_start_reports:
            too_high &= ~state.zero_start
        if state.start.solved(report.loss, cfg.solved_fraction):
            too_low[:] = False
        kind = self._latch.judge(report.rank, bool(too_high.any() or too_low.any() or jumped.any()))
        if kind == FIRE:
            if median is None or not (too_high.any() or too_low.any()):
                return self._fire_jump(report, ratio, level, jumped)
            return self._fire(report, median, too_high, too_low)
        return Clear(step=report.step) if kind == CLEAR else None

    def _may_leave_range(self, held: np.ndarray, judge_high: bool, judge_low: bool) -> bool:
        """Whether some layer's median of `held` (finite or NaN) could be judged too high or too low. A median lies
        between its column's least and largest value ((a + b) / 2 rounds within [a, b]; with `high` under
        MEDIAN_BOUND nothing can overflow there), so a median above `high` needs a largest value above it, and a
        positive one under `low` a least value under `low` and a positive largest one."""
        cfg = self._config
        if judge_high and not cfg.high < MEDIAN_BOUND:
            return True
        largest = np.fmax.reduce(held, axis=0)  # NaN for a layer without a value: no candidate
        if judge_high and (largest > cfg.high).any():
            return True
        return judge_low and ((largest > 0.0) & (np.fmin.reduce(held, axis=0) < cfg.low)).any()

    def _may_jump(self, state: _RankState, ratio: np.ndarray) -> bool:
        """Some layer can start a jump (a ratio above jump_floor) or go on with one (a streak)."""
        return bool((state.streak > 0).any() or (ratio > self._config.jump_floor).any())

    def _jump(self, state: _RankState, ratio: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(layers whose ratio jumped jump_factor× above their own level for jump_reports reports in a row, the
        levels); a layer's ratio enters its level unless it is over the jump threshold. The levels are None where
        no layer can start or continue a jump (no ratio above jump_floor, no streak): nothing jumped then."""
        cfg = self._config
        with np.errstate(all="ignore"):
            finite = np.isfinite(ratio)
            if not self._may_jump(state, ratio):
                state.streak = np.zeros(ratio.size, dtype=np.int64)  # (over is False for every layer)
                state.level[state.admitted % cfg.baseline_reports] = np.where(finite, ratio, np.nan)
                state.admitted += 1
                return state.streak >= cfg.jump_reports, None
            if state.admitted >= cfg.baseline_reports // 2:
                level = np.fmin(nanmedian_columns(state.level), _newest(state.level, state.admitted))
                starts = (ratio >= cfg.jump_factor * level) & (ratio > cfg.jump_floor)
                over = finite & (level > 0.0) & np.where(state.streak > 0, ratio >= cfg.jump_hold * level, starts)
            else:
                level, over = np.full(ratio.size, np.nan), np.zeros(ratio.size, dtype=bool)
        state.streak = np.where(over, state.streak + 1, 0)
        state.level[state.admitted % cfg.baseline_reports] = np.where(over | ~finite, np.nan, ratio)
        state.admitted += 1
        return state.streak >= cfg.jump_reports, level

    def _fire_jump(self, report: RankReport, ratio: np.ndarray, level: np.ndarray | None, jumped: np.ndarray) -> Fire:
        assert level is not None  # (something jumped: its levels were taken)
        with np.errstate(all="ignore"):
            worst = int(np.argmax(np.where(jumped, ratio / level, -np.inf)))
        name = report.layer_names[worst] if worst < len(report.layer_names) else None
        value, before = float(ratio[worst]), float(level[worst])
        summary = (
            f"update/weight ratio of layer {name!r} on rank {report.rank} at step {report.step} jumped to "
            f"{value:.2e}, {value / before:.0f}× its own recent level {before:.2e} for {int(jumped.sum())} layer(s), "
            f"{self._config.jump_reports} reports in a row: a learning rate raised far too high for it (or a "
            f"gradient scale that changed)"
        )
        return Fire(step=report.step, value=value, summary=summary, layer=name)

    def _fire(self, report: RankReport, median: np.ndarray, too_high: np.ndarray, too_low: np.ndarray) -> Fire:
        cfg = self._config
        # The worst layer: furthest (in log terms) outside its bound.
        with np.errstate(divide="ignore", invalid="ignore"):  # log of the layers not picked (NaN, ≤ 0)
            distance = np.where(too_high, np.log(median / cfg.high), 0.0)
            distance = np.where(too_low, np.log(cfg.low / median), distance)
        worst = int(np.argmax(distance))
        name = report.layer_names[worst] if worst < len(report.layer_names) else None
        value = float(median[worst])
        direction = "above" if too_high[worst] else "below"
        bound = cfg.high if too_high[worst] else cfg.low
        count = int(np.count_nonzero(too_high | too_low))
        held = min(self._ranks[report.rank].seen, cfg.window)
        hint = "learning rate too high for it" if too_high[worst] else "learning rate too low for it"
        summary = (
            f"update/weight ratio of layer {name!r} on rank {report.rank} at step {report.step} is {value:.2e} "
            f"(median of its last {held} reports), {direction} {bound:.0e}: {hint}; {count} layer(s) out of range"
        )
        return Fire(step=report.step, value=value, summary=summary, layer=name)


def _newest(ring: np.ndarray, admitted: int) -> np.ndarray:
    """Per column, the newest finite value of `ring` (rows written in turn, `admitted` so far; NaN: none)."""
    rows = ring[(admitted - 1 - np.arange(ring.shape[0])) % ring.shape[0]]  # newest first
    finite = np.isfinite(rows)
    newest = rows[np.argmax(finite, axis=0), np.arange(rows.shape[1])]
    return np.where(finite.any(axis=0), newest, np.nan)


SPEC = DetectorSpec(
    name="update_ratio",
    severity="warning",
    description="A layer's update/weight ratio per step stays far from healthy (learning rate off for it).",
    config_type=UpdateRatioConfig,
    factory=lambda config: UpdateRatioDetector(config),
)
