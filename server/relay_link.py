"""One upstream link of a relay (server/relay.py): the "gradwatch-relay-N" thread that owns the channel and the
`Ingest.Relay` stream to one aggregator replica, and the entries waiting for that replica's acknowledgement.

Contract: entries leave in order, in batches of at most the aggregator's `max_batch_entries` (an incident alone),
after waiting up to BATCH_DELAY_S for a fuller batch (not while an urgent entry waits: a per-rank verdict or a
non-finite report); reports travel as columns when the aggregator takes them and a batch holds at least
MIN_COLUMN_REPORTS of them; an idle link sends an empty batch every HEARTBEAT_S; acknowledged
entries are dropped; after every (re)connection the relay's resync (open ranks' Hellos, firing per-rank alerts)
goes first, then every unacknowledged entry again. Every field is guarded by the relay's lock (`relay._lock`).
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gradwatch.routing import Replica
from gradwatch.server.grpc_service import INGEST_SERVICE, REASON_METADATA_KEY
from gradwatch.server.relay_columns import columnar, pack
from gradwatch.v1 import gradwatch_pb2 as pb

if TYPE_CHECKING:
    from gradwatch.server.relay import Relay

__all__ = ["BUFFER_FULL", "DEFAULT_BATCH_ENTRIES", "Entry", "Link", "pack_entries"]

log = logging.getLogger(__name__)

RELAY_METHOD = f"/{INGEST_SERVICE}/Relay"
#: Backoff between connection attempts of a link (jittered, doubling).
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
#: An idle link sends an empty batch this often, so the aggregator tells a live relay from a vanished one
#: (a link cut without a TCP reset) within relay.link_timeout_s.
HEARTBEAT_S = 1.0
#: A link waits this long for more entries before it sends a batch that is not full: one message, one parse and
#: one Ack per batch instead of per record (the agents' own push interval is 0.25 s), and batches full enough to
#: be applied as columns. An urgent entry (a per-rank verdict, a non-finite report) ends the wait at once.
BATCH_DELAY_S = 0.25
#: Fewer reports than this in a batch travel as frames: the aggregator's fixed cost of applying a batch as
#: columns (some hundred microseconds of numpy calls) outweighs its saving below (bench/aggregator_cost.py
#: --batch-entries).
MIN_COLUMN_REPORTS = 16
#: Entries per batch when the aggregator's Welcome does not say.
DEFAULT_BATCH_ENTRIES = 256
BUFFER_FULL = "buffer_full"


@dataclass
class Entry:
    """One record, verdict or incident waiting for its replica's acknowledgement."""

    seq: int
    run_id: str
    frame: pb.RelayedFrame | None = None
    alert: pb.RelayedAlert | None = None
    incident: pb.RelayedIncident | None = None
    #: The session's RelayedFrame.ref (its reports may travel as columns); 0: none.
    ref: int = 0
    #: Send without waiting for a fuller batch (a verdict, a non-finite report).
    urgent: bool = False


def pack_entries(entries: Sequence[Entry], *, columns: bool, min_columns: int = MIN_COLUMN_REPORTS) -> pb.RelayBatch:
    """Frames and alerts of `entries` (no incident), in order, as one batch whose seq is the last entry's. With
    `columns` (the aggregator takes them) every report that can travel as columns does (server/relay_columns.py),
    when at least `min_columns` can."""
    batch = pb.RelayBatch(seq=entries[-1].seq if entries else 0)
    reports: list[tuple[int, int, pb.AgentFrame]] = []
    frames: list[pb.RelayedFrame] = []
    for entry in entries:
        if entry.frame is not None:
            relayed = entry.frame
            inner = relayed.frame
            if columns and entry.ref and relayed.HasField("frame") and inner.HasField("report") and columnar(inner):
                reports.append((entry.ref, len(frames), inner))
            else:
                frames.append(relayed)
        if entry.alert is not None:
            batch.alerts.append(entry.alert)
    if len(reports) < min_columns:  # too few to pay for a batch: frames, in their places
        return pack_entries(entries, columns=False) if reports else _with_frames(batch, frames)
    batch.frames.extend(frames)
    batch.columns.CopyFrom(pack(reports))
    return batch


