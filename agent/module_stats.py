"""Per-module activation statistics of full-statistics steps (activations.py says what each value means).

`module_stats(a, ...)` computes one module output's STATS_PER_MODULE values and its log2 histogram;
`stacked_module_stats(x, ...)` the same for k outputs of one shape stacked as x (k, *shape): the same values,
bit for bit, in a constant number of launches whatever k (row-wise reductions, stacks.py). Only outputs that
stacks.stackable() accepts are stacked (contiguous, at most STACK_ELEMENTS elements: read whole, no sample),
so every reduction runs over the same contiguous run in the same order as one output at a time. Nothing here
reads a tensor value on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gradwatch.agent.histogram import SAMPLE_ELEMENTS, log2_histogram, log2_histograms
from gradwatch.agent.sampling import sampled_non_finite

__all__ = ["SPREAD_ELEMENTS", "module_stats", "reduce_dims", "sample_positions", "stacked_module_stats", "unit_dim_of"]

#: Values the spread across units is measured on (positions × units), per module and full-statistics step.
SPREAD_ELEMENTS = 8192
_SATURATION_MARGIN = 0.01
_GOLDEN = (5**0.5 - 1) / 2
_F32 = torch.float32


def unit_dim_of(shape: Sequence[int]) -> int | None:
    """The units' dimension of an output of this shape: 1 (channels) for 4+-D, else the last; None for 0-D and
    1-D."""
    if len(shape) <= 1:
        return None
    return 1 if len(shape) >= 4 else len(shape) - 1


def reduce_dims(shape: Sequence[int]) -> tuple[int, ...]:
    """Every dimension but the units' (dim 1 for 4+-D, else the last): reduced in place, no copy."""
    unit_dim = unit_dim_of(shape)
    return () if unit_dim is None else tuple(d for d in range(len(shape)) if d != unit_dim)


def sample_positions(numel: int, device: torch.device) -> torch.Tensor | None:
    """The fixed sample of a `numel`-element output: SAMPLE_ELEMENTS sorted flat positions spread by a Weyl
    sequence (frac(i·φ)·numel, the same for every output of that size), computed on `device` (no transfer),
    or None when the output is small enough to read whole. Not a plain stride, which would alias with a
    channel or spatial period."""
    if numel <= SAMPLE_ELEMENTS:
        return None
    wide = torch.float64 if device.type in ("cpu", "cuda") else _F32
    steps = torch.arange(SAMPLE_ELEMENTS, dtype=wide, device=device)
    positions = (steps * _GOLDEN).frac_().mul_(numel).floor_().to(torch.long).clamp_(max=numel - 1)
    return positions.sort().values


def module_stats(
    a: torch.Tensor, bounds: tuple[float, float] | None, total: torch.Tensor, positions: torch.Tensor | None
) -> torch.Tensor:
    """STATS_PER_MODULE values for one float32 output, then its log2 histogram (see the module docstring).

    `total` is the output's exact float32 sum (the provenance sum), `positions` its fixed sample (or None:
    read it whole). Exact, one pass each: max |a| (aminmax; NaN propagates), the units' maxima along the
    reduced dimensions (dead units, no transposed copy) and, for bounded activations, the units' smallest
    distance from the range's middle (saturation). From the sample: the mean, the std (from the float32 L2
    norm, sqrt(E[a²] − mean²)), the zero fraction, the non-finite count (scaled by numel / sample, and at
    least 1 when `total` is not finite, so a single NaN is never reported as none), the log2 histogram, and
    the spread across units, from the first samples of the batch. Why: these passes over every element cost
    more than the training step itself for a convolutional net on a CPU (10+ passes over millions of
    values), while 65536 samples estimate a proportion to within about ±0.4 %."""
    return _stats(a, bounds, total, positions, 0)


