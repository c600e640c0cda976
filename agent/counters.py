"""What one Monitor has sent, had acknowledged and dropped: the numbers behind `Monitor.counters()`.

Each field has a single writer thread (noted beside it), and every drop reason exists from the start, so the
reads from other threads (heartbeats, `counters()`) never see a dict change size under them and no lock is
needed: in CPython an int attribute or dict item update is atomic.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DROP_REASONS", "Counters"]

# Why a report or event never reached the server. Heartbeats carry these, cumulatively.
DROP_REASONS: tuple[str, ...] = (
    "queue_full",  # training thread: the sender's queue was at queue_size (newest dropped)
    "replay_overflow",  # sender: the replay buffer was full while the server was away (oldest dropped)
    "error",  # sender: an internal error while turning a report into a frame
    "frame_too_large",  # sender: a frame over the server's Welcome.max_frame_bytes (it would refuse the stream)
)


class Counters:
    """Cumulative counters of one Monitor."""

    def __init__(self) -> None:
        self.reports = 0  # training thread: reports handed to the sender
        self.events = 0  # training thread: events handed to the sender
        self.sent = 0  # sender: numbered frames written to a stream (first sends and resends)
        self.resent = 0  # sender: of which resends after a reconnect
        self.acked = 0  # sender: numbered frames the server acknowledged
        self.acked_seq = 0  # sender: highest acknowledged sequence number
        self.reconnects = 0  # sender: streams that reached Welcome after the first one
        self.stream_failures = 0  # sender: streams that ended or failed before close
        self.rejections = 0  # sender: streams the server refused (FAILED_PRECONDITION, ...)
        self.commands = 0  # sender: FULL_STATS commands received
        self.flushes = 0  # sender: unary Flush calls at close that succeeded
        self.stream_state = "idle"  # sender
        self.buffered = 0  # sender: frames in the replay buffer
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def snapshot(self, internal_errors: dict[str, int], queued: int) -> dict[str, Any]:
        """A plain-dict copy for `Monitor.counters()`."""
        return {
            "reports": self.reports,
            "events": self.events,
            "sent": self.sent,
            "resent": self.resent,
            "acked": self.acked,
            "acked_seq": self.acked_seq,
            "dropped": dict(self.dropped),
            "internal_errors": internal_errors,
            "reconnects": self.reconnects,
            "stream_failures": self.stream_failures,
            "rejections": self.rejections,
            "commands": self.commands,
            "flushes": self.flushes,
            "stream_state": self.stream_state,
            "buffered": self.buffered,
            "queued": queued,
        }
