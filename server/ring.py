"""Fixed-capacity numpy ring buffers: memory is allocated once and never grows.

`FloatRing` holds the last N floats (detector windows); `RecordRing` the last N rows
of a structured dtype (per-rank report history). Both return chronological copies,
so callers can compute on them while the ring keeps filling.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FloatRing", "RecordRing", "RingTable", "TableRing", "occurrences"]


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


class RingTable:
    """The RecordRings of many ranks as one 2-D array (row r: rank r's ring), so rows of many ranks are appended
    with one scatter (`append_many`). Per rank it behaves as a RecordRing (`ring(rank)` is one, a view): the last
    `capacity` rows, oldest first on read; the width starts at RecordRing.INITIAL_ROWS and doubles up to
    `capacity` as the fullest ring needs it."""

    def __init__(self, dtype: np.dtype[Any], capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be ≥ 1")
        self.capacity = capacity
        self.data = np.zeros((0, min(capacity, RecordRing.INITIAL_ROWS)), dtype=dtype)
        #: Rows appended per rank in all; `base`: of those, the ones a refilled ring had before its saved rows.
        self.count = np.zeros(0, dtype=np.int64)
        self.base = np.zeros(0, dtype=np.int64)

    def ring(self, rank: int) -> TableRing:
        self._fit(rank + 1, 0)
        return TableRing(self, rank)

    def append_many(self, ranks: np.ndarray, rows: np.ndarray) -> None:
        """`rows[i]` (a structured array of the table's dtype) appended to rank `ranks[i]`'s ring, in order."""
        if ranks.size == 0:
            return
        occurrence, counts = occurrences(ranks)
        self._fit(int(ranks.max()) + 1, 0)
        position = self.count[ranks] - self.base[ranks] + occurrence
        self._fit(0, int(position.max()) + 1)
        width = self.data.shape[1]
        keep = occurrence >= counts - width  # a rank's last `width` rows of the batch
        self.data[ranks[keep], position[keep] % width] = rows[keep]
        np.add.at(self.count, ranks, 1)

    def append(self, rank: int, row: tuple[Any, ...]) -> None:
        position = int(self.count[rank] - self.base[rank])
        self._fit(rank + 1, position + 1)
        self.data[rank, position % self.data.shape[1]] = row
        self.count[rank] += 1

    def _fit(self, ranks: int, rows: int) -> None:
        """Room for `ranks` rings and, below capacity, `rows` rows each (no ring has wrapped before that)."""
        extra = ranks - self.data.shape[0]
        if extra > 0:  # room for twice the ranks: ranks joining one by one cost O(ranks) in all, not O(ranks²)
            extra = max(extra, self.data.shape[0])
            self.data = np.concatenate([self.data, np.zeros((extra, self.data.shape[1]), dtype=self.data.dtype)])
            self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
            self.base = np.concatenate([self.base, np.zeros(extra, dtype=np.int64)])
        width = self.data.shape[1]
        if rows > width and width < self.capacity:
            wider = width
            while wider < rows and wider < self.capacity:
                wider *= 2
            grown = np.zeros((self.data.shape[0], min(wider, self.capacity)), dtype=self.data.dtype)
            grown[:, :width] = self.data
            self.data = grown


class TableRing:
    """One rank's ring of a RingTable, with RecordRing's interface."""

    __slots__ = ("_rank", "_table")

    def __init__(self, table: RingTable, rank: int) -> None:
        self._table, self._rank = table, rank

    @property
    def capacity(self) -> int:
        return self._table.capacity

    @property
    def count(self) -> int:
        return int(self._table.count[self._rank])

    def _position(self) -> tuple[int, int]:
        table = self._table
        return int(table.count[self._rank] - table.base[self._rank]), table.data.shape[1]

    def __len__(self) -> int:
        position, width = self._position()
        return min(position, width)

    def append(self, row: tuple[Any, ...]) -> None:
        self._table.append(self._rank, row)

    def rows(self) -> np.ndarray:
        """A chronological copy of the held rows."""
        position, width = self._position()
        data = self._table.data[self._rank]
        if position <= width:
            return data[:position].copy()
        start = position % width
        return np.concatenate((data[start:], data[:start]))

    def last(self, n: int) -> np.ndarray:
        """A chronological copy of the latest `n` held rows (fewer if fewer are held)."""
        position, width = self._position()
        n = max(0, min(n, position, width))
        data = self._table.data[self._rank]
        end = position if position <= width else position % width
        if n <= end:
            return data[end - n : end].copy()
        return np.concatenate((data[width - (n - end) :], data[:end]))

    def refill(self, rows: np.ndarray, count: int) -> None:
        """Start from saved state, as RecordRing.refill."""
        table, rank = self._table, self._rank
        rows = rows[-table.capacity :]
        if rows.size == 0:
            return
        table._fit(rank + 1, int(rows.size))
        table.data[rank, : rows.size] = rows
        table.count[rank] = max(count, int(rows.size))
        table.base[rank] = table.count[rank] - rows.size
