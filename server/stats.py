"""The server's own counters: frames by kind, rejections by reason, duplicates, streams, latency.

Plain numbers behind a lock, updated on the ingest path and read at scrape time by
gradwatch.server.metrics. Every label value (frame kind, rejection reason) exists
from the start at 0, so `increase()` sees the first event.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from gradwatch.server.auth import AUTH_REASONS
from gradwatch.server.validate import REASONS
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["FRAME_KINDS", "LATENCY_BUCKETS_S", "IngestSnapshot", "IngestStats"]

#: AgentFrame body kinds (the oneof's field names): label values of gradwatch_ingest_frames_total.
FRAME_KINDS: tuple[str, ...] = tuple(f.name for f in pb.AgentFrame.DESCRIPTOR.oneofs_by_name["body"].fields)

#: Upper bounds of the ingest latency histogram (seconds to validate and apply one frame).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    1.0,
)


@dataclass(frozen=True)
class IngestSnapshot:
    """A consistent copy of the counters. `latency_buckets` are non-cumulative counts,
    one per LATENCY_BUCKETS_S bound plus a final +Inf bucket."""

    frames: dict[str, int]
    errors: dict[str, int]
    duplicates: int
    active_streams: int
    latency_buckets: tuple[int, ...]
    latency_sum_s: float
    latency_count: int


class IngestStats:
    """Thread-safe ingest counters (see module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frames = dict.fromkeys(FRAME_KINDS, 0)
        self._errors = dict.fromkeys((*REASONS, *AUTH_REASONS), 0)
        self._duplicates = 0
        self._active_streams = 0
        self._buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self._latency_sum = 0.0

    def frame(self, kind: str) -> None:
        with self._lock:
            self._frames[kind] = self._frames.get(kind, 0) + 1

    def rejected(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self._errors[reason] = self._errors.get(reason, 0) + count

    def duplicate(self, count: int = 1) -> None:
        with self._lock:
            self._duplicates += count

    def stream_opened(self) -> None:
        with self._lock:
            self._active_streams += 1

    def stream_closed(self) -> None:
        with self._lock:
            self._active_streams -= 1

    def applied_many(self, kind: str, count: int, seconds: float) -> None:
        """`count` frames of `kind` applied together in `seconds` (each counted at its share of the time)."""
        if count <= 0:
            return
        i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds / count)
        with self._lock:
            self._frames[kind] = self._frames.get(kind, 0) + count
            self._buckets[i] += count
            self._latency_sum += seconds

    def applied(self, kind: str, seconds: float) -> None:
        """One frame of `kind` applied in `seconds` (one lock for the count and the latency)."""
        i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        with self._lock:
            self._frames[kind] = self._frames.get(kind, 0) + 1
            self._buckets[i] += 1
            self._latency_sum += seconds

    def snapshot(self) -> IngestSnapshot:
        with self._lock:
            return IngestSnapshot(
                frames=dict(self._frames),
                errors=dict(self._errors),
                duplicates=self._duplicates,
                active_streams=self._active_streams,
                latency_buckets=tuple(self._buckets),
                latency_sum_s=self._latency_sum,
                latency_count=sum(self._buckets),
            )
