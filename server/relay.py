"""A relay's upstream (`gradwatch serve --upstream`): its ranks' compact records and per-rank verdicts, forwarded.

Contract (ARCHITECTURE.md, "Two tiers")
--------
* `Relay` is the relay ingestor's `Forwarder`: every Hello, applied frame, per-rank verdict and ended stream
  becomes one entry of a bounded buffer, on the ingest thread, in O(1) (a report is compacted: its per-layer
  and per-module columns stay on the relay). Nothing there waits on the network.
* Each run goes to the aggregator replica its id hashes to (`agent/routing.py`, the agents' own choice, over
  `relay.upstream`: fixed entries or `dns:///` names), so every relay of a run reaches the same replica. One
  `_Link` per replica in use: a "gradwatch-relay-N" thread owns its channel and its stream (`Ingest.Relay`).
* A link sends entries in order, in batches of at most the aggregator's `max_batch_entries`, and keeps them
  until the aggregator acknowledges the batch's `seq`. After a reconnect it first re-sends the Hello of every
  open rank of its runs and every per-rank alert still firing here, then every unacknowledged entry (the
  aggregator drops per-rank frames it already applied by their agent seq). Before a reconnect a link re-picks
  the replica of each of its runs: a run whose replica changed (DNS answer, replica lost) moves, with its
  buffered entries, to the link of the new one.
* Bounded: at most `relay.buffer_entries` entries over all links; beyond, a link drops its oldest entry and
  counts it (`dropped["buffer_full"]`). A refusal by the aggregator (`relay_limit_reached`, an unsupported
  protocol, a denied token) is counted by its reason and retried with backoff; the relay keeps serving its
  ranks and its per-rank alerts throughout.
* Commands the aggregator sends for a rank (a critical cross-rank alert's broadcast, FULL_STATS) are queued
  on the relay's ingestor and reach the agent with its next frame.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gradwatch.agent.routing import Replica, ReplicaRouter
from gradwatch.server.detectors import Clear, Fire, Verdict
from gradwatch.server.grpc_service import INGEST_SERVICE, REASON_METADATA_KEY
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["IncidentTap", "Relay", "RelayCollector", "compact_frame"]

log = logging.getLogger(__name__)

RELAY_METHOD = f"/{INGEST_SERVICE}/Relay"
#: Backoff between connection attempts of a link (jittered, doubling).
RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
#: An idle link sends an empty batch this often, so the aggregator tells a live relay from a vanished one
#: (a link cut without a TCP reset) within relay.link_timeout_s.
HEARTBEAT_S = 1.0
#: A link waits this long for more entries before it sends a batch that is not full: one message, one parse and
#: one Ack per batch instead of per record (the agents' own push interval is 0.25 s).
BATCH_DELAY_S = 0.05
#: Entries per batch when the aggregator's Welcome does not say.
DEFAULT_BATCH_ENTRIES = 256
#: Report fields that stay on the relay: per-layer and per-module columns, the model's input and labels.
_HEAVY_REPORT_FIELDS = ("layers", "activations", "input_mean", "input_std", "label_histogram")
BUFFER_FULL = "buffer_full"
INCIDENT_BUFFER_FULL = "incident_buffer_full"
INCIDENT_TOO_LARGE = "incident_too_large"
#: Incidents (up to max_incident_bytes each) waiting for the aggregator at once; the oldest are dropped beyond.
MAX_INCIDENTS_BUFFERED = 16
#: Incident statuses worth forwarding: the window is final.
_FINAL_INCIDENTS = ("complete", "interrupted")


def compact_frame(frame: pb.AgentFrame, kind: str) -> pb.AgentFrame:
    """`frame` as forwarded upstream: a report without its columns (what cross-rank detectors read stays)."""
    if kind != "report" or not any(
        frame.report.HasField(f) if f in ("layers", "activations") else getattr(frame.report, f)
        for f in _HEAVY_REPORT_FIELDS
    ):
        return frame
    out = pb.AgentFrame()
    out.CopyFrom(frame)
    for name in _HEAVY_REPORT_FIELDS:
        out.report.ClearField(name)
    return out


@dataclass
class _Entry:
    seq: int
    run_id: str
    frame: pb.RelayedFrame | None = None
    alert: pb.RelayedAlert | None = None
    incident: pb.RelayedIncident | None = None


class Relay:
    """The relay's forwarder and its upstream links (see the module docstring)."""

    def __init__(
        self,
        upstream: Sequence[str],
        *,
        relay_id: str,
        buffer_entries: int,
        token: str = "",
        credentials: grpc.ChannelCredentials | None = None,
        deliver: Callable[[str, int, pb.Command], None] | None = None,
        firing: Callable[[], list[dict[str, Any]]] | None = None,
        router: ReplicaRouter | None = None,
        max_incident_bytes: int = 4 << 20,
    ) -> None:
        """`deliver(run, rank, command)` queues a command from upstream for a rank (the ingestor's
        queue_command); `firing()` lists this relay's firing alerts with their active ranks (AlertBook.
        export_firing), re-sent after a reconnect."""
        self.relay_id = relay_id
        self._router = router if router is not None else ReplicaRouter(list(upstream))
        self._capacity = buffer_entries
        self._token = token
        #: TLS to the aggregator (relay.ca_file); None: plaintext.
        self._credentials = credentials
        self._max_incident_bytes = max_incident_bytes
        self._incidents = 0  # incident entries buffered (each may hold megabytes)
        self._deliver = deliver
        self._firing = firing
        self._lock = threading.Condition()
        self._seq = itertools.count(1)
        self._links: dict[str, _Link] = {}
        self._run_link: dict[str, _Link] = {}
        #: (run, rank, session) -> the Hello of every rank streaming to this relay, re-sent after a reconnect.
        self._open: dict[tuple[str, int, str], pb.Hello] = {}
        self.buffered = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self._stopping = False

    # ------------------------------------------------------------------ Forwarder (ingest thread)

    def opened(self, hello: pb.Hello, streaming: bool) -> None:
        with self._lock:
            if streaming:  # a Flush call's Hello is forwarded once, never re-sent
                self._open[(hello.run_id, hello.rank, hello.session_id)] = hello
            self._add(
                hello.run_id,
                frame=pb.RelayedFrame(run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, hello=hello),
            )

    def applied(self, hello: pb.Hello, frame: pb.AgentFrame, kind: str) -> None:
        relayed = pb.RelayedFrame(
            run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, frame=compact_frame(frame, kind)
        )
        with self._lock:
            self._add(hello.run_id, frame=relayed)

    def closed(self, hello: pb.Hello) -> None:
        with self._lock:
            self._open.pop((hello.run_id, hello.rank, hello.session_id), None)
            self._add(
                hello.run_id,
                frame=pb.RelayedFrame(run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, closed=True),
            )

    def verdict(self, run_id: str, detector: str, rank: int, verdict: Verdict, autopsy: dict[str, Any] | None) -> None:
        with self._lock:
            self._add(run_id, alert=_relayed_alert(run_id, detector, rank, verdict, autopsy))

    def incident(self, body: dict[str, Any], window: bytes) -> None:
        """An incident the relay's recorder stored (on its writer thread): forwarded once its window is final."""
        if body.get("status") not in _FINAL_INCIDENTS:
            return
        with self._lock:
            if len(window) > self._max_incident_bytes:
                self.dropped[INCIDENT_TOO_LARGE] += 1
                return
            if self._incidents >= MAX_INCIDENTS_BUFFERED:
                for link in self._links.values():
                    oldest = next((e for e in link.entries if e.incident is not None), None)
                    if oldest is not None:
                        link.entries.remove(oldest)
                        self.buffered -= 1
                        self._incidents -= 1
                        self.dropped[INCIDENT_BUFFER_FULL] += 1
                        break
            self._incidents += 1
            self._add(str(body.get("run", "")), incident=pb.RelayedIncident(body_json=json.dumps(body), window=window))

    # ------------------------------------------------------------------ lifecycle

    def stop(self, timeout_s: float = 2.0) -> None:
        """Give every link `timeout_s` to send what it holds, then end the streams."""
        with self._lock:
            links = list(self._links.values())
            self._lock.wait_for(lambda: all(not link.pending() or not link.connected for link in links), timeout_s)
            self._stopping = True
            self._lock.notify_all()
        for link in links:
            link.close()

    def state(self) -> dict[str, Any]:
        """For /api/v1/relay and the collector: links, buffered entries, drops by reason."""
        with self._lock:
            return {
                "relay_id": self.relay_id,
                "buffered": self.buffered,
                "sent": self.sent,
                "dropped": dict(self.dropped),
                "links": [link.view() for link in self._links.values()],
            }

    # ------------------------------------------------------------------ internals (under self._lock)

    def _add(self, run_id: str, *, frame: pb.RelayedFrame | None = None, alert: pb.RelayedAlert | None = None,
             incident: pb.RelayedIncident | None = None) -> None:  # fmt: skip
        link = self._run_link.get(run_id)
        if link is None:
            link = self._link_for(self._router.pick(run_id))
            self._run_link[run_id] = link
        # Full: drop this link's oldest entry, else (its backlog sits on another replica's link) one there.
        if self.buffered >= self._capacity and not any(other.drop_oldest() for other in (link, *self._links.values())):
            self.dropped[BUFFER_FULL] += 1
            return
        link.entries.append(_Entry(next(self._seq), run_id, frame, alert, incident))
        self.buffered += 1
        self._lock.notify_all()

    def _link_for(self, replica: Replica) -> _Link:
        link = self._links.get(replica.address)
        if link is None:
            link = self._links[replica.address] = _Link(self, replica, len(self._links))
            link.start()
        return link

    def _resync(self, link: _Link, size: int) -> list[pb.RelayBatch]:
        """After `link` connected: its open ranks' Hellos and its runs' firing per-rank alerts, to send first."""
        runs = {run for run, held in self._run_link.items() if held is link}
        frames = [
            pb.RelayedFrame(run_id=run, rank=rank, session_id=session, hello=hello)
            for (run, rank, session), hello in self._open.items()
            if run in runs
        ]
        alerts = []
        for alert in self._firing() if self._firing is not None else ():
            if alert["run"] in runs:
                for rank in alert.get("active", alert["ranks"]):
                    fire = Fire(
                        step=alert["last_step"], value=alert["value"], summary=alert["summary"], layer=alert["layer"]
                    )
                    alerts.append(_relayed_alert(alert["run"], alert["detector"], rank, fire, None))
        # seq 0: acknowledging it acknowledges nothing; at most `size` entries per batch, like any batch.
        return [pb.RelayBatch(seq=0, frames=frames[i : i + size]) for i in range(0, len(frames), size)] + [
            pb.RelayBatch(seq=0, alerts=alerts[i : i + size]) for i in range(0, len(alerts), size)
        ]

    def _repick(self, link: _Link) -> None:
        """Before `link` reconnects: move its runs whose replica changed (with their entries) to that link."""
        for run, held in list(self._run_link.items()):
            if held is not link:
                continue
            replica = self._router.pick(run)
            address = replica.address
            if address == link.address:
                continue
            target = self._link_for(replica)
            self._run_link[run] = target
            moved = [e for e in link.entries if e.run_id == run]
            link.entries = collections.deque(e for e in link.entries if e.run_id != run)
            link.sent_upto = 0  # a fresh connection re-sends from its first unacknowledged entry anyway
            target.entries.extend(moved)
            target.resync_needed = True
            log.info("relay: run %r moves from upstream %s to %s", run, link.address, address)


