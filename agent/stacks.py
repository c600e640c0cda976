"""Same-shape stacks: many small tensors reduced by one launch per shape instead of one per tensor.

A full-statistics step reads every parameter and gradient several times (extremes, sum, counts, histogram,
checksum). For a model of many small tensors the cost is the number of launches, not the bytes: one
`torch.stack` of the tensors of one (shape, dtype, device) and row-wise reductions over it (`amin(1)`,
`sum(1)`, ...) replace a kernel per tensor by a kernel per shape. `stacks()` groups and chunks, the callers
(stats.py, histogram.py) reduce.

Exactness: a row of the stack holds the tensor's elements in its logical order. Extremes, counts, histograms and
integer sums are exact in any order, so they are stacked on every device. Float sums are not: on the CPU the
row-wise reduction of a contiguous tensor of at most STACK_ELEMENTS elements is bit for bit the whole-tensor
reduction of it (the kernels reduce the same contiguous run in the same order; above torch's parallel grain of
32768 elements a whole-tensor sum is split between threads and would not be), so only contiguous tensors up to that
size are stacked (`stackable`). On CUDA the reduction's thread layout depends on the number of rows (a single row
spreads more threads along it), so a row is not summed in the tensor's own order: the callers take float sums of
each tensor alone there (`rows_sum_alike`) and stack the rest. Larger tensors cost a kernel each as before, which
their own work outweighs.

Memory: a stack copies its tensors, at most STACK_BYTES of them (a larger group of one shape is stacked in
chunks), made only when the caller's loop reaches it: at most two stacks are alive at a time, with the
temporaries of their reductions (a float32 copy of a bfloat16 stack, differences, masks, exponent fields: up to
about five times a stack's bytes for a bfloat16 activation stack, counted from the operations, not measured).
So a full step's stacked reductions add at most about 8 × STACK_BYTES = 32 MiB on the device, whatever the
model's size, beyond what they read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

__all__ = ["STACK_BYTES", "STACK_ELEMENTS", "rows_sum_alike", "stackable", "stacks"]

#: Largest tensor stacked, in elements: torch's intra-op parallel grain (at::internal::GRAIN_SIZE), below which
#: a CPU reduction runs as one sequential pass whatever the number of threads (see the module docstring).
STACK_ELEMENTS = 32768
#: Bytes per stack at most: a group of one shape larger than this is stacked in several chunks.
STACK_BYTES = 4 * 1024 * 1024
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def rows_sum_alike(device: torch.device) -> bool:
    """Whether a stack row's float sums on `device` are bit for bit those of its tensor alone (the CPU only, see
    the module docstring); elsewhere the callers take float sums of each tensor alone and stack the rest."""
    return device.type == "cpu"


def stackable(t: torch.Tensor) -> bool:
    """Whether `t` joins a stack: a plain dense contiguous tensor (or parameter) of at most STACK_ELEMENTS
    elements; a subclass (DTensor, ...) is reduced on its own."""
    return type(t) in _PLAIN and t.layout is torch.strided and t.numel() <= STACK_ELEMENTS and t.is_contiguous()


def stacks(
    tensors: Sequence[torch.Tensor], fits: Callable[[torch.Tensor], bool] = stackable
) -> tuple[Iterator[tuple[list[int], torch.Tensor]], list[int]]:
    """The positions of `tensors` that do not fit, and an iterator of (positions, stack): each stack the
    (k, numel) 2-D stack of k same-shape, same-dtype, same-device tensors that fit, at most STACK_BYTES (at
    least one tensor), made when the iterator reaches it (one stack alive at a time)."""
    groups: dict[tuple[torch.Size, torch.dtype, torch.device], list[int]] = {}
    rest: list[int] = []
    for i, t in enumerate(tensors):
        if fits(t):
            groups.setdefault((t.shape, t.dtype, t.device), []).append(i)
        else:
            rest.append(i)

    def chunks() -> Iterator[tuple[list[int], torch.Tensor]]:
        for positions in groups.values():
            first = tensors[positions[0]]
            per = max(1, STACK_BYTES // max(1, first.numel() * first.element_size()))
            for start in range(0, len(positions), per):
                chunk = positions[start : start + per]
                yield chunk, torch.stack([tensors[i] for i in chunk]).view(len(chunk), -1)

    return chunks(), rest
