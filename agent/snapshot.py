"""The only place the agent moves data from the device to the host.

Contract: `start_copy(segments)` is called on the training thread with a report's values as segments (a 1-D
tensor, or a list of 0-d tensors), all on one device, and never waits for the device: on CUDA it joins them
into one vector (a stack per list, one cat), queues a `non_blocking` copy into pinned host memory and records
an event behind it; on other accelerators it does the same with the generic `torch.Event` when available; on
CPU the values are already in host memory, so the join itself is left to the sender thread (it is Python and
a few small kernels the training thread need not wait for). Every tensor handed over must be a fresh result
nobody changes later: values that alias the caller's tensors (the loss, tensor learning rates, the GradScaler's
scale) are copied when they are taken (loss.py and hooks.py on the CPU, amp.py always).
`HostCopy.to_numpy()` is called on the sender thread: it waits for the event (if any), joins deferred
segments, and returns the values as a float32 numpy array. Nothing else in the agent may call `.item()`,
`.cpu()`, `.tolist()`, `.numpy()` or `bool()` on a tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["HostCopy", "Segment", "host_clone", "join", "read_all", "read_now", "start_copy"]


Segment = torch.Tensor | list[torch.Tensor]  # a 1-D tensor, or 0-d tensors to stack


def join(segments: list[Segment]) -> torch.Tensor:
    """The segments as one 1-D tensor, in order (adjacent lists of 0-d tensors share one stack)."""
    tensors: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    for segment in segments:
        if isinstance(segment, list):
            pending += segment
            continue
        if pending:
            tensors.append(torch.stack(pending))
            pending = []
        tensors.append(segment)
    if pending:
        tensors.append(torch.stack(pending))
    return (tensors[0] if len(tensors) == 1 else torch.cat(tensors)).detach()


class HostCopy:
    """A report vector on its way to host memory. Create with `start_copy`; read once on another thread."""

    __slots__ = ("_event", "_host", "_segments")

    def __init__(self, host: torch.Tensor | None, event: Any | None, segments: list[Segment] | None = None) -> None:
        self._host = host
        self._event = event
        self._segments = segments

    def to_numpy(self) -> np.ndarray:
        """Wait until the copy has landed (sender thread only), then return the float32 values."""
        if self._segments is not None:  # CPU: joined here, off the training thread
            self._host, self._segments = join(self._segments), None
        # By the time the sender gets here the copy has usually landed: query() answers without blocking,
        # and synchronize() (which blocks this thread only) is the fallback.
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        assert self._host is not None
        return self._host.numpy()


def read_now(value: torch.Tensor) -> float:
    """Read a 0-d tensor on the training thread. Free on the CPU (the value is in host memory); on an
    accelerator it waits for the device, so the guard calls it only where its docs say it syncs."""
    return float(value.item())


def read_all(values: torch.Tensor) -> list[float]:
    """`read_now` for every element of a 1-D tensor."""
    return [float(v) for v in values.tolist()]


def host_clone(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor` (the guard's rollback snapshot): pinned and non-blocking from CUDA, so the copy
    overlaps the step; the next read of the copy orders after it (the caller synchronises before use)."""
    if tensor.device.type == "cpu":
        return tensor.detach().clone()
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return host.copy_(tensor.detach(), non_blocking=True)
    return tensor.detach().to("cpu")


def start_copy(segments: list[Segment]) -> HostCopy:
    """Queue the device→host copy of a report's freshly computed values (training thread; no sync)."""
    first = segments[0]
    device = (first[0] if isinstance(first, list) else first).device
    if device.type == "cpu":
        # CPU kernels have already run and the tensors are fresh results (see the module docstring): no copy.
        return HostCopy(None, None, segments)
    vector = join(segments)
    if device.type == "cuda":
        # Pinned memory makes the copy truly asynchronous; the caching host allocator recycles the buffer
        # once the event behind its last use has completed, so per-report allocation is cheap.
        host = torch.empty(vector.shape, dtype=vector.dtype, pin_memory=True)
        host.copy_(vector, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        return HostCopy(host, event)
    return _generic_accelerator_copy(vector)


def _generic_accelerator_copy(vector: torch.Tensor) -> HostCopy:
    """MPS, XPU, …: non-blocking copy plus a generic event where this torch has one."""
    event_type = getattr(torch, "Event", None)
    if event_type is None:  # old torch: no generic event, so this copy waits on the training thread
        return HostCopy(vector.to("cpu"), None)
    host = vector.to("cpu", non_blocking=True)
    event = event_type(device=vector.device)
    event.record()
    return HostCopy(host, event)