def stacked_module_stats(
    x: torch.Tensor,
    bounds: tuple[float, float] | None,
    totals: torch.Tensor,
    alone: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """(k, VALUES_PER_MODULE): `module_stats` of each of k same-shape float32 outputs stacked as x (k, *shape),
    each read whole, given their k float32 sums `totals`; the same values, in launches independent of k. With
    `alone` (the k float32 outputs themselves, where a stack row is not summed like its output:
    stacks.rows_sum_alike), the float sums (mean, std, spread) are taken of each output alone, a few launches
    each, and only the order-free reductions (extremes, counts, histogram) are stacked."""
    return _stats(x, bounds, totals, None, 1, alone)


def _stats(
    a: torch.Tensor,
    bounds: tuple[float, float] | None,
    total: torch.Tensor,
    positions: torch.Tensor | None,
    lead: int,
    alone: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """`module_stats` (lead 0) or `stacked_module_stats` (lead 1: dimension 0 indexes outputs, every reduction
    is row-wise: the same kernel over each output's contiguous elements as over that output alone)."""
    shape = a.shape[lead:]
    n = math.prod(shape)
    whole = -1 if lead else None  # the dimension that spans one output's flattened values
    flat = a.view(a.shape[0], -1) if lead else a.reshape(-1)
    sample = flat if positions is None else flat.index_select(0, positions)
    m = sample.shape[-1]
    scale = n / m
    wide = torch.float64 if a.device.type in ("cpu", "cuda") else _F32  # MPS has no float64
    if alone is None:
        mean = sample.sum(whole, dtype=wide) / m
        mean_square = torch.linalg.vector_norm(sample, dim=whole).to(wide).square() / m
    else:  # as module_stats does for each output (read whole): its flat view's sum and norm
        mean = torch.stack([o.reshape(-1).sum(dtype=wide) for o in alone]) / m
        mean_square = torch.stack([torch.linalg.vector_norm(o.reshape(-1)).to(wide) for o in alone]).square() / m
    std = (mean_square - mean.square()).clamp_(min=0.0).sqrt()
    reduce = tuple(d + lead for d in reduce_dims(shape))
    per_unit_max = a.amax(dim=reduce) if reduce else a
    lowest = flat.amin(1) if lead else a.amin()
    max_abs = torch.maximum(lowest.neg(), _over(per_unit_max, lead, torch.amax))  # two reductions beat aminmax
    non_finite = sampled_non_finite(sample, scale, torch.isfinite(total), whole)
    zero = (m - torch.count_nonzero(sample, dim=whole)).to(_F32) / m  # count_nonzero beats a bool sum on a CPU
    dead = _over((per_unit_max <= 0).to(_F32), lead, torch.mean)
    if bounds is None:
        saturated = torch.full(a.shape[:lead], float("nan"), device=a.device)
    else:
        lo, hi = bounds
        middle, half = (lo + hi) / 2, (hi - lo) / 2
        # A unit is saturated when most of its outputs (more than half of the batch and positions) are within the
        # margin of an end, |a − middle| ≥ half − margin: where the derivative is ~0 for most inputs. "Every
        # output" missed a large initialisation, where each unit still has a few inputs near the middle.
        flat_end = (a - middle).abs_() >= half - _SATURATION_MARGIN * (hi - lo)
        share = flat_end.to(_F32).mean(dim=reduce) if reduce else flat_end.to(_F32)
        saturated = _over((share > 0.5).to(_F32), lead, torch.mean)
    unit_spread = _unit_spread(a, lead) if alone is None else torch.stack([_unit_spread(o, 0) for o in alone])
    histogram = log2_histograms(sample, 1.0, a.device) if lead else log2_histogram(sample, a.device)
    if positions is not None:
        histogram = histogram.mul_(scale)
    values = [mean.to(_F32), std.to(_F32), max_abs, non_finite, zero, dead, saturated, unit_spread]
    return torch.cat([torch.stack(values, dim=-1), histogram], dim=-1)


def _over(t: torch.Tensor, lead: int, reduction: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`reduction` over all of `t` (lead 0), or over each row of t's leading dimension (lead 1)."""
    return reduction(t.reshape(t.shape[0], -1), 1) if lead else reduction(t)


def _unit_spread(a: torch.Tensor, lead: int) -> torch.Tensor:
    """Mean over positions of the std across units: exact up to SPREAD_ELEMENTS values, else on about that
    many: the first positions (rows of units) for outputs with units last, the first sample's evenly spaced
    positions for channels (dim 1). `lead` as in `_stats`."""
    shape = a.shape[lead:]
    unit_dim = unit_dim_of(shape)
    if unit_dim is None or shape[unit_dim] < 2:
        return torch.full(a.shape[:lead], float("nan"), device=a.device)
    units = shape[unit_dim]
    if math.prod(shape) > SPREAD_ELEMENTS:
        wanted = max(1, SPREAD_ELEMENTS // units)
        if unit_dim == 1 and len(shape) >= 3:  # channels: (1, C, positions) view of the first sample
            a = a.narrow(lead, 0, 1).flatten(lead + 2)
            a = a[..., :: max(1, a.shape[-1] // wanted)]
        else:
            a, unit_dim = a.reshape(*a.shape[:lead], -1, units)[..., :wanted, :], 1
    # Differences from the first unit make identical units exact zeros (no cancellation), and two plain means
    # avoid std's slow strided loop on a CPU.
    d = a - a.narrow(lead + unit_dim, 0, 1)
    variance = d.square().mean(dim=lead + unit_dim) - d.mean(dim=lead + unit_dim).square()
    return _over(variance.clamp_(min=0.0).sqrt(), lead, torch.mean)
