"""A relay's upstream (`gradwatch serve --upstream`): its ranks' compact records and per-rank verdicts, forwarded.

Contract (ARCHITECTURE.md, "Two tiers")
--------
* `Relay` is the relay ingestor's `Forwarder`: every Hello, applied frame, per-rank verdict and ended stream
  becomes one entry of a bounded buffer, on the ingest thread, in O(1) (a report is compacted: its per-layer
  and per-module columns stay on the relay). Nothing there waits on the network.
* Each run goes to the aggregator replica its id hashes to (`src/gradwatch/routing.py`, the agents' own choice, over
  `relay.upstream`: fixed entries or `dns:///` names), so every relay of a run reaches the same replica. One
  `Link` per replica in use (server/relay_link.py): a "gradwatch-relay-N" thread owns its channel and its
  stream (`Ingest.Relay`).
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
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gradwatch.routing import Replica, ReplicaRouter
from gradwatch.server.alerts import Alert
from gradwatch.server.detectors import Clear, Fire, Verdict
from gradwatch.server.relay_link import BUFFER_FULL, Entry, Link
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["IncidentTap", "Relay", "RelayCollector", "compact_frame"]

log = logging.getLogger(__name__)

_HEAVY_REPORT_FIELDS = ("layers", "activations", "input_mean", "input_std", "label_histogram")
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
        firing: Callable[[], list[Alert]] | None = None,
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
        self._links: dict[str, Link] = {}
        self._run_link: dict[str, Link] = {}
        #: (run, rank, session) -> the Hello of every rank streaming to this relay, re-sent after a reconnect.
        self._open: dict[tuple[str, int, str], pb.Hello] = {}
        #: (run, rank, session) -> its RelayedFrame.ref while open (columns name sessions by it); never reused.
        self._refs: dict[tuple[str, int, str], int] = {}
        self._next_ref = itertools.count(1)
        self.buffered = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self._stopping = False

    # ------------------------------------------------------------------ Forwarder (ingest thread)

    def opened(self, hello: pb.Hello, streaming: bool) -> None:
        key = (hello.run_id, hello.rank, hello.session_id)
        with self._lock:
            ref = self._refs.get(key, 0)
            if streaming:  # a Flush call's Hello is forwarded once, never re-sent
                self._open[key] = hello
                ref = ref or self._refs.setdefault(key, next(self._next_ref))
            self._add(
                hello.run_id,
                frame=pb.RelayedFrame(
                    run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, hello=hello, ref=ref
                ),
            )

    def applied(self, hello: pb.Hello, frame: pb.AgentFrame, kind: str) -> None:
        relayed = pb.RelayedFrame(
            run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, frame=compact_frame(frame, kind)
        )
        report = frame.report if kind == "report" else None
        urgent = report is not None and (report.non_finite != 0 or (report.has_loss and not math.isfinite(report.loss)))
        with self._lock:
            ref = self._refs.get((hello.run_id, hello.rank, hello.session_id), 0)
            self._add(hello.run_id, frame=relayed, ref=ref, urgent=urgent)

    def closed(self, hello: pb.Hello) -> None:
        with self._lock:
            self._open.pop((hello.run_id, hello.rank, hello.session_id), None)
            ref = self._refs.pop((hello.run_id, hello.rank, hello.session_id), 0)
            self._add(
                hello.run_id,
                frame=pb.RelayedFrame(
                    run_id=hello.run_id, rank=hello.rank, session_id=hello.session_id, closed=True, ref=ref
                ),
            )

    def verdict(self, run_id: str, detector: str, rank: int, verdict: Verdict, autopsy: dict[str, Any] | None) -> None:
        with self._lock:
            self._add(run_id, alert=_relayed_alert(run_id, detector, rank, verdict, autopsy), urgent=True)

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
             incident: pb.RelayedIncident | None = None, ref: int = 0, urgent: bool = False) -> None:  # fmt: skip
        link = self._run_link.get(run_id)
        if link is None:
            link = self._link_for(self._router.pick(run_id))
            self._run_link[run_id] = link
        # Full: drop this link's oldest entry, else (its backlog sits on another replica's link) one there.
        if self.buffered >= self._capacity and not any(other.drop_oldest() for other in (link, *self._links.values())):
            self.dropped[BUFFER_FULL] += 1
            return
        link.entries.append(Entry(next(self._seq), run_id, frame, alert, incident, ref, urgent))
        link.urgent |= urgent
        self.buffered += 1
        self._lock.notify_all()

    def _link_for(self, replica: Replica) -> Link:
        link = self._links.get(replica.address)
        if link is None:
            link = self._links[replica.address] = Link(self, replica, len(self._links))
            link.start()
        return link

    def _resync(self, link: Link, size: int) -> list[pb.RelayBatch]:
        """After `link` connected: its open ranks' Hellos and its runs' firing per-rank alerts, to send first."""
        runs = {run for run, held in self._run_link.items() if held is link}
        frames = [
            pb.RelayedFrame(
                run_id=run, rank=rank, session_id=session, hello=hello, ref=self._refs.get((run, rank, session), 0)
            )
            for (run, rank, session), hello in self._open.items()
            if run in runs
        ]
        alerts = []
        for alert in self._firing() if self._firing is not None else ():
            if alert.run in runs:
                for rank in alert.active or alert.ranks:
                    fire = Fire(step=alert.last_step, value=alert.value, summary=alert.summary, layer=alert.layer)
                    alerts.append(_relayed_alert(alert.run, alert.detector, rank, fire, None))
        # seq 0: acknowledging it acknowledges nothing; at most `size` entries per batch, like any batch.
        return [pb.RelayBatch(seq=0, frames=frames[i : i + size]) for i in range(0, len(frames), size)] + [
            pb.RelayBatch(seq=0, alerts=alerts[i : i + size]) for i in range(0, len(alerts), size)
        ]

    def _repick(self, link: Link) -> None:
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
