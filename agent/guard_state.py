"""Exact copies of an optimizer's parameters and state, for the guard (guard.py) to put back.

Contract
- `SavedState.take(optimizer)` copies every parameter of every param group and every entry of its optimizer
  state (tensors cloned, other values kept as they are), and remembers which parameters had no state yet.
  `restore()` puts all of it back bit for bit, in place (the tensors the optimizer holds keep their identity),
  and removes state the step created for a parameter that had none. `to_cpu=True` keeps the copy in host
  memory (the rollback snapshot); then the caller must `synchronize()` before the copy is read. A DTensor
  (FSDP2/HSDP shards, sharded optimizer state) is copied and put back as this rank's local shard only: no
  collective, each rank's memory holds its own shards, and the DTensor the optimizer holds keeps its identity.
- `WhereRestore` is the no-sync variant for accelerators: `before()` copies into buffers kept between steps;
  `after(bad)` writes `where(bad, saved, current)` into every tensor on the flag's device, so nothing waits for
  the device. Tensors elsewhere (Adam's CPU step counters next to CUDA parameters) and state the step created
  need the flag on the host: they are fixed by `settle(flag)` once the flag has been read.
Nothing here decides anything; the guard says when.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.agent.schema import local_tensor
from gradwatch.agent.snapshot import host_clone

__all__ = ["SavedState", "WhereRestore", "optimizer_params", "state_bytes"]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters and tensor state a SavedState of `optimizer` holds."""
    total = 0
    for p in optimizer_params(optimizer):
        for t in [p, *optimizer.state.get(p, {}).values()]:
            if isinstance(t, torch.Tensor):
                local = local_tensor(t)  # this rank's memory: a DTensor's local shard
                total += local.numel() * local.element_size()
    return total


class _Shard:
    """A copy of a DTensor's local shard, with what it takes to make the DTensor again (state to re-create)."""

    def __init__(self, t: torch.Tensor, local: torch.Tensor) -> None:
        self.local = local
        self.mesh, self.placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
        self.shape, self.stride = t.shape, t.stride()

    def rebuild(self, device: torch.device) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        local = self.local.to(device, copy=True)
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape,
                                  stride=self.stride)  # fmt: skip


def _clone(t: torch.Tensor, to_cpu: bool) -> torch.Tensor | _Shard:
    local = local_tensor(t)
    copy = host_clone(local) if to_cpu else local.detach().clone()
    return copy if local is t else _Shard(t, copy)


def _put(current: torch.Tensor, saved: torch.Tensor | _Shard) -> None:
    """Copy `saved` into `current` in place (a DTensor: into its local shard)."""
    local_tensor(current).copy_(saved.local if isinstance(saved, _Shard) else saved)


def _fits(current: torch.Tensor, saved: torch.Tensor | _Shard) -> bool:
    """Whether `saved` can be copied into `current` in place (both DTensors or neither, same local shape)."""
    local = local_tensor(current)
    values = saved.local if isinstance(saved, _Shard) else saved
    return isinstance(saved, _Shard) == (local is not current) and local.shape == values.shape


def _copy_state(state: dict[str, Any], to_cpu: bool) -> dict[str, Any]:
    return {k: _clone(v, to_cpu) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _put_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, saved: dict[str, Any] | None) -> None:
    if saved is None:
        optimizer.state.pop(p, None)
        return
    state = optimizer.state[p]
    for key in [k for k in state if k not in saved]:
        del state[key]
    for key, value in saved.items():
        current = state.get(key)
        if isinstance(value, _Shard | torch.Tensor) and isinstance(current, torch.Tensor) and _fits(current, value):
            _put(current, value)
        elif isinstance(value, _Shard | torch.Tensor):
            device = local_tensor(p if current is None else current).device
            state[key] = value.rebuild(device) if isinstance(value, _Shard) else value.to(device, copy=True)
        else:
            state[key] = value


