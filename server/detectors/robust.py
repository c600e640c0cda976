"""Robust baselines shared by the detectors: median and MAD-based spread, and a per-rank loss baseline.

Median and MAD ignore a minority of outliers, so one bad report neither raises nor lowers the bar. The
loss detectors share `LossBaseline`: the run's starting loss level (median of its first reports, the
scale a "meaningful" change is measured against) and a window of recent losses that only admits
values the detector did not find abnormal, so an excursion cannot absorb itself into "normal".
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.server.ring import FloatRing

if TYPE_CHECKING:  # imported at run time where used: sorted_ring takes `median` from this module
    from gradwatch.server.detectors.sorted_ring import SortedRing

__all__ = [
    "MAD_TO_SIGMA",
    "LossBaseline",
    "LossStart",
    "median",
    "median_rows",
    "median_sigma",
    "nanmedian_columns",
    "peer_medians",
]

#: MAD × this estimates the standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826
#: numpy's nanmedian sorts windows shorter than this along the axis (a masked median); longer ones per column.
NANMEDIAN_SORT_ROWS = 600
#: peer_medians of this many values or fewer are taken in plain Python (faster than numpy's calls there).
PEER_MEDIANS_PLAIN = 8


def median(values: np.ndarray) -> float:
    """`float(np.median(values))` of a non-empty 1-D float array, bit for bit (NaN when any value is NaN).

    The same partition numpy does, without its generic-axis machinery: that overhead (~15 µs a call) was most
    of the detectors' cost per report, since every report takes several medians over windows of ~100 values."""
    n = values.size
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(values, (lo, hi, n - 1) if hi < n - 1 else (lo, hi))
    if np.isnan(part[n - 1]):  # partitioned last: NaN sorts after everything
        return math.nan
    return float(part[lo] if lo == hi else (part[lo] + part[hi]) / 2)


def median_rows(matrix: np.ndarray) -> np.ndarray:
    """`np.median(matrix, axis=1)` of a 2-D float array with at least one column, bit for bit."""
    n = matrix.shape[1]
    ordered = np.sort(matrix, axis=1)  # NaN last
    lo, hi = (n - 1) // 2, n // 2
    out = ordered[:, lo] if lo == hi else (ordered[:, lo] + ordered[:, hi]) / 2
    return np.where(np.isnan(ordered[:, n - 1]), np.nan, out)


