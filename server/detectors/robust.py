"""Robust baselines shared by the detectors: median and MAD-based spread, and a per-rank loss baseline.

Median and MAD ignore a minority of outliers, so one bad report neither raises nor lowers the bar. The
loss detectors share `LossBaseline`: the run's starting loss level (median of its first reports, the
scale a "meaningful" change is measured against) and a window of recent losses that only admits
values the detector did not find abnormal, so an excursion cannot absorb itself into "normal".
"""

from __future__ import annotations

import math

import numpy as np

from gradwatch.server.ring import FloatRing

__all__ = ["MAD_TO_SIGMA", "LossBaseline", "LossStart", "median_sigma"]

#: MAD × this estimates the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


def median_sigma(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 × MAD) of a non-empty array."""
    median = float(np.median(values))
    return median, MAD_TO_SIGMA * float(np.median(np.abs(values - median)))


class LossBaseline:
    """A rank's starting loss level and its recent, admitted losses (see module docstring)."""

    __slots__ = ("_first", "initial", "window")

    def __init__(self, window: int, warmup: int) -> None:
        self.window = FloatRing(window)
        self._first = FloatRing(warmup)
        #: Median of the first `warmup` finite losses; None until they have been seen.
        self.initial: float | None = None

    @property
    def ready(self) -> bool:
        return self.initial is not None

    def warm(self, loss: float) -> bool:
        """Feed a loss during warm-up; returns True once the baseline is ready (this loss included)."""
        if self.initial is None:
            self._first.append(loss)
            self.window.append(loss)
            if self._first.full:
                self.initial = float(np.median(self._first.values()))
        return self.initial is not None

    def threshold(self, factor: float, mad_k: float, min_rise: float) -> tuple[float, float]:
        """(median of the window, the level a loss must exceed to be abnormal).

        The margin above the median is the largest of (factor − 1) × |median| (relative), mad_k × sigma
        (the run's own noise) and min_rise × |initial| (a change that matters at the run's scale).
        """
        median, sigma = median_sigma(self.window.unordered())
        scale = abs(self.initial) if self.initial is not None else 0.0
        margin = max((factor - 1.0) * abs(median), mad_k * sigma, min_rise * scale)
        return median, median + margin if math.isfinite(margin) else math.inf


class LossStart:
    """A rank's starting loss level (median of its first `count` finite losses) and whether a loss has
    "solved" the task: fallen below a fraction of it. Gradient and update detectors stand down then, since
    a classifier near zero loss has vanishing gradients and updates by success, not by fault."""

    __slots__ = ("_count", "_first", "level")

    def __init__(self, count: int) -> None:
        self._count = count
        self._first: list[float] = []
        #: None until `count` finite losses were seen.
        self.level: float | None = None

    def feed(self, loss: float | None) -> None:
        if self.level is not None or loss is None or not math.isfinite(loss):
            return
        self._first.append(loss)
        if len(self._first) >= self._count:
            self.level = float(np.median(self._first))
            self._first = []

    def solved(self, loss: float | None, fraction: float) -> bool:
        """True when `loss` is below `fraction` × a positive starting level."""
        return (
            self.level is not None
            and self.level > 0.0
            and loss is not None
            and math.isfinite(loss)
            and abs(loss) < fraction * self.level
        )
