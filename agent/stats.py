"""Gradient and weight statistics, computed on the model's device without a host sync.

Contract: `StatsEngine.compute(source, full)` returns the per-parameter statistics of `source` ("grad" or
"weight") as a list of 0-d tensors on the layout's device (float32, float64 for float64 parameters; the
caller's stack promotes the few integer counts and half-precision maxima to that dtype), column
after column in the order of vector.PARAM_COLUMNS (norm only, or all seven on full steps), parameters in
layout order. The caller stacks the lists of one report into ONE tensor (a single kernel). Nothing here calls
`.item()`, `.cpu()`, `.tolist()`, `bool()` or branches on a tensor value: it only queues kernels. Norms are one
foreach launch per (device, dtype) group. On full steps the other columns, the gradient histograms and the
checksum reduce small tensors (up to stacks.STACK_ELEMENTS elements) by same-shape stacks: a few launches per
distinct (shape, dtype) and per STACK_BYTES, the same values as one tensor at a time (stacks.py); larger tensors
cost a few launches each, which their own memory traffic outweighs. Folding parameters into layers happens
later on the host (fold.py).

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

import contextlib
import math
from typing import Literal

import torch

from gradwatch.agent import clip
from gradwatch.agent import stacks as stacks_module
from gradwatch.agent.histogram import LOG2_BINS, log2_histograms
from gradwatch.agent.histogram import SAMPLE_ELEMENTS as HISTOGRAM_SAMPLE
from gradwatch.agent.sampling import block_sample, sampled_non_finite
from gradwatch.agent.schema import ModelLayout, ParamGroup, is_stale, local_tensor, regroup
from gradwatch.agent.stacks import STACK_ELEMENTS, stackable, stacks
from gradwatch.agent.vector import CHECKSUM_PIECES, PARAM_COLUMNS

__all__ = ["Source", "StatsEngine"]

Source = Literal["grad", "weight"]
_F32 = torch.float32
_NUM_FULL = len(PARAM_COLUMNS)
#: Elements per parameter whose update |Δw| is measured exactly; larger tensors use a fixed block sample
#: of about this many elements (the same elements every step; sampling.py), extrapolated by numel / sample.
UPDATE_SAMPLE_ELEMENTS = 65536
#: The same between full steps (the update ratio's own cadence, update_cadence.py): a ratio of sums of squares
#: over a fixed sample of 4096 elements is within a few per cent of the whole tensor's, which is all a ratio
#: judged against 0.3 or a tenfold jump needs, at a sixteenth of the memory traffic.
CADENCE_SAMPLE_ELEMENTS = 4096
#: On the CPU, non-zero and non-finite elements of larger tensors are counted on a fixed block sample of about
#: this many elements (sampling.py), extrapolated by numel / sample: a pass over the whole tensor costs as much
#: as its norm or more (count_nonzero, and the x - x copy the non-finite count needs), and a proportion is
#: estimated to within about ±0.4 % from 65536 samples. Accelerators count every element (foreach launches).
ZERO_SAMPLE_ELEMENTS = 65536
#: Integer dtype of each element size, to read a tensor's bit patterns (Tensor.view(dtype) reinterprets, no copy).
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class StatsEngine:
    """Computes per-parameter statistics for one model layout. Call on the training thread only."""

    def __init__(self, layout: ModelLayout) -> None:
        self._layout = layout
        self._zeros: dict[torch.device, torch.Tensor] = {}
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self._empties: dict[torch.device, torch.Tensor] = {}

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
        """Per-parameter statistics of `source`; see the module docstring for the order.

        Weights are read on full-statistics steps only; on other steps their norm column is the cached zero
        (no kernel). Why: reading every weight costs as much as reading every gradient, and weights only turn
        non-finite through a non-finite gradient or update, which the every-step gradient norms already flag.
        """
        layout = self._layout
        if source == "weight" and not full:
            return [self.zero()] * len(layout.params)
        columns: list[list[torch.Tensor]] = [[] for _ in range(_NUM_FULL if full else 1)]
        # Ordinary steps read gradients alone and need no grad-mode context (_group_stats detaches the rare
        # gradient that requires grad itself); full steps also read the weights, which require grad.
        with torch.no_grad() if full else contextlib.nullcontext():
            for group in layout.groups:
                for column, values in zip(columns, self._group_stats(group, source, full), strict=True):
                    column.extend(values)
        return [value for column in columns for value in column]

    def checksum(self) -> list[torch.Tensor]:
        """An exact checksum of this rank's parameter values: the sum, in wrapping int64 arithmetic, of the bit
        patterns of every element (local shards for DTensors), as CHECKSUM_PIECES 0-d float32 tensors holding 16
        bits each, least significant first (exact in float32; wire.py reassembles them). Integer addition is
        exact and order-independent, so replicas holding the same values agree to the bit whatever the kernel's
        reduction order, and one flipped bit anywhere changes the sum. The bits are summed as 64-bit words where
        the tensor's bytes allow (a view, no widening copy), else element by element widened to int64. One
        integer sum per same-shape stack of small tensors (stacks.py) and per larger tensor (full-statistics
        steps and the checksum's cadence); nothing is read on the host."""
        layout = self._layout
        target = layout.device
        with torch.no_grad():
            tensors = []
            for p in layout.params:
                t = local_tensor(p.detach()) if layout.has_dtensor else p
                if t.numel() == 0 or t.is_sparse:
                    continue
                if t.is_complex():
                    t = torch.view_as_real(t)
                elif t.dtype == torch.bool:
                    t = t.to(torch.uint8)
                tensors.append(t)
            # Small tensors of one shape summed as one stack (stacks.py; integer sums: any order, any layout).
            chunks, rest = stacks(tensors, _small)
            sums = [_bit_sum(x, x.shape[1]).to(target, non_blocking=True) for _, x in chunks]
            sums += [_bit_sum(tensors[i]).to(target, non_blocking=True) for i in rest]
            total = torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.int64, device=target)
            shifts = self._shifts.get(target)
            if shifts is None:  # made on the device (a kernel, not a host copy), once per device
                shifts = self._shifts[target] = torch.arange(CHECKSUM_PIECES, dtype=torch.int64, device=target) * 16
            pieces = torch.bitwise_and(torch.bitwise_right_shift(total, shifts), 0xFFFF).to(_F32)
        return list(pieces.unbind())

    def grad_histograms(self) -> torch.Tensor:
        """Per-parameter log2-magnitude histograms of the gradients, (P × LOG2_BINS) flattened, float32
        (an absent or non-floating gradient has an all-zero histogram). Full steps only."""
        target = self._layout.device
        params = self._layout.params
        rows: list[torch.Tensor | None] = [None] * len(params)
        # Per scale (numel / sampled elements), the values histogrammed: small tensors whole, others' block
        # samples (histogram.py); histogrammed by same-size stacks (stacks.py), a few launches per size.
        by_scale: dict[float, tuple[list[int], list[torch.Tensor]]] = {}
        with torch.no_grad():
            for index, p in enumerate(params):
                t = _observed(p, "grad", self._layout.has_dtensor) if p.is_floating_point() else None
                if t is not None:
                    values, scale = (t, 1.0) if stackable(t) else block_sample(t, HISTOGRAM_SAMPLE)
                    indexes, samples = by_scale.setdefault(scale, ([], []))
                    indexes.append(index)
                    samples.append(values)
            for scale, (indexes, samples) in by_scale.items():
                chunks, _ = stacks(samples, _any)
                for positions, x in chunks:
                    for position, row in zip(positions, log2_histograms(x, scale, target).unbind(), strict=True):
                        rows[indexes[position]] = row
        empty = self._empty_histogram(target)
        return torch.cat([empty if row is None else row for row in rows])

    def weight_sample(self, elements: int = UPDATE_SAMPLE_ELEMENTS) -> list[torch.Tensor | None]:
        """Copies of each parameter's update sample of about `elements` elements (before an optimizer step). A
        sample of a large tensor is already a copy (sampling.py); small tensors are copied whole, all in one
        foreach kernel."""
        with torch.no_grad():
            samples = [self._sample(p, elements) for p in self._layout.params]
            whole = [s[0] for s in samples if s is not None and s[1] == 1.0]
            copies = iter(torch._foreach_mul(whole, 1.0) if whole else ())
            return [None if s is None else next(copies) if s[1] == 1.0 else s[0] for s in samples]

    def update_stats(
        self, before: list[torch.Tensor | None], elements: int = UPDATE_SAMPLE_ELEMENTS
    ) -> list[torch.Tensor]:
        """After the step: per parameter scale·|Δw|² over the sample, then scale·|w|² of the weights before the
        step (the scale the update is judged against: a parameter that starts at zero has none, and its first
        ratio is not finite), as 0-d float32 tensors (UPDATE_COLUMNS order), scale = elements / sampled
        elements. `elements`: the sample size `before` was taken with. Exact for tensors up to that many
        elements. A few foreach kernels for all parameters (a difference, two norms, two squares), whatever their
        number."""
        zero = self.zero()
        target = self._layout.device
        updates: list[torch.Tensor] = [zero] * len(before)
        weights: list[torch.Tensor] = [zero] * len(before)
        with torch.no_grad():
            slots, news, olds, scales = [], [], [], []
            for index, (p, old) in enumerate(zip(self._layout.params, before, strict=True)):
                sampled = self._sample(p, elements)
                if old is None or sampled is None or sampled[0].shape != old.shape:
                    continue
                slots.append(index)
                news.append(sampled[0].to(_F32))
                olds.append(old.to(_F32))
                scales.append(sampled[1])
            if slots:
                moved = torch._foreach_norm(torch._foreach_sub(news, olds))
                held = torch._foreach_norm(olds)
                moved, held = torch._foreach_mul(moved, moved), torch._foreach_mul(held, held)
                for index, scale, update, weight in zip(slots, scales, moved, held, strict=True):
                    if scale != 1.0:
                        update, weight = update * scale, weight * scale
                    updates[index] = update.to(target, non_blocking=True)
                    weights[index] = weight.to(target, non_blocking=True)
        return updates + weights

    def _sample(self, p: torch.nn.Parameter, elements: int) -> tuple[torch.Tensor, float] | None:
        """The parameter's update sample and elements / sampled elements (1.0: the tensor itself, a view)."""
        t = local_tensor(p.detach()) if self._layout.has_dtensor else p  # read under no_grad: no detach needed
        if not t.is_floating_point() or t.numel() == 0 or t.is_sparse:
            return None
        if t.numel() <= elements and t.is_contiguous():  # the tensor itself: its flat view holds the same values
            return t, 1.0
        return block_sample(t, elements)

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
        stats: list[list[torch.Tensor]] = [[] for _ in range(_NUM_FULL if full else 1)]
        if present:
            # foreach kernels: one launch (or a few) per group instead of one per tensor. ord=inf gives max|x|
            # without materialising abs() copies of every tensor (what _foreach_max(_foreach_abs()) would do);
            # ord=0 counts non-zero elements (NaN counts as non-zero, which is what the zero fraction needs).
            if not full and any(t.requires_grad for t in present):  # a create_graph backward's gradients
                present = [t.detach() for t in present]
            clipped = _clipped_norms(present) if source == "grad" else None  # the loop's clip measured them
            stats[0] = clipped if clipped is not None else list(torch._foreach_norm(present, 2.0, dtype=accumulate))
            if full:
                stats[1:] = _full_columns(present, group.device, accumulate)
        if len(present) != len(tensors):
            zero = self._zero(group.device)
            stats = [_fill(values, tensors, zero) for values in stats]
        target = self._layout.device
        if group.device != target:
            stats = [[v.to(target, non_blocking=True) for v in values] for values in stats]
        return stats

    def _empty_histogram(self, device: torch.device) -> torch.Tensor:
        empty = self._empties.get(device)
        if empty is None:
            empty = self._empties[device] = torch.zeros(LOG2_BINS, dtype=_F32, device=device)
        return empty

    def _zero(self, device: torch.device) -> torch.Tensor:
        zero = self._zeros.get(device)
        if zero is None:
            zero = self._zeros[device] = torch.zeros((), dtype=_F32, device=device)
        return zero