def nanmedian_columns(matrix: np.ndarray) -> np.ndarray:
    """`np.nanmedian(matrix, axis=0)` of a 2-D float array, bit for bit, NaN (without a warning) for a column
    holding only NaN: one sort of the whole window instead of numpy's masked-array path (which numpy takes for
    windows under NANMEDIAN_SORT_ROWS rows; longer ones go to numpy itself)."""
    if matrix.shape[0] >= NANMEDIAN_SORT_ROWS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN, as below
            return np.nanmedian(matrix, axis=0)
    ordered = np.sort(matrix, axis=0)  # NaN last in every column
    rows = matrix.shape[0]
    missing = np.isnan(ordered[rows - 1])  # a column holding a NaN has one in its last sorted row
    if not missing.any():  # (most windows) every column holds `rows` values: the same two rows for all
        return _middle_mean(ordered[(rows - 1) // 2], ordered[rows // 2])
    count = rows - np.isnan(ordered).sum(axis=0)
    columns = np.arange(matrix.shape[1])
    # count − 1 is −1 for a column of NaN only: its last row, a NaN, like its row 0 (set to np.nan below).
    out = _middle_mean(ordered[(count - 1) // 2, columns], ordered[count // 2, columns])
    empty = count == 0
    if empty.any():
        out[empty] = np.nan
    return out


@np.errstate(invalid="ignore", over="ignore")
def _middle_mean(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(low + high) / 2, also for one middle value, as numpy's masked median does (x + x overflows alike)."""
    return (low + high) / 2


def peer_medians(values: np.ndarray) -> np.ndarray:
    """For each element, the median of all the *other* elements (vectorised; len(values) ≥ 2).

    With the values sorted, removing the element at sorted position p shifts every later
    element down by one, so the others' k-th smallest is sorted[k] for k < p, else sorted[k + 1].
    """
    n = values.size
    if n <= PEER_MEDIANS_PLAIN:
        plain = _peer_medians_plain(values.tolist())
        if plain is not None:
            return np.array(plain)
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    m = n - 1

    def kth(k: int) -> np.ndarray:
        return np.where(k < position, ranked[k], ranked[min(k + 1, n - 1)])

    if m % 2:
        return kth(m // 2)
    return (kth(m // 2 - 1) + kth(m // 2)) / 2.0


def _peer_medians_plain(values: list[float]) -> list[float] | None:
    """`peer_medians` of a few Python floats, the same selection in plain Python (numpy's per-call cost is most of
    it for a handful of ranks): sorted() is stable like the stable argsort, so equal values (0.0 and -0.0
    included) keep their order. None when a value is NaN (ordered last by numpy; sorted() cannot order it)."""
    if any(v != v for v in values):
        return None
    n = len(values)
    order = sorted(range(n), key=values.__getitem__)
    ranked = [values[i] for i in order]
    position = [0] * n
    for at, i in enumerate(order):
        position[i] = at
    m = n - 1

    def kth(k: int, p: int) -> float:
        return ranked[k] if k < p else ranked[min(k + 1, n - 1)]

    if m % 2:
        return [kth(m // 2, p) for p in position]
    return [(kth(m // 2 - 1, p) + kth(m // 2, p)) / 2.0 for p in position]


def median_sigma(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 × MAD) of a non-empty array."""
    centre = median(values)
    return centre, MAD_TO_SIGMA * median(np.abs(values - centre))


class LossBaseline:
    """A rank's starting loss level and its recent, admitted losses (see module docstring)."""

    __slots__ = ("_first", "_sorted", "first", "initial", "window")

    def __init__(self, window: int, warmup: int, *, sorted_window: bool = False) -> None:
        """`sorted_window`: keep the window sorted as it slides (a SortedRing), for a caller of `threshold` on
        every report (its median and MAD are then an index and a bisection instead of two partitions)."""
        from gradwatch.server.detectors.sorted_ring import SortedRing  # it takes `median` from this module

        self._sorted: SortedRing | None = SortedRing(window) if sorted_window else None
        self.window: FloatRing = self._sorted if self._sorted is not None else FloatRing(window)
        self._first = FloatRing(warmup)
        #: Median of the first `warmup` finite losses; None until they have been seen.
        self.initial: float | None = None
        #: The first finite loss (taken before any update).
        self.first: float | None = None

    @property
    def ready(self) -> bool:
        return self.initial is not None

    @property
    def scale(self) -> float:
        """The task's loss scale a change must matter at: the larger of |initial| and |first|. A run that
        converges within its warm-up has a tiny median of its first losses (a classifier at 2e-4 by step 12 of
        30); its first loss, before any update, still says what the task's losses are (1.9)."""
        return max(abs(self.initial or 0.0), abs(self.first or 0.0))

    def warm(self, loss: float) -> bool:
        """Feed a loss during warm-up; returns True once the baseline is ready (this loss included)."""
        if self.first is None:
            self.first = loss
        if self.initial is None:
            self._first.append(loss)
            self.window.append(loss)
            if self._first.full:
                self.initial = median(self._first.values())
        return self.initial is not None

    def threshold(self, factor: float, mad_k: float, min_rise: float) -> tuple[float, float]:
        """(median of the window, the level a loss must exceed to be abnormal).

        The margin above the median is the largest of (factor − 1) × |median| (relative), mad_k × sigma
        (the run's own noise) and min_rise × `scale` (a change that matters at the task's scale).
        """
        ordered = self._sorted
        if ordered is not None:
            centre = ordered.median()
            sigma = MAD_TO_SIGMA * ordered.mad(centre)  # median_sigma(held values), bit for bit
        else:
            centre, sigma = median_sigma(self.window.unordered())
        margin = max((factor - 1.0) * abs(centre), mad_k * sigma, min_rise * self.scale)
        return centre, centre + margin if math.isfinite(margin) else math.inf

    def least_threshold(self, factor: float, min_rise: float) -> tuple[float, float]:
        """(median of the window, a level `threshold(factor, any mad_k, min_rise)` is never below): its margin
        without the MAD term, so without taking the MAD. A value at or under it is under the threshold too."""
        centre = self._sorted.median() if self._sorted is not None else median(self.window.unordered())
        margin = max((factor - 1.0) * abs(centre), min_rise * self.scale)
        return centre, centre + margin if math.isfinite(margin) else math.inf


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