class _Link:
    """One upstream replica: its entries (oldest first), its thread and its current stream."""

    def __init__(self, relay: Relay, replica: Replica, number: int) -> None:
        self.relay = relay
        self.address = replica.address
        #: The name the aggregator's certificate must carry when the address came from a DNS expansion.
        self._server_name = replica.server_name
        self.entries: collections.deque[_Entry] = collections.deque()
        self.sent_upto = 0  # seq of the last entry written on the current stream
        self.connected = False
        self.resync_needed = False
        self.refusals: collections.Counter[str] = collections.Counter()
        self.last_error = ""
        self._max_batch = DEFAULT_BATCH_ENTRIES
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
                while ready and not self.resync_needed and self._unsent_count() < self._max_batch:
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
        batch = pb.RelayBatch()
        count = 0
        for entry in self.entries:
            if entry.seq <= self.sent_upto:
                continue
            if entry.incident is not None:  # megabytes: an incident travels alone
                if count:
                    break
                batch.incidents.append(entry.incident)
                batch.seq = self.sent_upto = entry.seq
                count = 1
                break
            if entry.frame is not None:
                batch.frames.append(entry.frame)
            if entry.alert is not None:
                batch.alerts.append(entry.alert)
            batch.seq = self.sent_upto = entry.seq
            count += 1
            if count >= self._max_batch:
                break
        if count == 0:
            return None
        for reason, value in self.relay.dropped.items():
            batch.dropped[reason] = value
        return batch


