"""Fixed-capacity numpy ring buffers: memory is allocated once and never grows.

`FloatRing` holds the last N floats (detector windows); `RecordRing` the last N rows
of a structured dtype (per-rank report history). Both return chronological copies,
so callers can compute on them while the ring keeps filling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FloatRing", "RecordRing", "occurrences"]


class FloatRing:
    """The last `capacity` float64 values, oldest first on read."""

    __slots__ = ("_data", "_next", "count")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be ≥ 1")
        self._data = np.zeros(capacity, dtype=np.float64)
        self._next = 0
        #: Values appended so far (may exceed capacity).
        self.count = 0

    @property
    def capacity(self) -> int:
        return int(self._data.size)

    def __len__(self) -> int:
        return min(self.count, self._data.size)

    @property
    def full(self) -> bool:
        return self.count >= self._data.size

    def append(self, value: float) -> None:
        self._data[self._next] = value
        self._next = (self._next + 1) % self._data.size
        self.count += 1

    def values(self) -> np.ndarray:
        """Held values, oldest first (a copy when the ring has wrapped, else a view)."""
        if not self.full:
            return self._data[: self.count]
        return np.concatenate((self._data[self._next :], self._data[: self._next]))

    def unordered(self) -> np.ndarray:
        """Held values in storage order: cheaper, for order-free statistics (median, MAD)."""
        return self._data if self.full else self._data[: self.count]


class RecordRing:
    """The last `capacity` rows of a structured dtype, oldest first on read.

    Storage starts small and doubles up to `capacity`, so thousands of short-lived
    ranks do not each pin a full ring; it never grows beyond `capacity`.
    """

    __slots__ = ("_capacity", "_data", "_next", "count")

    INITIAL_ROWS = 64

    def __init__(self, dtype: np.dtype[Any], capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be ≥ 1")
        self._capacity = capacity
        self._data = np.zeros(min(capacity, self.INITIAL_ROWS), dtype=dtype)
        self._next = 0
        self.count = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return min(self.count, self._data.size)

    def append(self, row: tuple[Any, ...]) -> None:
        if self._next == self._data.size and self._data.size < self._capacity:
            # Not wrapped yet, so rows are in order: grow in place of wrapping.
            grown = np.zeros(min(2 * self._data.size, self._capacity), dtype=self._data.dtype)
            grown[: self._data.size] = self._data
            self._data = grown
        if self._next == self._data.size:
            self._next = 0
        self._data[self._next] = row
        self._next += 1
        self.count += 1

    def rows(self) -> np.ndarray:
        """A chronological copy of the held rows."""
        if self.count <= self._data.size:
            return self._data[: self.count].copy()
        return np.concatenate((self._data[self._next :], self._data[: self._next]))

    def last(self, n: int) -> np.ndarray:
        """A chronological copy of the latest `n` held rows (fewer if fewer are held): O(n), not O(capacity)."""
        n = max(0, min(n, len(self)))
        if n <= self._next:
            return self._data[self._next - n : self._next].copy()
        return np.concatenate((self._data[self._data.size - (n - self._next) :], self._data[: self._next]))

    def refill(self, rows: np.ndarray, count: int) -> None:
        """Start from saved state: the latest `rows` (chronological; the last `capacity` are kept) of a ring
        that had `count` appended in all (gradwatch.server.persistence, after a restart)."""
        rows = rows[-self._capacity :]
        if rows.size == 0:
            return
        self._data = np.zeros(rows.size, dtype=self._data.dtype)
        self._data[:] = rows
        self._next = rows.size
        self.count = max(count, int(rows.size))


def occurrences(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each element of `ranks`: how many equal elements precede it, and how many there are in all."""
    order = np.argsort(ranks, kind="stable")
    ordered = ranks[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, ordered.size])
    group = np.repeat(np.arange(starts.size), sizes)
    occurrence = np.empty(ranks.size, dtype=np.int64)
    occurrence[order] = np.arange(ranks.size) - starts[group]
    counts = np.empty(ranks.size, dtype=np.int64)
    counts[order] = sizes[group]
    return occurrence, counts