def _full_columns(
    tensors: list[torch.Tensor], device: torch.device, accumulate: torch.dtype
) -> list[list[torch.Tensor]]:
    """The full-step columns after the norm (PARAM_COLUMNS[1:]) of these tensors of one (device, dtype) group:
    row-wise over same-shape stacks of the small ones (stacks.py: a few launches per shape, the same values),
    one tensor at a time for the rest."""
    columns: list[list[torch.Tensor | None]] = [[None] * len(tensors) for _ in range(_NUM_FULL - 1)]
    chunks, rest = stacks(tensors)
    stacked_sum = stacks_module.rows_sum_alike(device)  # else each tensor is summed alone (stacks.py)
    for positions, x in chunks:
        lows, highs = x.amin(1), x.amax(1)  # NaN propagates into both, an Inf into one
        peak = torch.maximum(lows.neg(), highs)
        sums = (
            x.sum(1, dtype=accumulate)
            if stacked_sum
            else torch.stack([tensors[i].sum(dtype=accumulate) for i in positions])
        )
        # Every element read, so the count of x - x != 0 (NaN for NaN and Inf) is exact: no floor of 1 needed.
        rows = torch.stack([peak, sums, torch.count_nonzero(x - x, dim=1), torch.count_nonzero(x, dim=1), lows, highs])
        _place_rows(columns, positions, rows)
    if rest:
        _place(columns, rest, _single_columns([tensors[i] for i in rest], device, accumulate))
    return columns  # type: ignore[return-value]  # every position filled above


