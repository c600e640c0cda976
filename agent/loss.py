"""The loss of one report, folded over the `monitor.step()` calls it covers (gradient accumulation).

Contract: `add(loss)` is called once per `monitor.step()` on the training thread; `take()` returns what one
report carries and starts over. A tensor loss is detached, reduced to a 0-d float32 on the report's device
(a per-sample loss by its mean) and summed there: never read on the host. Plain numbers are summed on the
host. The report's loss is the mean over the calls that passed a loss; calls with `None` count as micro
steps but not in that mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossAccumulator", "LossTake"]


@dataclass(slots=True)  # not frozen: built on every step, and a frozen __init__ costs 5x
class LossTake:
    """One report's loss: a 0-d device tensor (`tensor`), else a host number (`value`), else none."""

    tensor: torch.Tensor | None
    value: float
    has_loss: bool
    micro_steps: int


class LossAccumulator:
    """Sums the losses of the micro steps of one report (see the module docstring)."""

    def __init__(self) -> None:
        self._tensor: torch.Tensor | None = None
        self._host = 0.0
        self._count = 0
        self._calls = 0

    @property
    def calls(self) -> int:
        """monitor.step() calls since the last `take()`."""
        return self._calls

    def add(self, loss: torch.Tensor | float | None, device: torch.device) -> None:
        self._calls += 1
        if loss is None:
            return
        self._count += 1
        if isinstance(loss, torch.Tensor):
            t = loss.detach()
            # On the CPU the report vector is joined later, on the sender thread (snapshot.py): a copy keeps the
            # value of this step if the caller later changes its loss tensor in place (`total = loss; total += x`).
            if t.numel() != 1:  # per-sample losses: their mean
                t = t.float().mean()
            elif t.dim():
                t = t.reshape(())
            t = t.to(device=device, dtype=torch.float32, non_blocking=True, copy=device.type == "cpu")
            self._tensor = t if self._tensor is None else self._tensor + t
        else:
            self._host += float(loss)

    def take(self) -> LossTake:
        tensor, host, count, calls = self._tensor, self._host, self._count, self._calls
        self._tensor, self._host, self._count, self._calls = None, 0.0, 0, 0
        if tensor is not None and count > 1:  # only accumulation pays for these two kernels
            tensor = (tensor + host) / count
        return LossTake(tensor, host / count if count else 0.0, count > 0, max(calls, 1))
