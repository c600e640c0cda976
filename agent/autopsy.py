"""The report's guard and autopsy tail: skip reasons, rollback, batch ids and the top-k samples by loss.

Contract
- `build_tail(...)` runs on the training thread in `monitor.step()`. It reads no tensor value: the top-k of
  `sample_losses` is taken on the device (`torch.topk`, NaN ranks highest), and tensor batch ids travel as their
  int64 bit patterns inside the float32 report vector (two slots per id; a copy keeps the bits), so the host
  copy of snapshot.py carries everything. Host batch ids (a list of ints or strings) ride in the item as text.
- Layout at `offset` in the report vector: [guard reasons] (when guarded), then k loss values, k indices
  (exact in float32 below 2**24), then 2 × n id slots (tensor ids).
- `read_tail(item, values)` runs on the sender thread and returns what the StepReport carries.
At most MAX_BATCH_IDS ids (the first ones) and MAX_ID_CHARS characters per id go on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["MAX_BATCH_IDS", "MAX_ID_CHARS", "TailItem", "build_tail", "check_batch_ids", "read_tail"]

MAX_BATCH_IDS = 4096
MAX_ID_CHARS = 128
_INDEX_EXACT = 1 << 24


@dataclass(slots=True)
class TailItem:
    """Host description of the tail (see the module docstring)."""

    offset: int
    guarded: bool
    k: int
    tensor_ids: int  # ids in the vector (0: host ids, or none)
    host_ids: tuple[str, ...]
    batch_size: int
    rolled_back_to: int | None


def check_batch_ids(batch_ids: object) -> tuple[str, ...] | torch.Tensor | None:
    """Host ids as bounded text, an integer tensor as a flat int64 tensor, or None; anything else: TypeError."""
    if batch_ids is None:
        return None
    if isinstance(batch_ids, torch.Tensor):
        if batch_ids.is_floating_point() or batch_ids.is_complex():
            raise TypeError("batch_ids must be an integer tensor or a sequence of ints/strings")
        return batch_ids.detach().reshape(-1)[:MAX_BATCH_IDS]
    if isinstance(batch_ids, str | bytes) or not isinstance(batch_ids, Sequence | np.ndarray):
        raise TypeError(f"batch_ids must be a sequence of ints or strings, got {type(batch_ids).__name__}")
    return tuple(str(i)[:MAX_ID_CHARS] for i in list(batch_ids)[:MAX_BATCH_IDS])


def build_tail(offset: int, reasons: torch.Tensor | None, guarded: bool, rolled_back_to: int | None,
               batch_ids: tuple[str, ...] | torch.Tensor | None, sample_losses: torch.Tensor | None, top_k: int,
               device: torch.device) -> tuple[list[torch.Tensor], TailItem]:  # fmt: skip
    """The tail's segments and description (see the module docstring)."""
    scalars: list[torch.Tensor] = []
    if guarded:
        scalars.append(reasons if reasons is not None else torch.zeros((), device=device))
    segments: list[torch.Tensor] = [torch.stack(scalars)] if scalars else []
    k, batch_size = 0, 0
    if sample_losses is not None and top_k > 0:
        flat = sample_losses.detach().reshape(-1)
        batch_size = flat.numel()
        k = min(top_k, batch_size, _INDEX_EXACT)
        if k:
            values, indices = torch.topk(flat.float(), k)  # NaN sorts above every number: bad samples first
            segments += [values.to(device), indices.to(device, torch.float32)]
    tensor_ids = 0
    host_ids: tuple[str, ...] = ()
    if isinstance(batch_ids, torch.Tensor):
        ids = batch_ids.to(device=device, dtype=torch.int64, copy=True).contiguous()
        tensor_ids = ids.numel()
        if tensor_ids:
            segments.append(ids.view(torch.float32))
    elif batch_ids is not None:
        host_ids = batch_ids
    item = TailItem(offset, guarded, k, tensor_ids, host_ids, batch_size, rolled_back_to)
    return segments, item


def read_tail(item: TailItem, values: np.ndarray) -> tuple[int, list[str], list[tuple[str, float, int]]]:
    """(guard reason bits, batch ids, top samples as (id, loss, index in the batch))."""
    at = item.offset
    reasons = 0
    if item.guarded:
        raw = float(values[at])
        reasons = int(raw) if np.isfinite(raw) else 0
        at += 1
    losses = values[at : at + item.k].astype(np.float64)
    indices = values[at + item.k : at + 2 * item.k].astype(np.int64)
    at += 2 * item.k
    if item.tensor_ids:
        ids = [str(i) for i in np.ascontiguousarray(values[at : at + 2 * item.tensor_ids]).view(np.int64)]
    else:
        ids = list(item.host_ids)
    named = len(ids) == item.batch_size and item.batch_size > 0
    top = [(ids[i] if named else f"#{i}", float(loss), int(i)) for loss, i in zip(losses, indices, strict=True)]
    return reasons, ids, top