def _place_rows(columns: list[list[torch.Tensor | None]], positions: list[int], rows: torch.Tensor) -> None:
    """Put row c of `rows` (one value per position) into column c."""
    found, k = rows.view(-1).unbind(), len(positions)  # one unbind (not one per row): views, no kernel
    _place(columns, positions, [list(found[c * k : (c + 1) * k]) for c in range(len(columns))])


def _place(columns: list[list[torch.Tensor | None]], positions: list[int], values: list[list[torch.Tensor]]) -> None:
    """Put each column's values at `positions`."""
    for column, found in zip(columns, values, strict=True):
        for i, value in zip(positions, found, strict=True):
            column[i] = value


def _single_columns(
    present: list[torch.Tensor], device: torch.device, accumulate: torch.dtype
) -> list[list[torch.Tensor]]:
    """PARAM_COLUMNS[1:] of tensors not stacked whole (large, non-contiguous or subclassed ones): extremes and
    sums one tensor at a time; on the CPU the counts from each tensor's block sample, the samples stacked by size
    (`_sampled_counts`)."""
    sums = [t.sum(dtype=accumulate) for t in present]
    if device.type != "cpu":
        extremes = [torch.aminmax(t) for t in present]  # one pass per tensor for min and max
        lows, highs = [e.min for e in extremes], [e.max for e in extremes]
        peaks = list(torch._foreach_norm(present, math.inf, dtype=accumulate))
        # One bool mask at a time: the peak extra memory is 1 byte per element of the largest tensor.
        non_finite = [torch.isfinite(t).logical_not_().sum(dtype=_F32) for t in present]
        nonzero = list(torch._foreach_norm(present, 0.0, dtype=accumulate))
        return [peaks, sums, non_finite, nonzero, lows, highs]
    # On CPU, vector_norm(inf) and isfinite() are slow scalar loops: 18x and 5x slower than amax/amin and a
    # subtraction (measured on 1M floats, torch 2.13, one thread); amax and amin are also cheaper than one aminmax.
    # max |x| comes from the extremes (NaN propagates).
    lows, highs = [t.amin() for t in present], [t.amax() for t in present]
    return _sampled_counts(present, lows, highs, sums)


