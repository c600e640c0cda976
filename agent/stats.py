"""Gradient and weight statistics, computed on the model's device without a host sync.

Contract: `StatsEngine.compute(source, full)` returns the per-parameter statistics of `source` ("grad" or
"weight") as a list of 0-d float32 tensors (float64 for float64 parameters) on the layout's device, column
after column in the order of vector.PARAM_COLUMNS (norm only, or all five on full steps), parameters in
layout order. The caller stacks the lists of one report into ONE tensor (a single kernel). Nothing here calls
`.item()`, `.cpu()`, `.tolist()`, `bool()` or branches on a tensor value: it only queues kernels, one foreach
launch per (device, dtype) group and column for norms, max |x| and non-zero counts. Folding parameters into
layers happens later on the host (fold.py).

Semantics, per parameter:
- A parameter without a gradient (or with an empty one) counts as all zeros, never as non-finite; so do
  integer and complex parameters, which have no meaningful norm here.
- DTensor parameters (FSDP2) contribute their local shard: per-rank sums of squares combine exactly on the
  server, and no collective runs here.
- Sparse gradients contribute their stored values (uncoalesced: duplicates are not summed first).
- Parameters on another device than the first group's are moved there value by value (a rare layout;
  non_blocking device-to-device copies).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from gradwatch.agent.schema import ModelLayout, ParamGroup, is_stale, local_tensor, regroup

__all__ = ["Source", "StatsEngine"]

Source = Literal["grad", "weight"]
_F32 = torch.float32


class StatsEngine:
    """Computes per-parameter statistics for one model layout. Call on the training thread only."""

    def __init__(self, layout: ModelLayout) -> None:
        self._layout = layout
        self._zeros: dict[torch.device, torch.Tensor] = {}

    @property
    def layout(self) -> ModelLayout:
        return self._layout

    def zero(self) -> torch.Tensor:
        """A cached 0-d float32 zero on the layout's device (a placeholder that costs no kernel)."""
        return self._zero(self._layout.device)

    def refresh(self) -> ModelLayout:
        """Regroup if the model was moved or cast since attach (same parameters, new device/dtype groups)."""
        if is_stale(self._layout):
            self._layout = regroup(self._layout)
        return self._layout

    def compute(self, source: Source, full: bool) -> list[torch.Tensor]:
        """Per-parameter statistics of `source`; see the module docstring for the order."""
        layout = self._layout
        columns: list[list[torch.Tensor]] = [[] for _ in range(5 if full else 1)]
        with torch.no_grad():
            for group in layout.groups:
                for column, values in zip(columns, self._group_stats(group, source, full), strict=True):
                    column.extend(values)
        return [value for column in columns for value in column]

    def _group_stats(self, group: ParamGroup, source: Source, full: bool) -> list[list[torch.Tensor]]:
        """Each column for one (device, dtype) group, one 0-d tensor per parameter, in group order."""
        params = self._layout.params[group.start : group.stop]
        if group.dtype.is_floating_point:
            tensors = [_observed(p, source, self._layout.has_dtensor) for p in params]
        else:  # integer or complex parameters: nothing meaningful to summarise, reported as zeros
            tensors = [None] * len(params)
        present = [t for t in tensors if t is not None]
        # Accumulate half precision in float32 (an fp16 norm overflows at 65504); float64 stays float64 and
        # the report vector is promoted by the stack.
        accumulate = torch.float64 if group.dtype == torch.float64 else _F32
        stats: list[list[torch.Tensor]] = [[] for _ in range(5 if full else 1)]
        if present:
            # foreach kernels: one launch (or a few) per group instead of one per tensor. ord=inf gives max|x|
            # without materialising abs() copies of every tensor (what _foreach_max(_foreach_abs()) would do);
            # ord=0 counts non-zero elements (NaN counts as non-zero, which is what the zero fraction needs).
            stats[0] = list(torch._foreach_norm(present, 2.0, dtype=accumulate))
            if full:
                stats[1] = list(torch._foreach_norm(present, math.inf, dtype=accumulate))
                stats[2] = [t.sum(dtype=accumulate) for t in present]
                # One bool mask at a time: the peak extra memory is 1 byte per element of the largest tensor.
                stats[3] = [torch.isfinite(t).logical_not_().sum(dtype=_F32) for t in present]
                stats[4] = list(torch._foreach_norm(present, 0.0, dtype=accumulate))
        if len(present) != len(tensors):
            zero = self._zero(group.device)
            stats = [_fill(values, tensors, zero) for values in stats]
        target = self._layout.device
        if group.device != target:
            stats = [[v.to(target, non_blocking=True) for v in values] for values in stats]
        return stats

    def _zero(self, device: torch.device) -> torch.Tensor:
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), dtype=_F32, device=device)
        return zero


def _observed(p: torch.nn.Parameter, source: Source, has_dtensor: bool) -> torch.Tensor | None:
    """The tensor to summarise for `p` (its gradient or its value), or None when there is nothing to see."""
    t = p.grad if source == "grad" else p
    if t is None:
        return None
    if has_dtensor:
        t = local_tensor(t)
    if t.is_sparse:
        t = t._values()
    # Empty tensors (an FSDP rank's empty shard) have no max; they are all-zero for every column.
    return t if t.numel() else None


def _fill(values: list[torch.Tensor], tensors: list[torch.Tensor | None], zero: torch.Tensor) -> list[torch.Tensor]:
    found = iter(values)
    return [zero if t is None else next(found) for t in tensors]
