"""The only place the agent moves data from the device to the host.

Contract: `start_copy(vector)` is called on the training thread and never waits for the device: on CUDA it
queues a `non_blocking` copy into pinned host memory and records an event behind it; on other accelerators
it does the same with the generic `torch.Event` when available; on CPU the values are already in host
memory, so it only detaches. `HostCopy.to_numpy()` is called on the sender thread: it waits for the event
(if any) and returns the values as a float32 numpy array. Nothing else in the agent may call `.item()`,
`.cpu()`, `.tolist()`, `.numpy()` or `bool()` on a tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["HostCopy", "start_copy"]


class HostCopy:
    """A report vector on its way to host memory. Create with `start_copy`; read once on another thread."""

    __slots__ = ("_event", "_host")

    def __init__(self, host: torch.Tensor, event: Any | None) -> None:
        self._host = host
        self._event = event

    def to_numpy(self) -> np.ndarray:
        """Wait until the copy has landed (sender thread only), then return the float32 values."""
        # By the time the sender gets here the copy has usually landed: query() answers without blocking,
        # and synchronize() (which blocks this thread only) is the fallback.
        if self._event is not None and not self._event.query():
            self._event.synchronize()
        return self._host.numpy()


def start_copy(vector: torch.Tensor) -> HostCopy:
    """Queue the device→host copy of a freshly computed 1-D float32 `vector` (training thread; no sync)."""
    vector = vector.detach()
    device = vector.device
    if device.type == "cpu":
        # CPU kernels have already run and `vector` is a fresh result nobody else holds: no copy needed.
        return HostCopy(vector, None)
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