def _sampled_counts(
    present: list[torch.Tensor], lows: list[torch.Tensor], highs: list[torch.Tensor], sums: list[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The CPU columns of `_single_columns`: non-finite and non-zero counts from one block sample per tensor
    (sampling.py; max |x| is exact and floors the non-finite count at 1), the samples of one size and scale
    reduced as one stack (stacks.py: counts are exact in any order)."""
    columns: list[list[torch.Tensor | None]] = [[None] * len(present) for _ in range(_NUM_FULL - 1)]
    samples: list[torch.Tensor] = []
    by_scale: dict[float, list[int]] = {}
    for i, t in enumerate(present):
        sample, scale = block_sample(t, ZERO_SAMPLE_ELEMENTS)
        samples.append(sample)
        by_scale.setdefault(scale, []).append(i)
    for scale, members in by_scale.items():
        chunks, _ = stacks([samples[i] for i in members], _any)
        for positions, x in chunks:
            chosen = [members[p] for p in positions]
            lo, hi = torch.stack([lows[i] for i in chosen]), torch.stack([highs[i] for i in chosen])
            peak = torch.maximum(lo.neg(), hi)
            non_finite = sampled_non_finite(x, scale, peak.isfinite(), dim=1)
            nonzero = torch.count_nonzero(x, dim=1) * scale
            rows = torch.stack([peak, torch.stack([sums[i] for i in chosen]), non_finite, nonzero, lo, hi])
            _place_rows(columns, chosen, rows)
    return columns  # type: ignore[return-value]  # every position filled above


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


def _clipped_norms(grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The norms of these gradients after `gradwatch.clip_grad_norm_` (or `clip_one_mesh_`) scaled them: its own
    per-gradient norms times its coefficient (one multi-tensor multiply; none when it did not scale them; clip.py),
    when every one of them is a gradient it measured, unwritten since; else None: then the group is measured
    here."""
    offer = clip.offered()
    if not offer:
        return None
    first = offer.get(id(grads[0])) if grads else None
    if first is None:
        return None
    coefficient = first[1]  # one clip call's: the same tensor (or None) for every gradient it measured
    norms = []
    for g in grads:
        entry = offer.get(id(g))
        if entry is None or entry[2]() is not g or g._version != entry[3] or entry[1] is not coefficient:
            return None
        if entry[0].device != g.device or (coefficient is not None and coefficient.device != g.device):
            return None
        norms.append(entry[0])
    return norms if coefficient is None else list(torch._foreach_mul(norms, coefficient))


def _bit_sum(t: torch.Tensor, numel: int | None = None) -> torch.Tensor:
    """The wrapping int64 sum of `t`'s bit patterns: as 64-bit words when the bytes of each tensor summed form
    whole words (a view, no copy), else each element's bits widened to int64. `numel`: the elements of each
    tensor when `t` is a stack of several (stacks.py), whose rows then start on word boundaries alike."""
    flat = t.reshape(-1)
    if flat.is_floating_point():
        flat = flat.view(_BITS[flat.element_size()])
    size = flat.element_size()
    numel = flat.numel() if numel is None else numel
    if size == 8 or numel * size % 8:  # the choice depends on shape and dtype only: replicas agree
        return flat.sum(dtype=torch.int64)
    if flat.stride(0) != 1 or flat.storage_offset() * size % 8:  # an int64 view needs dense, 8-byte-aligned bytes
        flat = flat.contiguous() if flat.stride(0) != 1 else flat.clone()
    return flat.view(torch.int64).sum()


def _any(t: torch.Tensor) -> bool:
    return True


def _small(t: torch.Tensor) -> bool:
    """Whether the checksum sums `t` in a stack: a plain tensor of at most STACK_ELEMENTS elements."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.numel() <= STACK_ELEMENTS


def _fill(values: list[torch.Tensor], tensors: list[torch.Tensor | None], zero: torch.Tensor) -> list[torch.Tensor]:
    found = iter(values)
    return [zero if t is None else next(found) for t in tensors]
