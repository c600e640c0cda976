"""The sender's bounded buffer of frames the server has not acknowledged yet.

Contract: frames are appended in increasing sequence order and leave either when an acknowledgement covers
them (`ack`, cumulative) or when the buffer is over capacity (`append` evicts the oldest *unpinned* frame
and returns how many it evicted, for the "replay_overflow" drop counter). A pinned frame (the first one
that carried a non-finite flag: the most valuable frame of a run) is never evicted, only acknowledged.
Used by the sender thread only: no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["ReplayBuffer"]

FrameT = TypeVar("FrameT")


class ReplayBuffer(Generic[FrameT]):
    """Unacknowledged frames by sequence number, oldest first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self._capacity = capacity
        self._frames: OrderedDict[int, FrameT] = OrderedDict()
        self._pinned: set[int] = set()

    def __len__(self) -> int:
        return len(self._frames)

    def __iter__(self) -> Iterator[tuple[int, FrameT]]:
        """(seq, frame) pairs, oldest first."""
        return iter(list(self._frames.items()))

    def pinned(self) -> frozenset[int]:
        return frozenset(self._pinned)

    def append(self, seq: int, frame: FrameT, *, pin: bool = False) -> int:
        """Add a frame (seq greater than every held one); return the number of frames evicted."""
        if self._frames and seq <= next(reversed(self._frames)):
            raise ValueError(f"sequence numbers must increase: {seq} after {next(reversed(self._frames))}")
        self._frames[seq] = frame
        if pin:
            self._pinned.add(seq)
        evicted = 0
        while len(self._frames) > self._capacity:
            victim = next((s for s in self._frames if s not in self._pinned), None)
            if victim is None:  # only pinned frames left: capacity is smaller than the pins; keep them
                break
            del self._frames[victim]
            evicted += 1
        return evicted

    def ack(self, seq: int) -> int:
        """Drop every frame with sequence number <= seq; return how many were dropped."""
        dropped = 0
        while self._frames:
            oldest = next(iter(self._frames))
            if oldest > seq:
                break
            del self._frames[oldest]
            self._pinned.discard(oldest)
            dropped += 1
        return dropped

    def discard(self, seq: int) -> None:
        """Forget the frame `seq` (one the server would refuse), pinned or not."""
        self._frames.pop(seq, None)
        self._pinned.discard(seq)

    def after(self, seq: int) -> list[tuple[int, FrameT]]:
        """(seq, frame) pairs with a sequence number greater than `seq`, oldest first.

        Walks from the newest end, so the common case (one new frame) costs O(1), not O(len).
        """
        newer: list[tuple[int, FrameT]] = []
        for s in reversed(self._frames):
            if s <= seq:
                break
            newer.append((s, self._frames[s]))
        newer.reverse()
        return newer
