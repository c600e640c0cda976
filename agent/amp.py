"""The loss-scaler tap: tells a step that torch.amp.GradScaler skipped from one it performed, without a sync.

A GradScaler skips `optimizer.step()` when the scaled gradients hold Inf/NaN (and halves its scale), so the
optimizer hooks never run for that step. To see it, `ScalerTap` wraps `scaler.step` on the instance (the
class is untouched; `remove()` restores the instance). After the original `step(optimizer)` returns for the
monitored optimizer it keeps two 0-d device tensors: the sum of the scaler's per-device found-inf flags
(> 0: the step was skipped) and a copy of the scale used for the step. Both travel in the report vector and
are read on the sender thread, like every other statistic: nothing here reads a tensor value.

Contract: `take()` returns the capture since the last call (None when `scaler.step` did not run for this
optimizer), then forgets it. A disabled scaler (`enabled=False`) reports "performed" with scale 1.
Failures inside the wrapper go to errors.report; the user's `scaler.step` result and exceptions pass through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradwatch.agent import errors

__all__ = ["ScalerCapture", "ScalerTap", "check_grad_scaler"]

# (found-inf sum, scale): 0-d float32 tensors on the layout's device
ScalerCapture = tuple[torch.Tensor, torch.Tensor]


def check_grad_scaler(scaler: object, optimizer: object) -> None:
    """Raise ValueError unless `scaler` is a torch.amp.GradScaler usable with `optimizer` (attach time)."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ValueError(f"gradwatch: grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if optimizer is None:
        raise ValueError("gradwatch: grad_scaler needs the optimizer it steps: attach(model, optimizer, ...)")


class _Step:
    """The wrapper on `scaler.step`. Pickled or deep-copied with the scaler, it becomes the copy's own plain
    `step` method (read from the copy before its state is restored): copies carry no agent."""

    def __init__(self, original: Callable[..., Any], tap: ScalerTap) -> None:
        self._original = original
        self._tap = tap

    def __call__(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        result = self._original(optimizer, *args, **kwargs)
        tap = self._tap
        if optimizer is tap._optimizer and tap._wrapper is self:
            tap._after_step()
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        return getattr, (self._original.__self__, "step")  # type: ignore[attr-defined]  # a bound method


class ScalerTap:
    """Wraps one GradScaler's `step` to capture skip flags and scales for one optimizer."""

    def __init__(
        self,
        scaler: torch.amp.GradScaler,
        optimizer: torch.optim.Optimizer,
        device: Callable[[], torch.device],
        add_agent_time: Callable[[float], None],
    ) -> None:
        """`device()` gives where the report vector is assembled; hook time goes to `add_agent_time`."""
        self._scaler = scaler
        self._optimizer = optimizer
        self._device = device
        self._add_agent_time = add_agent_time
        self._capture: ScalerCapture | None = None
        self.steps = 0  # scaler.step(optimizer) calls seen, performed or skipped
        self._wrapper: _Step | None = _Step(scaler.step, self)
        scaler.step = self._wrapper  # type: ignore[method-assign]

    @property
    def pending(self) -> bool:
        """Whether scaler.step ran for the optimizer since the last `take()`."""
        return self._capture is not None

    def take(self) -> ScalerCapture | None:
        capture, self._capture = self._capture, None
        return capture

    def remove(self) -> None:
        """Restore the scaler instance (idempotent). A wrapper someone else stacked on top is left alone."""
        wrapper, self._wrapper = self._wrapper, None
        if wrapper is not None and self._scaler.__dict__.get("step") is wrapper:
            del self._scaler.__dict__["step"]

    def _after_step(self) -> None:
        with errors.guarded("grad_scaler_hook", self._add_agent_time):
            self.steps += 1
            device = self._device()
            scaler = self._scaler
            # A disabled scaler never creates its per-optimizer state: nothing was skipped.
            state = getattr(scaler, "_per_optimizer_states", {}).get(id(self._optimizer), {})
            found = [t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())
                     for t in state.get("found_inf_per_device", {}).values()]  # fmt: skip
            skipped = torch.stack(found).sum() if found else torch.zeros((), device=device)
            scale = scaler._scale if scaler.is_enabled() else None
            if isinstance(scale, torch.Tensor):
                # update() changes the scale in place after this: keep the value this step used.
                scale_0d = scale.detach().reshape(()).to(device, torch.float32, non_blocking=True, copy=True)
            else:
                scale_0d = torch.ones((), device=device)
            self._capture = (skipped, scale_0d)
