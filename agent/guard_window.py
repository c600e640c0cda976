"""The guard's robust windows: the last `size` accepted values of one signal and the spike threshold they give.

Contract: `threshold(k, min_excess, min_rise)` is the window's median plus the largest of `k` robust standard
deviations (1.4826 × the median absolute deviation), `min_excess` × |median| and `min_rise` × the median kept
by `mark_start()` (the end of the warm-up). Only accepted values are pushed, so a spike never raises the bar
for the next one. `RobustWindow` lives on the device (no host read: a bad step's push keeps the slot's old
value through `where`); `HostWindow` is its numpy twin for CPU parameters (guard.py's `host` mechanism).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["HostWindow", "RobustWindow"]

_MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation


class RobustWindow:
    """The last `size` accepted values of one signal, on the device, and the spike threshold they give."""

    def __init__(self, size: int, device: torch.device) -> None:
        self._values = torch.full((size,), math.nan, device=device)
        self._slot = 0
        self._start = torch.zeros((), device=device)

    def mark_start(self) -> None:
        """Keep the window's median now (the end of the warm-up) as the run's starting level."""
        self._start = torch.nan_to_num(torch.nanmedian(self._values).abs())

    def threshold(self, k: float, min_excess: float, min_rise: float) -> torch.Tensor:
        median = torch.nanmedian(self._values)
        mad = torch.nanmedian((self._values - median).abs())
        margin = torch.maximum(k * _MAD_TO_SIGMA * mad, min_excess * median.abs())
        return median + torch.maximum(margin, min_rise * self._start)

    def push(self, value: torch.Tensor, keep: torch.Tensor) -> None:
        """Enter `value` unless `keep` (the step was bad): then the slot keeps its old value."""
        slot = self._values[self._slot]
        slot.copy_(torch.where(keep, slot, value))
        self._slot = (self._slot + 1) % self._values.numel()

    @property
    def values(self) -> torch.Tensor:
        return self._values


class HostWindow:
    """RobustWindow's host twin (CPU parameters): the last `size` accepted values in a numpy ring."""

    def __init__(self, size: int) -> None:
        self._values = np.empty(size)
        self._count = 0
        self._start = 0.0

    def mark_start(self) -> None:
        """Keep the window's median now (the end of the warm-up) as the run's starting level."""
        if self._count:
            self._start = abs(float(np.median(self._values[: min(self._count, self._values.size)])))

    def threshold(self, k: float, min_excess: float, min_rise: float) -> float:
        if self._count == 0:
            return math.inf
        values = self._values[: min(self._count, self._values.size)]
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median)))
        return median + max(k * _MAD_TO_SIGMA * mad, min_excess * abs(median), min_rise * self._start)

    def push(self, value: float) -> None:
        self._values[self._count % self._values.size] = value
        self._count += 1