class SavedState:
    """Parameters and optimizer state at one moment (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, step: int, params: list[torch.Tensor],
                 values: list[torch.Tensor | _Shard], states: list[dict[str, Any] | None]) -> None:  # fmt: skip
        self.optimizer = optimizer
        self.step = step
        self._params = params
        self._values = values
        self._states = states

    @classmethod
    @torch.no_grad()
    def take(cls, optimizer: torch.optim.Optimizer, step: int = 0, *, to_cpu: bool = False) -> SavedState:
        params = optimizer_params(optimizer)
        values = [_clone(p, to_cpu) for p in params]
        states = [_copy_state(optimizer.state[p], to_cpu) if p in optimizer.state else None for p in params]
        return cls(optimizer, step, params, values, states)

    def synchronize(self) -> None:
        """Wait for the copies (needed before reading a to_cpu copy taken from an accelerator)."""
        devices = {p.device for p in self._params if p.device.type == "cuda"}
        for device in devices:
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def restore(self) -> None:
        for p, value, saved in zip(self._params, self._values, self._states, strict=True):
            _put(p, value)
            _put_state(self.optimizer, p, saved)


class WhereRestore:
    """Snapshot every step into kept buffers; undo a bad step with device-side `where` (no host sync)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self._optimizer = optimizer
        self._device = device
        self._key: tuple[Any, ...] = ()
        self._targets: list[torch.Tensor] = []
        self._buffers: list[torch.Tensor] = []
        self._host_fix: list[tuple[torch.Tensor, dict[str, Any] | None]] = []  # (param, its state before)
        self._pending: list[tuple[torch.Tensor, dict[str, Any] | None]] = []

    @torch.no_grad()
    def before(self) -> None:
        """Copy what the coming step may change (one foreach copy into buffers reused while shapes hold)."""
        params = optimizer_params(self._optimizer)
        targets: list[torch.Tensor] = []
        self._host_fix = []
        for p in params:
            state = self._optimizer.state.get(p)
            on_device = [v for v in (state or {}).values() if isinstance(v, torch.Tensor) and v.device == self._device]
            # A DTensor's local shard (FSDP2): the foreach copy and `where` run on plain tensors, no collective.
            targets.append(local_tensor(p))
            targets += [local_tensor(v) for v in on_device]
            elsewhere = state is None or len(on_device) != len(state)
            if elsewhere:  # state to create, or counters off the device: fixed once the flag is on the host
                off = None if state is None else {k: v for k, v in state.items() if not any(v is t for t in on_device)}
                self._host_fix.append((p, None if off is None else _copy_state(off, to_cpu=False)))
        key = tuple((t.data_ptr(), t.shape, t.dtype) for t in targets)
        if key != self._key:
            self._key, self._targets = key, targets
            self._buffers = [torch.empty_like(t) for t in targets]
        torch._foreach_copy_(self._buffers, self._targets)

    @torch.no_grad()
    def after(self, bad: torch.Tensor) -> bool:
        """Undo the step on the device where `bad`; True when some state needs `settle(flag)` afterwards."""
        for target, saved in zip(self._targets, self._buffers, strict=True):
            target.copy_(torch.where(bad, saved, target))
        self._pending, self._host_fix = self._host_fix, []
        return bool(self._pending)

    @torch.no_grad()
    def settle(self, skipped: bool) -> None:
        """Apply the host part of the last `after()` once its flag is known on the host."""
        pending, self._pending = self._pending, []
        if skipped:
            for p, saved in pending:
                if saved is None:
                    self._optimizer.state.pop(p, None)
                else:
                    state = self._optimizer.state[p]
                    for key, value in saved.items():  # the off-device entries; `after` restored the rest
                        current = state.get(key)
                        if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor | _Shard):
                            _put(current, value)
                        elif isinstance(value, _Shard):
                            state[key] = value.rebuild(local_tensor(p).device)
                        else:
                            state[key] = value
