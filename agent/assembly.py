"""One report's device vector, assembled from what the hooks captured (training thread).

`ReportAssembler` owns the taps that feed a report (optimizer, GradScaler, forward hooks), the loss and
label accumulators, and the vector layouts. Contract: `add(loss, labels)` on every `monitor.step()`;
`is_micro_step()` says whether that call only accumulates (gradient accumulation); `assemble(full)` completes
whatever the hooks did not capture (gradients read in `step()` when the optimizer did not step), lays
everything out as vector.py and activations.py say for ONE device vector, and starts its host copy
(snapshot.py: joined on the device for accelerators, on the sender thread for the CPU).
Nothing here reads a tensor value. `remove()` takes every hook off.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gradwatch.agent.activations import ActivationTap, assemble, label_histogram
from gradwatch.agent.amp import ScalerTap
from gradwatch.agent.autopsy import TailItem
from gradwatch.agent.fold import LayerFold
from gradwatch.agent.histogram import LOG2_BINS
from gradwatch.agent.hooks import Capture, OptimizerTap, learning_rates
from gradwatch.agent.items import Assembled
from gradwatch.agent.loss import LossAccumulator
from gradwatch.agent.snapshot import Segment, start_copy
from gradwatch.agent.stats import StatsEngine
from gradwatch.agent.vector import VectorLayout

__all__ = ["ReportAssembler", "TailBuilder"]

TailBuilder = Callable[[int], tuple[list[torch.Tensor], TailItem]]  # offset -> (segments, description)


class ReportAssembler:
    """Builds report vectors for one model (see the module docstring)."""

    def __init__(
        self,
        engine: StatsEngine,
        optimizer: torch.optim.Optimizer | None,
        activations: ActivationTap | None,
        grad_scaler: torch.amp.GradScaler | None,
        begin_step: Callable[[], bool],
        add_agent_time: Callable[[float], None],
        checksum_due: Callable[[], bool] | None = None,
        update_due: Callable[[], bool] | None = None,
    ) -> None:
        """`checksum_due()` / `update_due()`: whether the step being captured takes the parameter checksum /
        measures the update besides full steps."""
        self._engine = engine
        self._optimizer = optimizer
        self._activations = activations
        self._tap: OptimizerTap | None = None
        if optimizer is not None:
            self._tap = OptimizerTap(optimizer, engine, begin_step, add_agent_time, checksum_due, update_due)
        self._scaler_tap = None
        if grad_scaler is not None and optimizer is not None:
            self._scaler_tap = ScalerTap(grad_scaler, optimizer, lambda: engine.layout.device, add_agent_time)
        self._begin_step = begin_step
        self._loss = LossAccumulator()
        self._labels: torch.Tensor | None = None
        self._reported_optimizer_steps = 0
        self._fold = LayerFold.of(engine.layout)
        self._layouts: dict[tuple[bool, int, bool, bool, bool], VectorLayout] = {}

    @property
    def optimizer_tap(self) -> OptimizerTap | None:
        """The optimizer's hooks (None without an optimizer)."""
        return self._tap

    def layout_changed(self) -> None:
        """The engine regrouped its parameters: folds and vector layouts are rebuilt."""
        self._fold = LayerFold.of(self._engine.layout)
        self._layouts.clear()

    def add(self, loss: torch.Tensor | float | None, labels: torch.Tensor | None) -> None:
        """One monitor.step() call: its loss, and its labels when the coming report is a full one."""
        device = self._engine.layout.device
        self._loss.add(loss, device)
        if labels is not None and self._begin_step():
            counts = label_histogram(labels, device)
            if counts is not None:
                self._labels = counts if self._labels is None else self._labels + counts

    def is_micro_step(self, grad_accumulation: bool) -> bool:
        """With gradient accumulation: neither the optimizer nor the GradScaler stepped since the last report."""
        if not grad_accumulation or self._tap is None:
            return False
        scaler_stepped = self._scaler_tap is not None and self._scaler_tap.pending
        return self._tap.steps == self._reported_optimizer_steps and not scaler_stepped

    def assemble(self, full: bool, checksum_due: bool = False, tail: TailBuilder | None = None) -> Assembled:
        """`tail(offset)` adds the guard and autopsy values (autopsy.py) after everything else."""
        engine = self._engine
        captured = self._tap.take() if self._tap is not None else Capture()
        num_params = len(engine.layout.params)
        grads = captured.grads if captured.grads is not None else engine.compute("grad", full)
        weights = captured.weights if captured.weights is not None else engine.compute("weight", full)
        rates = captured.rates if captured.rates is not None else learning_rates(self._optimizer, engine.layout.device)
        updates = captured.updates  # full steps and the update cadence's (measured in the optimizer hooks)
        updates = updates if updates is not None and len(updates) == 2 * num_params else None
        histograms = None
        if full:  # gradients read here when the optimizer hook did not run
            histograms = captured.histograms if captured.grads is not None else None
            histograms = histograms if histograms is not None else engine.grad_histograms()
            histograms = histograms if histograms.numel() == LOG2_BINS * num_params else None
        checksum = None
        if full or checksum_due:  # with the weights it was taken with: in the post-hook, or here when it did not step
            checksum = captured.checksum if captured.weights is not None else engine.checksum()
        lr_values, lr_slots, lr_tensors = rates
        scaler = self._scaler_tap.take() if self._scaler_tap is not None else None
        if scaler is None and self._scaler_tap is not None:  # the scaler did not step: nothing was skipped
            scaler = (engine.zero(), engine.zero())
        if self._tap is not None:
            self._reported_optimizer_steps = self._tap.steps
        loss = self._loss.take()
        loss_0d = loss.tensor if loss.tensor is not None else engine.zero()

        # Every value above is a 0-d tensor on the same device: one stack (on CPU, on the sender thread).
        scalars = [loss_0d, *grads, *weights, *lr_tensors, *(scaler or ()), *(updates or ()), *(checksum or ())]
        segments: list[Segment] = [scalars] if histograms is None else [scalars, histograms]
        capture = self._activations.take() if self._activations is not None else None
        labels, self._labels = self._labels, None
        num_modules = 0 if self._activations is None else len(self._activations.names)
        offset = len(scalars) + (0 if histograms is None else histograms.numel())
        activation_parts, activations = assemble(capture, num_modules, labels, offset, engine.zero())
        segments += activation_parts
        tail_item = None
        if tail is not None:
            size = sum(len(s) if isinstance(s, list) else s.numel() for s in segments)
            tail_segments, tail_item = tail(size)
            segments += tail_segments
        return Assembled(
            values=start_copy(segments),
            layout=self._layout(
                full, len(lr_tensors), updates is not None, histograms is not None, checksum is not None
            ),
            fold=self._fold,
            has_loss=loss.has_loss,
            loss_in_vector=loss.tensor is not None,
            loss=loss.value if loss.has_loss else math.nan,
            learning_rates=lr_values,
            tensor_lr_slots=lr_slots,
            optimizer_step=0 if self._tap is None else self._tap.steps,
            micro_steps=loss.micro_steps,
            activations=activations,
            tail=tail_item,
        )

    def remove(self) -> None:
        """Take every hook off (idempotent)."""
        for tap in (self._tap, self._scaler_tap, self._activations):
            if tap is not None:
                tap.remove()

    def _layout(self, full: bool, num_tensor_lrs: int, updates: bool, histograms: bool, checksum: bool) -> VectorLayout:
        key = (full, num_tensor_lrs, updates, histograms, checksum)
        layout = self._layouts.get(key)
        if layout is None:
            num_params, scaler = len(self._engine.layout.params), self._scaler_tap is not None
            layout = self._layouts[key] = VectorLayout(
                num_params, full, num_tensor_lrs, scaler, updates, histograms, checksum
            )
        return layout