def _with_frames(batch: pb.RelayBatch, frames: list[pb.RelayedFrame]) -> pb.RelayBatch:
    batch.frames.extend(frames)
    return batch


class Link:
    """One upstream replica: its entries (oldest first), its thread and its current stream."""

    def __init__(self, relay: Relay, replica: Replica, number: int) -> None:
        self.relay = relay
        self.address = replica.address
        #: The name the aggregator's certificate must carry when the address came from a DNS expansion.
        self._server_name = replica.server_name
        self.entries: collections.deque[Entry] = collections.deque()
        self.sent_upto = 0  # seq of the last entry written on the current stream
        self.connected = False
        self.resync_needed = False
        self.refusals: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self._max_batch = DEFAULT_BATCH_ENTRIES
        self._columns = False  # the aggregator takes RelayBatch.columns (its RelayWelcome said)
        #: An urgent entry waits to be sent (Entry.urgent): the link sends what it has without waiting.
        self.urgent = False
        self._call: Any = None
        self._active = False  # a stream is open (its request generator runs while this holds)
        self._thread = threading.Thread(target=self._run, name=f"gradwatch-relay-{number}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(timeout=5)

    def pending(self) -> bool:
        return bool(self.entries)

    def view(self) -> dict[str, Any]:
        return {
            "upstream": self.address,
            "connected": self.connected,
            "buffered": len(self.entries),
            "refused": dict(self.refusals),
            "last_error": self.last_error,
        }

    def drop_oldest(self) -> bool:
        """Drop the oldest entry to make room (under the relay's lock); False when there is none."""
        if not self.entries:
            return False
        self._pop()
        self.relay.dropped[BUFFER_FULL] += 1
        return True

    def _pop(self) -> None:
        """Remove the oldest entry (under the relay's lock), keeping the relay's counts."""
        entry = self.entries.popleft()
        self.relay.buffered -= 1
        if entry.incident is not None:
            self.relay._incidents -= 1

    # ------------------------------------------------------------------ the link's thread

    def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        relay = self.relay
        while True:
            with relay._lock:
                if relay._stopping:
                    return
                relay._repick(self)
            try:
                self._stream()
                backoff = RECONNECT_MIN_S
            except grpc.RpcError as exc:
                self._note_failure(exc)
            except Exception:  # a bug here must not end forwarding: log it and reconnect
                log.exception("relay link to %s failed", self.address)
            finally:
                with relay._lock:
                    self.connected = self._active = False
                    self._call = None
                    relay._lock.notify_all()
            with relay._lock:
                if relay._stopping:
                    return
                relay._lock.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _note_failure(self, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        reason = (
            dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY) if hasattr(exc, "trailing_metadata") else None
        )
        if code is grpc.StatusCode.UNIMPLEMENTED:
            reason = "upstream_without_relay"
        if reason:
            self.refusals[str(reason)] += 1
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code is grpc.StatusCode.CANCELLED and self.relay._stopping:
            return
        if self.last_error != details:
            log.warning("relay: upstream %s: %s (%s); retrying", self.address, details, reason or code)
        self.last_error = details or str(code)

    def _stream(self) -> None:
        relay = self.relay
        credentials = relay._credentials
        if credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            name = [("grpc.ssl_target_name_override", self._server_name)] if self._server_name else None
            channel = grpc.secure_channel(self.address, credentials, options=name)
        with channel:
            method = channel.stream_stream(
                RELAY_METHOD,
                request_serializer=pb.RelayFrame.SerializeToString,
                response_deserializer=pb.RelayReply.FromString,
            )
            metadata = (("authorization", f"Bearer {relay._token}"),) if relay._token else None
            with relay._lock:
                self.sent_upto, self._active = 0, True
            self._call = call = method(self._requests(), metadata=metadata)
            for reply in call:
                body = reply.WhichOneof("body")
                if body == "welcome":
                    with relay._lock:
                        self._max_batch = reply.welcome.max_batch_entries or DEFAULT_BATCH_ENTRIES
                        self._columns = reply.welcome.columns
                        self.connected, self.last_error, self.resync_needed = True, "", True
                        relay._lock.notify_all()
                elif body == "ack":
                    self._acked(reply.ack.seq)
                elif body == "command" and relay._deliver is not None:
                    command = reply.command
                    relay._deliver(command.run_id, command.rank, command.command)

    def _acked(self, seq: int) -> None:
        relay = self.relay
        with relay._lock:
            while self.entries and self.entries[0].seq <= seq:
                self._pop()
                relay.sent += 1
            relay._lock.notify_all()

    def _requests(self) -> Iterator[pb.RelayFrame]:
        """The stream's frames: RelayHello, then batches as entries arrive (runs on gRPC's sending thread)."""
        relay = self.relay
        yield pb.RelayFrame(hello=pb.RelayHello(protocol_version=pb.PROTOCOL_VERSION_CURRENT, relay_id=relay.relay_id))
        while True:
            with relay._lock:
                ready = relay._lock.wait_for(
                    lambda: (
                        relay._stopping
                        or not self._active
                        or (self.connected and (self.resync_needed or self._unsent()))
                    ),
                    HEARTBEAT_S,
                )
                if relay._stopping or not self._active:
                    return
                deadline = time.monotonic() + BATCH_DELAY_S
                while (ready and not self.resync_needed and not self.urgent
                       and self._unsent_count() < self._max_batch):  # fmt: skip
                    left = deadline - time.monotonic()
                    if left <= 0 or relay._stopping or not self._active:
                        break
                    relay._lock.wait(left)
                batches = relay._resync(self, self._max_batch) if self.resync_needed else []
                self.resync_needed = False
                batch = self._next_batch()
                if batch is None and not ready and self.connected:
                    batch = pb.RelayBatch(seq=self.sent_upto)  # a heartbeat (acknowledged like any batch)
            yield from (pb.RelayFrame(batch=b) for b in batches)
            if batch is not None:
                yield pb.RelayFrame(batch=batch)

    def _unsent(self) -> bool:
        return bool(self.entries) and self.entries[-1].seq > self.sent_upto

    def _unsent_count(self) -> int:
        """An upper bound (O(1)) of the entries not yet written on this stream: seqs rise, shared by all links."""
        if not self.entries or self.entries[-1].seq <= self.sent_upto:
            return 0
        return min(len(self.entries), self.entries[-1].seq - self.sent_upto)

    def _next_batch(self) -> pb.RelayBatch | None:
        """The next unsent entries (under the relay's lock), at most the aggregator's batch size."""
        taken: list[Entry] = []
        for entry in self.entries:
            if entry.seq <= self.sent_upto:
                continue
            if entry.incident is not None:  # megabytes: an incident travels alone
                if not taken:
                    self.sent_upto = entry.seq
                    batch = pb.RelayBatch(seq=entry.seq, incidents=[entry.incident])
                    return self._with_drops(batch)
                break
            taken.append(entry)
            if len(taken) >= self._max_batch:
                break
        if not taken:
            return None
        self.sent_upto = taken[-1].seq
        self.urgent = self._unsent() and any(e.urgent for e in self.entries if e.seq > self.sent_upto)
        return self._with_drops(pack_entries(taken, columns=self._columns))

    def _with_drops(self, batch: pb.RelayBatch) -> pb.RelayBatch:
        for reason, value in self.relay.dropped.items():
            batch.dropped[reason] = value
        return batch
