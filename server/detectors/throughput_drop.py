"""throughput_drop: the run's steps per second fall well below its own recent baseline.

Rationale
---------
A job that silently runs at half speed (thermal throttling, a degraded network link,
a noisy neighbour, a data pipeline that lost its cache, swapping) wastes as much
compute as a crash, and nothing fails. Absolute rates mean nothing across models, so
the run is compared with itself: once every rank has reported a step, the run's time
for that step is the median over ranks of the reported step durations (the median:
one slow rank is the straggler detector's business). The current pace is the median
of the last `recent` step times; the baseline the median of the last `window` step
times taken while the run was healthy (slow steps never enter it, so a drop cannot
absorb itself into "normal"). It fires when current / baseline steps per second falls
below `ratio` for `consecutive` steps in a row lasting at least `sustain_s` seconds
(a slowdown of a few seconds costs little, and fast-stepping jobs on a busy host
jitter by several times over a handful of steps), after `min_steps` steps of warm-up,
and resolves after `resolve_after` steps back above it. A run that stops altogether
completes no steps: that is the `stalled` detector's case.

The alert is about the run, so it names every rank that reported (with its host).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.batch import ReportBatch
from gradwatch.server.detectors.robust import median as median_of
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.ring import FloatRing
from gradwatch.server.settings import SettingError, setting
from gradwatch.server.step_pending import StepPlan, plan

__all__ = ["PENDING_STEPS", "SPEC", "ThroughputDropConfig", "ThroughputDropDetector"]

#: Steps waiting for the other ranks' durations; older ones are dropped (a rank that stopped reporting).
PENDING_STEPS = 64


@dataclass(frozen=True)
class ThroughputDropConfig(DetectorConfig):
    ratio: float = setting(0.5, doc="Fire below this fraction of the baseline steps per second.", gt=0.0, lt=1.0)
    window: int = setting(200, doc="Healthy step times in the baseline median.", ge=5)
    min_steps: int = setting(30, doc="Steps that only build the baseline (warm-up).", ge=3)
    recent: int = setting(5, doc="Latest step times whose median is the current pace.", ge=1)
    consecutive: int = setting(10, doc="Steps in a row below the ratio before firing ...", ge=1)
    sustain_s: float = setting(
        60.0, doc="... and seconds since the first of them (a slowdown of seconds is noise, not lost compute).", ge=0.0
    )
    resolve_after: int = setting(10, doc="Steps in a row at or above the ratio before it resolves.", ge=1)

    def _check(self) -> None:
        if self.min_steps > self.window:
            raise SettingError("min_steps", f"must be ≤ window ({self.window}), got {self.min_steps}")


class ThroughputDropDetector:
    """Compares the run's recent step time with its own healthy baseline, step by step."""

    def __init__(self, config: ThroughputDropConfig) -> None:
        self._config = config
        self._pending: collections.OrderedDict[int, dict[int, float]] = collections.OrderedDict()
        self._baseline = FloatRing(config.window)
        self._recent = FloatRing(config.recent)
        self._slow_streak = 0
        self._slow_since = 0.0  # server time of the first step of the current slow streak
        self._ok_streak = 0
        self._fired: np.ndarray = np.zeros(0, dtype=np.int64)

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        duration = report.step_duration_s
        if report.step <= 1 or not math.isfinite(duration) or duration <= 0:
            return ()  # the first step has no duration
        durations = self._pending.get(report.step)
        if durations is None:
            durations = self._pending[report.step] = {}
            while len(self._pending) > PENDING_STEPS:
                self._pending.popitem(last=False)
        durations[report.rank] = duration
        if len(durations) < ranks.size:
            return ()
        del self._pending[report.step]
        step_time = median_of(np.fromiter(durations.values(), dtype=np.float64))
        return self._judge(step_time, report.step, report.received_at, ranks)

    def plan_batch(self, batch: ReportBatch, ranks: RankTable) -> tuple[np.ndarray, StepPlan] | None:
        with np.errstate(invalid="ignore"):
            timed = np.flatnonzero((batch.step > 1) & np.isfinite(batch.step_duration_s) & (batch.step_duration_s > 0))
        steps = plan(self._pending, batch.step[timed], batch.rank[timed], ranks.size, PENDING_STEPS,  # type: ignore[arg-type]
                     _has_ranks, first_wins=False)  # fmt: skip
        return None if steps is None else (timed, steps)

    def observe_batch(self, batch: ReportBatch, ranks: RankTable, planned: tuple[np.ndarray, StepPlan]
                      ) -> list[tuple[int, Finding]]:  # fmt: skip
        """`observe` for every report of the batch (see server/detectors/batch.py)."""
        timed, steps = planned
        for key in steps.dropped:
            del self._pending[key]  # type: ignore[arg-type]
        ranks_of, durations = batch.rank[timed], batch.step_duration_s[timed]
        for key, taken, new in zip(steps.keys, steps.taken, steps.new, strict=True):
            held = self._pending[key] = {} if new else self._pending[key]  # type: ignore[index]
            held.update(zip(ranks_of[taken].tolist(), durations[taken].tolist(), strict=True))
        findings: list[tuple[int, Finding]] = []
        for i in steps.completions():
            held = self._pending.pop(steps.keys[i])  # type: ignore[call-overload]
            step_time = median_of(np.fromiter(held.values(), dtype=np.float64))
            at = int(timed[steps.completed_at[i]])
            findings += [(at, f) for f in self._judge(step_time, int(steps.keys[i]), batch.received_at, ranks)]  # type: ignore[call-overload]
        return findings

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        return ()  # judged per completed step; a run completing no steps at all is the stalled detector's

    def _judge(self, step_time: float, step: int, now: float, ranks: RankTable) -> Sequence[Finding]:
        cfg = self._config
        self._recent.append(step_time)
        if self._baseline.count < cfg.min_steps:
            self._baseline.append(step_time)
            return ()
        baseline = median_of(self._baseline.unordered())
        current = median_of(self._recent.unordered())
        ratio = baseline / current if current > 0 else math.inf
        slow = ratio < cfg.ratio
        if slow and self._slow_streak == 0:
            self._slow_since = now
        self._slow_streak = self._slow_streak + 1 if slow else 0
        self._ok_streak = 0 if slow else self._ok_streak + 1
        if self._fired.size:
            if not slow and self._ok_streak >= cfg.resolve_after:
                fired, self._fired = self._fired, np.zeros(0, dtype=np.int64)
                return [Finding(int(r), Clear(step=step)) for r in fired]
            if slow:  # keep the alert's step and value current (one rank is enough for that)
                return [Finding(int(self._fired[0]), Fire(step, ratio, ""))]
            return ()
        if not slow:
            self._baseline.append(step_time)
            return ()
        if self._slow_streak < cfg.consecutive or now - self._slow_since < cfg.sustain_s:
            return ()
        self._fired = np.flatnonzero(ranks.reports > 0)
        summary = (
            f"throughput fell to {ratio:.2f}× the run's baseline at step {step}: {1 / current:.3g} steps/s "
            f"(median step time {current:.3g} s over the last {self._recent.count} steps) vs {1 / baseline:.3g} "
            f"steps/s ({baseline:.3g} s), for {self._slow_streak} steps; all {self._fired.size} ranks: "
            f"{ranks.describe(self._fired, limit=4)}"
        )
        return [Finding(int(r), Fire(step, ratio, summary)) for r in self._fired]


def _has_ranks(held: object, ranks: np.ndarray) -> np.ndarray:
    """Which of `ranks` a held step's durations have."""
    return np.fromiter((r in held for r in ranks.tolist()), dtype=bool, count=ranks.size)  # type: ignore[operator]


SPEC = DetectorSpec(
    name="throughput_drop",
    severity="warning",
    description="The run's steps per second fell well below its own recent baseline.",
    config_type=ThroughputDropConfig,
    factory=lambda config: ThroughputDropDetector(config),
    scope="run",
)
