"""When the parameter checksum is taken: on its own cadence, whatever the overhead budget does to full statistics.

The server compares replicas' checksums (`StatsEngine.checksum`, one integer sum per parameter on the device) at
the steps where every replica sent one. Riding on full-statistics steps made that cadence the budget's: on a
millisecond-step job the budget stretches full statistics to thousands of steps and a flipped bit went unseen
for the whole run. So the checksum has a cadence of its own, decided per step and identical on every replica:

* every `interval` steps, where `interval` is a power of two no larger than MAX_STEPS (a flip is compared within
  MAX_STEPS steps) nor than MAX_SECONDS / the step time (and within MAX_SECONDS of wall time on slow steps);
* powers of two nest: the steps a rank with interval 16 checks include every step a rank with interval 32 checks,
  so replicas whose step-time estimates straddle a boundary still share comparisons (at the larger interval);
* full-statistics steps carry it too (as before).

Its cost is one integer pass over the weights per checked step (bench/checksum_cost.py measures it apart from the
full statistics). Contract: pure arithmetic on the step durations the monitor feeds (training thread).
"""

from __future__ import annotations

import math

__all__ = ["MAX_SECONDS", "MAX_STEPS", "ChecksumCadence"]

#: A flipped bit is compared within this many steps ...
MAX_STEPS = 50
#: ... or within this many seconds of training, whichever comes first.
MAX_SECONDS = 30.0
_ALPHA = 0.2  # weight of the newest step duration in the moving average


class ChecksumCadence:
    """Which steps take the parameter checksum (see the module docstring)."""

    def __init__(self, max_steps: int = MAX_STEPS, max_seconds: float = MAX_SECONDS) -> None:
        self._max_steps = _power_of_two_at_most(max_steps)
        self._max_seconds = max_seconds
        self._step_s: float | None = None
        self.interval = self._max_steps

    def observe(self, step_s: float) -> None:
        """Feed one step's duration (seconds; 0 or non-finite: unknown, ignored)."""
        if not math.isfinite(step_s) or step_s <= 0.0:
            return
        self._step_s = step_s if self._step_s is None else (1 - _ALPHA) * self._step_s + _ALPHA * step_s
        by_time = max(1, int(self._max_seconds / self._step_s))
        self.interval = min(self._max_steps, _power_of_two_at_most(by_time))

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based) takes the checksum."""
        return step % self.interval == 0


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)
