"""When each step's first forward pass starts: the host work a rank does before the step's first collective.

In synchronous data-parallel training every rank's step takes as long as the slowest one's (they wait for it in
the all-reduce), so step durations cannot tell a straggler from the ranks it holds up. What differs is when each
rank is ready: the time from its previous `monitor.step()` to the start of its next forward pass (data loading,
host-side preprocessing) is spent working, and the waiting happens after it. `ForwardClock` records that
moment with a forward pre-hook on the attached model (dispatch.py: a process-wide hook, which torch runs before
the module's own pre-hooks, i.e. before those of wrappers that start collectives such as FSDP2's all-gather;
registered `first` among ours), and reports it as StepReport.pre_forward_s; the server's
straggler detector compares it across ranks.

Cost: one `time.perf_counter()` per forward call; only the first forward after each report counts. Not
recorded where the model's whole call is compiled (`model.compile()`): the hooks step aside there.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from gradwatch.agent import dispatch

__all__ = ["ForwardClock"]


class ForwardClock:
    """Remembers when the first forward pass after the latest report started (training thread only)."""

    def __init__(self, model: nn.Module) -> None:
        self._first: float | None = None
        self._watch = dispatch.watch_module(model, pre=self._on_forward, first=True)

    def _on_forward(self, module: Any, args: Any) -> None:
        if self._first is None:
            self._first = time.perf_counter()

    def take(self, previous_step_at: float | None) -> float | None:
        """Seconds from `previous_step_at` (a perf_counter time) to the first forward since, then forget it."""
        first, self._first = self._first, None
        if first is None or previous_step_at is None or first < previous_step_at:
            return None
        return first - previous_step_at

    def remove(self) -> None:
        self._watch.remove()