def _relayed_alert(
    run_id: str, detector: str, rank: int, verdict: Verdict, autopsy: dict[str, Any] | None
) -> pb.RelayedAlert:
    alert = pb.RelayedAlert(run_id=run_id, detector=detector, rank=rank, step=max(verdict.step, 0))
    if isinstance(verdict, Fire):
        alert.firing = True
        alert.summary = verdict.summary
        alert.layer = verdict.layer or ""
        if verdict.value is not None and math.isfinite(verdict.value):
            alert.value = verdict.value
        if autopsy:
            alert.autopsy_json = json.dumps(autopsy, default=str)
    return alert


class IncidentTap:
    """A relay's database as its flight recorder sees it: every stored incident is also forwarded upstream."""

    def __init__(self, database: Any, relay: Relay) -> None:
        self._database = database
        self._relay = relay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._database, name)

    def put_incident(self, incident: dict[str, Any], window: bytes) -> None:
        self._database.put_incident(incident, window)
        self._relay.incident(incident, window)


def verdict_of(alert: pb.RelayedAlert) -> tuple[Verdict, dict[str, Any] | None]:
    """The verdict (and autopsy) a RelayedAlert carries, for the aggregator's ingestor."""
    if not alert.firing:
        return Clear(step=alert.step), None
    value = alert.value if alert.HasField("value") else None
    autopsy = None
    if alert.autopsy_json:
        try:
            decoded = json.loads(alert.autopsy_json)
            autopsy = decoded if isinstance(decoded, dict) else None
        except ValueError:
            autopsy = None
    return Fire(step=alert.step, value=value, summary=alert.summary, layer=alert.layer or None), autopsy


class RelayCollector(Collector):
    """gradwatch_relay_* series of a relay: its buffer, what it sent and dropped, its upstream links."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        state = self._relay.state()
        buffered = GaugeMetricFamily(
            "gradwatch_relay_buffered_entries",
            "Records and alert transitions waiting for the aggregator's acknowledgement.",
        )
        buffered.add_metric([], state["buffered"])
        yield buffered
        sent = CounterMetricFamily("gradwatch_relay_forwarded_entries", "Entries the aggregator acknowledged.")
        sent.add_metric([], state["sent"])
        yield sent
        dropped = CounterMetricFamily(
            "gradwatch_relay_dropped_entries", "Entries dropped by the relay, by reason.", labels=["reason"]
        )
        dropped.add_metric([BUFFER_FULL], state["dropped"].get(BUFFER_FULL, 0))
        yield dropped
        up = GaugeMetricFamily(
            "gradwatch_relay_upstream_connected",
            "1 while the relay's stream to this aggregator replica is open.",
            labels=["upstream"],
        )
        for link in state["links"]:
            up.add_metric([link["upstream"]], 1.0 if link["connected"] else 0.0)
        yield up
