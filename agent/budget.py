"""The overhead budget: keep the agent's share of step time under a fraction by stretching its cadence.

The agent measures, per report, its own time on the training thread (hooks and `step()`; on CPU that
includes its kernels, on an accelerator only their launches) and the step's duration. Exponential moving
averages of the time of an ordinary step, of a full-statistics step and of the step duration give the
full-statistics interval N that keeps

    (ordinary + (full − ordinary) / N) / step  ≤  budget

N never goes below the configured `full_stats_interval` nor above MAX_INTERVAL, and never so high that full
statistics come less often than every FLOOR_S seconds of training (N ≤ FLOOR_S / step time): whatever the
budget, an incident then holds per-layer statistics from at most that long before its alert, and the floor
costs at most (extra cost of a full step) / FLOOR_S of the run's time. When even the ordinary
step alone exceeds the budget (tiny models: the per-step signals cost a few tens of microseconds), N goes to
MAX_INTERVAL and `over_budget` says so: the cheap every-step signals (loss, norms, non-finite flags, NaN
provenance) are never dropped. Decisions start after WARMUP_REPORTS reports, i.e. at the first full-statistics
report at the default interval (so the first hundreds of steps after attach are within budget too, not only
those after a long warm-up), and change N only when it moves by more than a quarter (no flapping); a step far
longer than usual steps of its kind (a pause for evaluation or a checkpoint, PAUSE_FACTOR) is not taken as the
new step time. The step time in these formulas is that of ordinary steps (a full step's duration includes its
own statistics). The monitor counts N from the last full step, so a change of N never brings two close.
Full-statistics steps are judged against full-statistics steps: on a small model one takes many times an
ordinary step, which is their cost, not a pause. A server FULL_STATS command still wins for its steps.

Contract: pure arithmetic on floats, no clock of its own: the monitor feeds `observe()` (training thread).
"""

from __future__ import annotations

import math

__all__ = ["FLOOR_S", "MAX_INTERVAL", "WARMUP_REPORTS", "BudgetController"]

MAX_INTERVAL = 10_000
#: Seconds of training between full-statistics steps at most, whatever the budget (see the module docstring).
FLOOR_S = 10.0
WARMUP_REPORTS = 10
_ALPHA = 0.1  # weight of the newest observation in the moving averages
_HYSTERESIS = 0.25
#: A step this many times longer than the moving average of its kind (ordinary or full-statistics) is a pause
#: (evaluation, checkpoint, a debugger), not a step time: it is left out, unless PAUSES_BEFORE_NEW_NORMAL steps
#: of that kind in a row are (steps got slower).
PAUSE_FACTOR = 5.0
PAUSES_BEFORE_NEW_NORMAL = 3


class BudgetController:
    """Chooses the full-statistics interval for an overhead budget (see the module docstring)."""

    def __init__(self, budget: float, base_interval: int) -> None:
        """`budget`: the agent's allowed share of step time (0.01 = 1 %); 0 turns the controller off."""
        self._budget = budget
        self._base = base_interval
        self._interval = base_interval
        self._over = False
        self._reports = 0
        self._ordinary_s: float | None = None
        self._full_s: float | None = None
        self._step_s: float | None = None
        # Per kind (index: full or not): moving average of the step durations, pauses in a row.
        self._kind_step_s: list[float | None] = [None, None]
        self._pauses = [0, 0]

    @property
    def interval(self) -> int:
        """The full-statistics interval in force."""
        return self._interval

    @property
    def over_budget(self) -> bool:
        """True when the ordinary per-step cost alone exceeds the budget (the interval is then maximal)."""
        return self._over

    @property
    def estimate(self) -> float | None:
        """The agent's estimated share of step time at the interval in force, once measured."""
        step_s = self._ordinary_step_s()
        if self._ordinary_s is None or step_s is None or step_s <= 0:
            return None
        extra = max(0.0, (self._full_s or self._ordinary_s) - self._ordinary_s)
        return (self._ordinary_s + extra / self._interval) / step_s

    def _ordinary_step_s(self) -> float | None:
        """The step time the budget is a share of: that of ordinary steps (a full step's duration holds its own
        statistics: averaging it in would shrink the FLOOR_S interval and add full steps, which lengthen the
        average again), else of all steps while no ordinary one was seen."""
        return self._kind_step_s[0] if self._kind_step_s[0] is not None else self._step_s

    def observe(self, full: bool, agent_s: float, step_s: float) -> int | None:
        """Feed one report's measurements; returns the new interval when it changes, else None."""
        if self._budget <= 0 or agent_s < 0 or step_s <= 0:
            return None
        kind = int(full)
        usual = self._kind_step_s[kind]
        if usual is not None and step_s > PAUSE_FACTOR * usual:
            self._pauses[kind] += 1
            if self._pauses[kind] < PAUSES_BEFORE_NEW_NORMAL:
                return None  # a pause, not a step time (see PAUSE_FACTOR)
        self._pauses[kind] = 0
        self._kind_step_s[kind] = _ewma(usual, step_s)
        self._reports += 1
        if full:
            self._full_s = _ewma(self._full_s, agent_s)
        else:
            self._ordinary_s = _ewma(self._ordinary_s, agent_s)
        self._step_s = _ewma(self._step_s, step_s)
        if self._reports < WARMUP_REPORTS or self._ordinary_s is None or self._full_s is None:
            return None
        wanted = self._wanted()
        if abs(wanted - self._interval) <= _HYSTERESIS * self._interval:
            return None
        self._interval = wanted
        return wanted

    def _wanted(self) -> int:
        step_s = self._ordinary_step_s()
        assert self._ordinary_s is not None and self._full_s is not None and step_s is not None
        room = self._budget * step_s - self._ordinary_s
        floor = max(self._base, min(MAX_INTERVAL, math.floor(FLOOR_S / step_s)))
        self._over = room <= 0
        if self._over:
            return floor
        extra = max(0.0, self._full_s - self._ordinary_s)
        return max(self._base, min(floor, math.ceil(extra / room)))


def _ewma(current: float | None, value: float) -> float:
    return value if current is None else current + _ALPHA * (value - current)
