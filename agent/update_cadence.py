"""When the update ratio |Δw|/|w| is measured: on its own cadence from step 1, whatever the budget does to full
statistics.

The update ratio is the direct read of a learning rate too large for a layer, and it is largest where nothing else
can judge it: in a run's first steps (Adam moves every weight by about the learning rate on its first step, before
any baseline exists) and right after a learning-rate change. Riding on full-statistics steps (every 10 steps at
best, thousands apart once the overhead budget stretches them) it missed both. So it has a cadence of its own,
identical on every replica:

* every step up to WARM_STEPS, where a run broken from its start shows and the server's absolute rule judges it;
* then every EVERY_STEPS steps (a power of two, so the steps nest with the checksum's), and on full steps.

Cost per measured step: a copy of each parameter's update sample before the optimizer step (whole tensors up to
stats.UPDATE_SAMPLE_ELEMENTS elements, a fixed block sample above) and two sums of squares after it; nothing is
read on the host. bench/checksum_cost.py measures it beside the checksum. Contract: pure arithmetic on the step
number (training thread).
"""

from __future__ import annotations

__all__ = ["EVERY_STEPS", "WARM_STEPS", "update_due"]

#: Every step up to this one measures the update ratio ...
WARM_STEPS = 16
#: ... then every this many steps.
EVERY_STEPS = 8


def update_due(step: int) -> bool:
    """Whether step `step` (1-based) measures the update ratio (full-statistics steps always do)."""
    return step <= WARM_STEPS or step % EVERY_STEPS == 0
