"""A detector window that keeps its values sorted as it slides: medians and MADs per report without a partition.

The loss and gradient detectors take several medians over windows of 100–200 values on every report. A numpy
partition costs a few µs per call however small the window, and those calls were most of the server's CPU per
report. `SortedRing` is a `FloatRing` that also keeps its finite values in a sorted list (one `bisect` insertion
and one removal per append, O(log n) comparisons and a memmove), so a median is an index and a MAD a selection
over two sorted runs (O(log n)).

Contract: every statistic equals `gradwatch.server.detectors.robust`'s numpy computation on the same values bit
for bit (tests/test_server_fast_statistics.py, generated windows). Where the sorted list could not say the same:
a window holding a non-finite value (NaN has no place in a sorted order) and a median that is a zero (numpy's
partition may pick -0.0 where the sorted list has 0.0), the numpy computation runs instead.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort

import numpy as np

from gradwatch.server.detectors.robust import median as partition_median
from gradwatch.server.ring import FloatRing

__all__ = ["SortedRing", "insert_finite", "mad_of_sorted", "median_of_sorted", "remove_finite"]


class SortedRing(FloatRing):
    """The last `capacity` floats, oldest first on read (a FloatRing), plus sorted copies of the held values
    (unless `whole` is False: then only `slice_median` answers) and of fixed chronological slices of the full
    window (`slices`: (start, stop) pairs, e.g. the window's head and tail; valid once the ring is full)."""

    __slots__ = ("_bad", "_slices", "_sorted")

    def __init__(self, capacity: int, slices: tuple[tuple[int, int], ...] = (), *, whole: bool = True) -> None:
        super().__init__(capacity)
        for start, stop in slices:
            if not 0 <= start < stop <= capacity:
                raise ValueError(f"slice ({start}, {stop}) is not within a window of {capacity}")
        #: The finite held values, ascending; `_bad` counts the non-finite ones held.
        self._sorted: list[float] | None = [] if whole else None
        self._bad = 0
        #: Per slice: [start, stop, its finite values ascending, its non-finite count].
        self._slices: list[list] = [[start, stop, [], 0] for start, stop in slices]  # type: ignore[type-arg]

    def append(self, value: float) -> None:
        value = float(value)
        data, cap, at = self._data, self._data.size, self._next
        ordered = self._sorted
        if self.count >= cap:
            item = data.item  # a Python float, without a numpy scalar in between
            if ordered is not None:
                self._bad -= remove_finite(ordered, item(at))
            for entry in self._slices:
                start, stop, part, _ = entry
                entry[3] -= remove_finite(part, item((at + start) % cap))
                entry[3] += insert_finite(part, value if stop == cap else item((at + stop) % cap))
        if ordered is not None:
            self._bad += insert_finite(ordered, value)
        data[at] = value  # FloatRing.append, inline
        self._next = (at + 1) % cap
        self.count += 1
        if self.count == cap and self._slices:  # just filled: the slices start from the whole window
            held = data.tolist()
            for entry in self._slices:
                part = held[entry[0] : entry[1]]
                finite = [v for v in part if math.isfinite(v)]
                entry[2], entry[3] = sorted(finite), len(part) - len(finite)

    def median(self) -> float:
        """`robust.median` of the held values (non-empty)."""
        if self._sorted is None:
            raise ValueError("this ring keeps only its slices sorted")
        if self._bad:
            return partition_median(self.unordered())
        return median_of_sorted(self._sorted, self.unordered)

    def mad(self, centre: float) -> float:
        """`robust.median(np.abs(held - centre))` of the held values (non-empty)."""
        if self._sorted is None:
            raise ValueError("this ring keeps only its slices sorted")
        if self._bad or not math.isfinite(centre):
            return partition_median(np.abs(self.unordered() - centre))
        return mad_of_sorted(self._sorted, centre)

    def slice_median(self, index: int) -> float:
        """`robust.median` of slice `index` of the window (see the class docstring); the ring must be full."""
        start, stop, ordered, bad = self._slices[index]
        if not self.full:
            raise ValueError("slice medians need a full window")
        if bad:
            return partition_median(self.values()[start:stop])
        return median_of_sorted(ordered, lambda: self.values()[start:stop])


def insert_finite(ordered: list[float], value: float) -> int:
    """Insert a finite value in order; returns 1 for a non-finite one (not inserted), else 0."""
    if value - value != 0.0:  # NaN or ±inf
        return 1
    insort(ordered, value)
    return 0


def remove_finite(ordered: list[float], value: float) -> int:
    """Remove one value equal to `value`; 1 for a non-finite one, else 0."""
    if value - value != 0.0:
        return 1
    # Of equal zeros, this may remove 0.0 for -0.0: unobservable, since a zero median is taken by numpy and
    # deviations are absolute values.
    del ordered[bisect_left(ordered, value)]
    return 0


def median_of_sorted(ordered: list[float], held: object) -> float:
    """The median of finite values sorted ascending, as numpy's partition gives it; `held()` returns the values
    as an array for the one case it cannot tell from the sorted list (a zero in the middle: its sign)."""
    n = len(ordered)
    lo, hi = (n - 1) // 2, n // 2
    a, b = ordered[lo], ordered[hi]
    if a == 0.0 or b == 0.0:
        return partition_median(held())  # type: ignore[operator]
    return a if lo == hi else (a + b) / 2


def mad_of_sorted(ordered: list[float], centre: float) -> float:
    """Median of |x − centre| over finite values sorted ascending (`centre` finite), as numpy computes it.

    The deviations below the centre, c − x read from the centre outwards, and those above, x − c, are two
    ascending runs (rounding is monotone), and c − x is |x − c| exactly (rounding is symmetric); the middle of
    their merge is found by bisection. A zero deviation is returned as 0.0, as np.abs gives it."""
    n = len(ordered)
    split = bisect_left(ordered, centre)  # ordered[:split] < centre <= ordered[split:]
    below, above = split, n - split
    k = (n - 1) // 2
    # Take i of the k + 1 smallest deviations from below the centre and k + 1 − i from above: the largest i
    # whose i-th deviation below is not larger than the (k + 2 − i)-th above.
    lo, hi = max(0, k + 1 - above), min(k + 1, below)
    while lo < hi:
        i = (lo + hi + 1) // 2
        j = k + 1 - i
        if j < above and ordered[split + j] - centre < centre - ordered[split - i]:
            hi = i - 1
        else:
            lo = i
    i, j = lo, k + 1 - lo
    left = centre - ordered[split - i] if i > 0 else -1.0
    right = ordered[split + j - 1] - centre if j > 0 else -1.0
    middle = left if left > right else right
    if n % 2 == 0:  # the next deviation of the merge: the smaller of the next below and the next above
        after_left = centre - ordered[split - i - 1] if i < below else math.inf
        after_right = ordered[split + j] - centre if j < above else math.inf
        middle = (middle + (after_left if after_left < after_right else after_right)) / 2
    return middle + 0.0  # -0.0 (x = -0.0 at a centre of 0.0) reads 0.0, as |x − c| does
