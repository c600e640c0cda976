"""The optimizer tap: step pre/post hooks that capture what the next report needs.

Contract
- The pre-hook runs inside `optimizer.step()` before the update, where gradients are final (after the DDP
  all-reduce or the FSDP2 reduce-scatter) and still there even if the user calls zero_grad() before
  monitor.step(): it queues the gradient statistics and reads the learning rates actually used. A step given
  a closure (`optimizer.step(closure)`: Lightning, LBFGS) computes this step's gradients inside the step, after
  the pre-hook (and a framework clips them there): then the gradient statistics are read in the post-hook,
  i.e. the gradients the update applied (optimizers do not change `.grad`).
- The post-hook runs after the update and queues the weight statistics (full-statistics steps only; see
  StatsEngine.compute). On full-statistics steps and on the update ratio's own cadence (update_cadence.py) the
  pre-hook also copies a fixed sample of every parameter (stats.StatsEngine.weight_sample) and the post-hook
  measures the update against it (|Δw|, for the update ratio |Δw|/|w|; a smaller sample between full steps,
  stats.CADENCE_SAMPLE_ELEMENTS); on full steps and the checksum's cadence
  it takes the parameter checksum (StatsEngine.checksum, compared across replicas by the server).
- Both only queue device kernels and keep the 0-d result tensors; they never read `.grad` values on the host,
  never mutate what they observe, and send failures to errors.report. `remove()` takes both hooks off.
- Several optimizer steps between two reports (or none) are fine: the latest capture wins, and monitor.step()
  computes whatever is missing itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradwatch.agent import dispatch, errors
from gradwatch.agent.stats import CADENCE_SAMPLE_ELEMENTS, UPDATE_SAMPLE_ELEMENTS, StatsEngine

__all__ = ["Capture", "LearningRates", "OptimizerTap", "has_closure", "learning_rates"]

# (one rate per param group, NaN where the rate is a tensor; those groups' indexes; the 0-d tensor rates)
LearningRates = tuple[list[float], tuple[int, ...], list[torch.Tensor]]


def learning_rates(optimizer: torch.optim.Optimizer | None, device: torch.device) -> LearningRates:
    """Read param_groups' rates: floats as they are; a tensor rate (capturable/fused optimizers) is not read on
    the host but copied to `device` to travel in the report vector, so reading it never syncs."""
    if optimizer is None:
        return [], (), []
    rates: list[float] = []
    slots: list[int] = []
    tensors: list[torch.Tensor] = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            rates.append(math.nan)
            slots.append(index)
            # A scheduler changes a tensor rate in place: on the CPU, where the report vector is joined later on
            # the sender thread (snapshot.py), a copy keeps the rate this step used.
            copy = device.type == "cpu"
            tensors.append(lr.detach().reshape(()).to(device=device, dtype=torch.float32, non_blocking=True, copy=copy))
        else:
            rates.append(float(lr) if isinstance(lr, int | float) else math.nan)
    return rates, tuple(slots), tensors


@dataclass(slots=True)  # not frozen: built on every step, and a frozen __init__ costs 5x
class Capture:
    """What the optimizer hooks captured for one report (None: not captured)."""

    grads: list[torch.Tensor] | None = None
    weights: list[torch.Tensor] | None = None
    rates: LearningRates | None = None
    updates: list[torch.Tensor] | None = None
    histograms: torch.Tensor | None = None
    checksum: list[torch.Tensor] | None = None


class OptimizerTap:
    """Hooks on one optimizer that capture gradient statistics, weight statistics and learning rates."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        engine: StatsEngine,
        begin_step: Callable[[], bool],
        add_agent_time: Callable[[float], None],
        checksum_due: Callable[[], bool] | None = None,
        update_due: Callable[[], bool] | None = None,
    ) -> None:
        """`begin_step()` says whether the step being captured is a full-statistics step, `checksum_due()` whether
        it takes the parameter checksum and `update_due()` whether it measures the update (their own cadences; full
        steps always do both); the time spent in
        the hooks is handed to `add_agent_time` (it counts as the agent's time on the training thread)."""
        self._optimizer = optimizer
        self._engine = engine
        self._begin_step = begin_step
        self._checksum_due = checksum_due
        self._update_due = update_due
        self._add_agent_time = add_agent_time
        self._active = True
        self.steps = 0  # optimizer steps seen
        self._grads: list[torch.Tensor] | None = None
        self._weights: list[torch.Tensor] | None = None
        self._rates: LearningRates | None = None
        self._before: list[torch.Tensor | None] | None = None
        self._updates: list[torch.Tensor] | None = None
        self._histograms: torch.Tensor | None = None
        self._checksum: list[torch.Tensor] | None = None
        self._sample_elements = UPDATE_SAMPLE_ELEMENTS  # of the weight sample the pre-hook took
        self._grads_after = False  # this step has a closure: gradients are read in the post-hook
        # The layout's parameters and their gradient norms, between this step's pre- and post-hook (the guard
        # judges the same norms instead of a second pass over the gradients: guard_norm.py).
        self._step_norms: tuple[tuple[torch.Tensor, ...], list[torch.Tensor]] | None = None
        # Process-wide hooks filtered to this optimizer (dispatch.py): nothing is stored on the optimizer, so
        # its state_dict(), deepcopy and pickling never meet the agent.
        self._watch: dispatch.Watch | None = dispatch.watch_optimizer(
            optimizer, pre=self._before_step, post=self._after_step
        )

    def take(self) -> Capture:
        """The captures since the last call (None where the optimizer did not step): gradient statistics,
        weight statistics, learning rates, update columns and gradient histograms (the last two on full
        steps only); then forget them."""
        captured = Capture(self._grads, self._weights, self._rates, self._updates, self._histograms, self._checksum)
        self._grads = self._weights = self._rates = self._updates = self._histograms = self._checksum = None
        return captured

    def step_grad_norms(self) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]] | None:
        """Inside an optimizer step (after this tap's pre-hook): the layout's parameters and the L2 norms of
        their gradients (0-d, layout order; a parameter without one: 0) computed for this step's report;
        None outside a step or when the gradients are read after it (a closure)."""
        return self._step_norms

    def remove(self) -> None:
        """Take both hooks off (idempotent); a hook already running finishes as a no-op."""
        self._active = False
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.remove()

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        self._step_norms = None
        with errors.guarded("optimizer_pre_hook", self._add_agent_time):
            full = self._begin_step()
            self._grads_after = has_closure(args, kwargs)
            if not self._grads_after:
                params = self._engine.layout.params
                self._grads = self._engine.compute("grad", full)
                self._step_norms = (params, self._grads[: len(params)])
                self._histograms = self._engine.grad_histograms() if full else None
            measure = full or (self._update_due is not None and self._update_due())
            self._sample_elements = UPDATE_SAMPLE_ELEMENTS if full else CADENCE_SAMPLE_ELEMENTS
            self._before = self._engine.weight_sample(self._sample_elements) if measure else None
            self._rates = learning_rates(self._optimizer, self._engine.layout.device)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        self._step_norms = None
        with errors.guarded("optimizer_post_hook", self._add_agent_time):
            self.steps += 1
            full = self._begin_step()
            if self._grads_after:
                self._grads_after = False
                self._grads = self._engine.compute("grad", full)
                self._histograms = self._engine.grad_histograms() if full else None
            self._weights = self._engine.compute("weight", full)
            due = full or (self._checksum_due is not None and self._checksum_due())
            self._checksum = self._engine.checksum() if due else None
            before, self._before = self._before, None
            if before is not None:
                self._updates = self._engine.update_stats(before, self._sample_elements)


def has_closure(args: Any, kwargs: Any) -> bool:
    """Whether `optimizer.step(...)` was called with a closure (positionally or by keyword). torch hands step
    hooks the step's own `args`, which start with the optimizer itself: a positional closure is `args[1]`."""
    closure = kwargs.get("closure") if kwargs else None
    if closure is None and len(args) > 1:
        closure = args[1]
    return callable(closure)
