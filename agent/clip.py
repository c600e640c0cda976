"""`gradwatch.clip_grad_norm_`: torch's gradient clipping, handing the agent the per-parameter norms it computed.

Most large-model loops clip every step, and clipping already reads every gradient once for its per-parameter
norms. This drop-in takes the same arguments and returns exactly what `torch.nn.utils.clip_grad_norm_` returns
(the same grouping by device and dtype, the same `torch._foreach_norm` per group, the same stack and total norm,
the same clip coefficient min(1, max_norm / (total + 1e-6)) and in-place scaling), and keeps the per-parameter
2-norms of that pass with that coefficient for the agent: on the next optimizer step the agent's gradient norm
column is norm × coefficient (one multi-tensor multiply) instead of a second pass over the gradients
(agent/stats.py): the norms of the gradients the optimizer applies, as without the drop-in, up to the rounding
of that one multiplication.

An offer is used only for gradients that are still the very tensors the clip measured (weak references: nothing
here keeps a gradient alive) and have not been written since (their version counters, read after the clip's own
scaling), and only for norm_type 2 and gradients in float32, float64 or bfloat16 (a float16 norm overflows at
65504, which the agent's float32 accumulation avoids). Anything else falls back to the agent's own pass.

`clip_one_mesh_` is the same for trainers that clip through Hugging Face `accelerate` (its default path: torch's
`get_total_norm`, the norm of that one norm as the total over device meshes, `clip_grads_with_norm_` unless
max_norm is inf): the Trainer measures its gradients every step that way, clipping or not, so the agent need
not measure them again.

Contract: training thread; `offered()` is read by the stats engine. The function never syncs with the device
(no more than torch's does: with `error_if_nonfinite=True` torch reads the norm on the host).
"""

from __future__ import annotations

import types
import warnings
import weakref
from collections.abc import Iterable
from typing import cast

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = ["Offer", "clip_grad_norm_", "clip_one_mesh_", "offered"]

#: id(gradient) -> (its norm before clipping, the clip coefficient (None: not scaled), a weak reference to it, its
#: version after clipping).
Offer = dict[int, tuple[torch.Tensor, torch.Tensor | None, "weakref.ref[torch.Tensor]", int]]
_SHARED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_latest: list[Offer] = [{}]


def offered() -> Offer:
    """The per-gradient norms of the latest `clip_grad_norm_` call (validate each before use)."""
    return _latest[0]


def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (same arguments, same result), keeping its per-parameter norms for the
    agent (see the module docstring)."""
    with torch.no_grad():
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        else:
            is_generator = isinstance(parameters, types.GeneratorType)
            parameters = list(parameters)
            if is_generator and len(parameters) == 0:
                warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
        grads = [p.grad for p in parameters if p.grad is not None]
        norm_type = float(norm_type)
        if not grads:
            total = torch.tensor(0.0)
            _latest[0] = {}
        else:
            norms, total = _total_norm(grads, norm_type, error_if_nonfinite, foreach)
        coefficient = _clip(parameters, max_norm, total, foreach)
        if grads and coefficient is not None:
            _latest[0] = _offer(grads, norms, coefficient) if norm_type == 2.0 else {}
        return total


def clip_one_mesh_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """accelerate's clip of gradients that share one device mesh (none is a DTensor), step for step: torch's
    `get_total_norm` (2-norm, foreach chosen by torch), the 2-norm of the stack of that one norm (accelerate's total
    over meshes), then torch's `clip_grads_with_norm_` with it unless `max_norm` is inf. Returns that total and
    keeps the per-gradient norms for the agent. `parameters` must hold at least one gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    with torch.no_grad():
        norms, mesh_total = _total_norm(grads, 2.0, False, None)
    total = torch.linalg.vector_norm(torch.stack([mesh_total]), 2.0)
    coefficient = None
    if max_norm != float("inf"):
        with torch.no_grad():
            coefficient = _clip(parameters, max_norm, total, None)
    _latest[0] = _offer(grads, norms, coefficient)
    return total


def _total_norm(
    grads: list[torch.Tensor], norm_type: float, error_if_nonfinite: bool, foreach: bool | None
) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """torch's `get_total_norm`, step for step, also returning each gradient's norm (in `grads` order)."""
    first_device = grads[0].device
    grouped = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
    norms: list[torch.Tensor] = []
    by_id: dict[int, torch.Tensor] = {}
    for (device, _), ([grouped_grads], _) in grouped.items():
        device_grads = cast(list[torch.Tensor], grouped_grads)  # every entry is a gradient (none were None)
        if (foreach is None and _has_foreach_support(device_grads, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            group_norms = list(torch._foreach_norm(device_grads, norm_type))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            group_norms = [torch.linalg.vector_norm(g, norm_type) for g in device_grads]
        norms.extend(group_norms)
        by_id.update(zip(map(id, device_grads), group_norms, strict=True))
    total = torch.linalg.vector_norm(torch.stack([norm.to(first_device) for norm in norms]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return [by_id.get(id(g)) for g in grads], total


def _clip(
    parameters: list[torch.Tensor], max_norm: float, total: torch.Tensor, foreach: bool | None
) -> torch.Tensor | None:
    """torch's `clip_grads_with_norm_`, step for step; returns the clamped coefficient it applied (None: no
    gradients)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    if not grads:
        return None
    grouped = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _), ([grouped_grads], _) in grouped.items():
        device_grads = cast(list[torch.Tensor], grouped_grads)  # every entry is a gradient (none were None)
        if (foreach is None and _has_foreach_support(device_grads, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            torch._foreach_mul_(device_grads, coefficient.to(device))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            on_device = coefficient.to(device)
            for g in device_grads:
                g.mul_(on_device)
    return coefficient


def _offer(grads: list[torch.Tensor], norms: list[torch.Tensor | None], coefficient: torch.Tensor | None) -> Offer:
    offer: Offer = {}
    for g, norm in zip(grads, norms, strict=True):
        if norm is not None and g.dtype in _SHARED_DTYPES and type(g) is torch.Tensor and g.layout is torch.strided:
            offer[id(g)] = (norm, coefficient, weakref.ref(g), g._version)
    return offer
