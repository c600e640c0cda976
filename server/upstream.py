"""The aggregator's side of the two tiers: the `Ingest.Relay` handler (ARCHITECTURE.md, "Two tiers").

Contract
--------
* At most `relay.max_relays` relay streams at once; one more is refused with RESOURCE_EXHAUSTED and reason
  `relay_limit_reached` (trailing metadata `gradwatch-reason`, counted like every rejection). A RelayHello
  with a protocol version outside the accepted range is refused like an agent's Hello.
* Every RelayedFrame is checked like an agent's frame (one StreamValidator per relayed session, the same
  limits) and applied through the same `Ingestor` as an agent's, in a session opened with `relayed=True`:
  the run's RankTable, the global gradient norm and every cross-rank detector see relayed ranks exactly as
  direct ones. A frame that fails its checks is counted by reason and dropped; the relay's other ranks go on.
  A frame of a session whose Hello never arrived is dropped and counted (`relay_unknown_session`).
* RelayedAlerts (a relay's per-rank verdicts) join or leave the run's alerts (`Ingestor.relayed_verdict`).
* RelayedIncidents (a relay's incidents, full per-layer windows) are stored as they are, marked with the relay's
  id, off the loop (a worker thread); one whose body lacks an incident's fields is dropped and counted
  (`relay_bad_incident`).
* A batch of finite columns only is kept up to COALESCE_S, so that each run's reports of every relay are applied
  as one batch (server/relay_coalesce.py); anything else flushes what is kept and is applied at once. Each batch
  is acknowledged by its `seq` once applied, followed by the Commands for the relay's ranks (one writer task per
  stream writes them in order).
* A relay stream silent for `relay.link_timeout_s` ends (`relay_link_timeout`): relays send a heartbeat
  batch every second, so only a vanished relay or a cut link is that quiet.
* When the stream ends, every rank it held *leaves* the run (`Ingestor.close(left=True)`): a relay that moved
  its runs to another replica, or whose link broke, leaves no rank behind to be called stalled or dead.
* A run every rank of which left with its relay, and none came back within `relay.handover_after_s`, moved
  to another replica: `sweep()` (every second) hands it over (`Ingestor.hand_over`: it expires here, its
  alerts end without a resolution being paged).
* `relays()` says which relay holds which ranks (`/api/v1/relays`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from gradwatch.server.auth import Grant, TokenSource, authorize
from gradwatch.server.config import LimitsConfig, RelayConfig
from gradwatch.server.ingest import Ingestor, Session
from gradwatch.server.relay import verdict_of
from gradwatch.server.relay_coalesce import COALESCE_S, Coalescer, batch_columns, finite
from gradwatch.server.relay_columns import Columns
from gradwatch.server.relay_link import DEFAULT_BATCH_ENTRIES
from gradwatch.server.relay_sessions import HeldSessions
from gradwatch.server.stats import IngestStats
from gradwatch.server.validate import (
    ACCEPTED_PROTOCOL_VERSIONS,
    MALFORMED,
    UNSUPPORTED_PROTOCOL,
    FrameRejected,
    StreamValidator,
)
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["RELAY_LIMIT_REACHED", "RELAY_UNKNOWN_SESSION", "RelayServicer", "RelayStream", "relays_route"]

log = logging.getLogger(__name__)

RELAY_LIMIT_REACHED = "relay_limit_reached"
RELAY_UNKNOWN_SESSION = "relay_unknown_session"
RELAY_LINK_TIMEOUT = "relay_link_timeout"
RELAY_BAD_INCIDENT = "relay_bad_incident"
#: Fields every stored incident has (server/database.py indexes them), with their types.
_INCIDENT_FIELDS = {"id": str, "run": str, "detector": str, "severity": str, "alert_id": str, "step": int,
                    "opened_at": float, "status": str}  # fmt: skip
REASON_METADATA_KEY = "gradwatch-reason"


@dataclass
class _Held:
    session: Session
    validator: StreamValidator
    #: Its row in the stream's HeldSessions while its reports may come as columns (-1: none).
    row: int = -1


@dataclass
class RelayStream:
    relay_id: str
    peer: str
    connected_at: float
    sessions: dict[tuple[str, int, str], _Held] = field(default_factory=dict)
    batches: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    #: The sessions RelayedColumns name by their RelayedFrame.ref, as arrays.
    table: HeldSessions = field(default_factory=HeldSessions)
    #: Replies (Acks, Commands) waiting for the stream's writer, in order; `wake` is set when one is added.
    outbox: collections.deque[pb.RelayReply] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class RelayServicer:
    """Async handler of Ingest.Relay over raw bytes (see the module docstring)."""

    def __init__(
        self,
        ingestor: Ingestor,
        stats: IngestStats,
        limits: LimitsConfig,
        relay: RelayConfig,
        server_version: str,
        *,
        tokens: TokenSource | None = None,
        clock: Callable[[], float] = time.time,
        store_incident: Callable[[dict[str, Any], bytes], None] | None = None,
    ) -> None:
        self._store_incident = store_incident
        self._ingestor = ingestor
        self._stats = stats
        self._limits = limits
        self._config = relay
        self._version = server_version
        self._tokens = tokens
        self._clock = clock
        self._ids = itertools.count(1)
        self._streams: dict[int, RelayStream] = {}
        self._coalescer = Coalescer(ingestor, stats, RELAY_UNKNOWN_SESSION, self._one_by_one)
        self._flusher: asyncio.Future[None] | None = None
        #: run -> when its last relayed rank left (candidates for a hand-over).
        self._left: dict[str, float] = {}

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Relay": grpc.stream_stream_rpc_method_handler(
                self.relay, request_deserializer=None, response_serializer=pb.RelayReply.SerializeToString
            )
        }

    def relays(self) -> list[dict[str, Any]]:
        """Every connected relay and the ranks it holds, by run."""
        out = []
        for stream in list(self._streams.values()):
            ranks: dict[str, list[int]] = {}
            for run, rank, _ in list(stream.sessions):
                ranks.setdefault(run, []).append(rank)
            out.append(
                {
                    "relay_id": stream.relay_id,
                    "peer": stream.peer,
                    "connected_at": stream.connected_at,
                    "batches": stream.batches,
                    "dropped": dict(stream.dropped),
                    "runs": {run: sorted(r) for run, r in sorted(ranks.items())},
                }
            )
        return out

    async def relay(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        del request_iterator  # read with context.read()
        if len(self._streams) >= self._config.max_relays:
            await self._reject(
                context,
                FrameRejected(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    RELAY_LIMIT_REACHED,
                    f"this aggregator already serves relay.max_relays={self._config.max_relays} relays; add an "
                    "aggregator replica or raise relay.max_relays",
                ),
            )
        grant = None
        if self._tokens is not None:
            try:
                grant = self._tokens.authenticate(context.invocation_metadata())
            except FrameRejected as exc:
                await self._reject(context, exc)
        hello = await self._read(context)
        if hello is None:
            return
        if hello.WhichOneof("body") != "hello":
            await self._reject(
                context,
                FrameRejected(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    MALFORMED,
                    "the first frame of a relay stream must be a RelayHello",
                ),
            )
        low, high = ACCEPTED_PROTOCOL_VERSIONS
        if not low <= hello.hello.protocol_version <= high:
            await self._reject(
                context,
                FrameRejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    UNSUPPORTED_PROTOCOL,
                    f"relay protocol_version {hello.hello.protocol_version} not in [{low}, {high}]",
                ),
            )
        key = next(self._ids)
        stream = self._streams[key] = RelayStream(hello.hello.relay_id[:256], context.peer(), self._clock())
        log.info("relay %r connected from %s", stream.relay_id, stream.peer)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_forever())
        writer = None
        try:
            await context.write(
                pb.RelayReply(
                    welcome=pb.RelayWelcome(
                        protocol_version=hello.hello.protocol_version,
                        server_version=self._version,
                        max_batch_entries=DEFAULT_BATCH_ENTRIES,
                        columns=True,
                    )
                )
            )
            writer = asyncio.ensure_future(self._write_forever(stream, context))
            while True:
                frame = await self._read(context)
                if frame is None:
                    return
                if frame.WhichOneof("body") != "batch":
                    continue
                for incident in frame.batch.incidents:
                    await self._incident(stream, incident)
                self.receive_batch(stream, frame.batch, grant)
        finally:
            if writer is not None:
                writer.cancel()
            self.flush()  # what the stream brought is applied before its ranks leave
            del self._streams[key]
            stream.table.push_all()
            for held in stream.sessions.values():
                self._ingestor.close(held.session, left=True)
            now = self._clock()
            for run_id in {run_id for run_id, _, _ in stream.sessions}:
                self._left.setdefault(run_id, now)
            log.info("relay %r disconnected (%d ranks leave their runs)", stream.relay_id, len(stream.sessions))

    async def _incident(self, stream: RelayStream, incident: pb.RelayedIncident) -> None:
        """Store a relay's incident (checked, marked with the relay) on a worker thread."""
        try:
            body = json.loads(incident.body_json)
        except ValueError:
            body = None
        if not _incident_ok(body):
            self._stats.rejected(RELAY_BAD_INCIDENT)
            return
        body["relay"] = stream.relay_id
        if self._store_incident is not None:
            await asyncio.to_thread(self._store_incident, body, incident.window)

    def sweep(self) -> list[str]:
        """Hand over the runs left by every relayed rank longer than relay.handover_after_s; returns them."""
        now = self._clock()
        due = [run for run, left in self._left.items() if now - left >= self._config.handover_after_s]
        handed = []
        for run_id in due:
            del self._left[run_id]
            if self._ingestor.hand_over(run_id):
                handed.append(run_id)
                log.info("run %r handed over: every rank left with its relay (it moved to another replica)", run_id)
        return handed

    def receive_batch(self, stream: RelayStream, batch: pb.RelayBatch, grant: Grant | None) -> None:
        """Apply one RelayBatch of `stream`, or keep its columns for the next flush (server/relay_coalesce.py) when
        the batch is columns only; its Ack and Commands go to the stream's outbox once it is applied."""
        columns = batch_columns(batch, self._stats) if not batch.frames and not batch.alerts else None
        if columns is not None and len(columns) and finite(columns):
            stream.batches += 1
            stream.dropped = dict(batch.dropped)
            self._coalescer.add(stream, columns, batch.seq)
            if self._coalescer.due():
                self.flush()
            return
        self.flush()  # kept columns first: every rank's reports in its relay's order
        self._reply(stream, batch.seq, self.apply_batch(stream, batch, grant))

    def flush(self) -> None:
        """Apply every relay's kept columns and acknowledge their batches (before ticks, sweeps, other frames)."""
        for stream, seq, commands in self._coalescer.flush():
            self._reply(stream, seq, commands)

    def _reply(self, stream: RelayStream, seq: int, commands: list[tuple[str, int, pb.Command]]) -> None:
        stream.outbox.append(pb.RelayReply(ack=pb.Ack(seq=seq)))
        stream.outbox.extend(pb.RelayReply(command=pb.RelayedCommand(run_id=run_id, rank=rank, command=command))
                             for run_id, rank, command in commands)  # fmt: skip
        stream.wake.set()

    async def _write_forever(self, stream: RelayStream, context: grpc.aio.ServicerContext) -> None:
        """The stream's only writer after its Welcome: replies in the order they were queued. A write that fails
        (the relay went away) ends it; the reader sees the stream end."""
        try:
            while True:
                while stream.outbox:
                    await context.write(stream.outbox.popleft())
                stream.wake.clear()
                await stream.wake.wait()
        except Exception as exc:  # grpc.aio's errors for a finished call vary by version
            log.debug("relay %r: reply not written: %s", stream.relay_id, exc)

    async def _flush_forever(self) -> None:
        """Flush kept columns once they are COALESCE_S old, while relays are connected."""
        while self._streams or len(self._coalescer):
            await asyncio.sleep(COALESCE_S / 4)
            if self._coalescer.due():
                self.flush()

    def apply_batch(
        self, stream: RelayStream, batch: pb.RelayBatch, grant: Grant | None
    ) -> list[tuple[str, int, pb.Command]]:
        """Apply one RelayBatch of `stream` in the relay's order (reports packed as columns go between the frames
        their positions say); returns the commands for the relay's ranks."""
        stream.batches += 1
        stream.dropped = dict(batch.dropped)
        commands: list[tuple[str, int, pb.Command]] = []
        columns = batch_columns(batch, self._stats)
        done = 0
        for index, relayed in enumerate(batch.frames):
            if columns is not None and done < len(columns) and columns.position[done] <= index:
                end = int(np.searchsorted(columns.position, index, side="right"))
                self._apply_columns(stream, columns.take(slice(done, end)), commands)
                done = end
            self._apply_frame(stream, relayed, grant, commands)
        if columns is not None and done < len(columns):
            self._apply_columns(stream, columns.take(slice(done, None)), commands)
        for alert in batch.alerts:
            verdict, autopsy = verdict_of(alert)
            for rank, command in self._ingestor.relayed_verdict(
                alert.run_id, alert.detector, alert.rank, verdict, autopsy
            ):
                commands.append((alert.run_id, rank, command))
        return commands

    def _apply_columns(self, stream: RelayStream, columns: Columns, commands: list[tuple[str, int, pb.Command]]
                       ) -> None:  # fmt: skip
        """Reports packed as columns, at once: per run as one batch (server/relay_coalesce.py, server/ingest_batch.py)
        when it can take them, else one at a time through the per-record path, with the same outcome."""
        commands += self._coalescer.apply([(stream, columns)])[id(stream)]

    def _one_by_one(self, stream: RelayStream, rows: np.ndarray, columns: Columns,
                    commands: list[tuple[str, int, pb.Command]]) -> None:  # fmt: skip
        for i, row in enumerate(rows.tolist()):
            hello = stream.table.held[row].session.hello
            self._apply_report(stream, (hello.run_id, hello.rank, hello.session_id), columns.frame(i), commands)

    def _apply_frame(self, stream: RelayStream, relayed: pb.RelayedFrame, grant: Grant | None,
                     commands: list[tuple[str, int, pb.Command]]) -> None:  # fmt: skip
        key = (relayed.run_id, relayed.rank, relayed.session_id)
        try:
            if relayed.HasField("hello"):
                self._open(stream, key, relayed.hello, grant)
                if relayed.ref and key in stream.sessions:
                    stream.table.bind(relayed.ref, stream.sessions[key])
            held = stream.sessions.get(key)
            if held is None:
                if relayed.HasField("frame") or relayed.closed:
                    self._stats.rejected(RELAY_UNKNOWN_SESSION)
                return
            if relayed.closed:
                if relayed.ref:
                    stream.table.unbind(relayed.ref)
                del stream.sessions[key]
                self._ingestor.close(held.session)
                return
        except FrameRejected as exc:
            self._stats.rejected(exc.reason)
            log.debug("relay %r: rank %d of %r: %s", stream.relay_id, relayed.rank, relayed.run_id, exc.message)
            return
        if relayed.HasField("frame"):
            self._apply_report(stream, key, relayed.frame, commands)

    def _apply_report(self, stream: RelayStream, key: tuple[str, int, str], frame: pb.AgentFrame,
                      commands: list[tuple[str, int, pb.Command]]) -> None:  # fmt: skip
        """One frame of a held session, through the same checks and Ingestor.apply as an agent's."""
        held = stream.sessions.get(key)
        if held is None:
            self._stats.rejected(RELAY_UNKNOWN_SESSION)
            return
        if held.row >= 0:
            stream.table.push(held.row)
        try:
            kind = held.validator.check(frame)
            if kind != "hello":
                found = self._ingestor.apply(held.session, frame, kind)
                commands.extend((key[0], key[1], c) for c in found)
        except FrameRejected as exc:
            self._stats.rejected(exc.reason)
            log.debug("relay %r: rank %d of %r: %s", stream.relay_id, key[1], key[0], exc.message)
        finally:
            if held.row >= 0:
                stream.table.pull(held.row)

    def _open(self, stream: RelayStream, key: tuple[str, int, str], hello: pb.Hello, grant: Grant | None) -> None:
        if key in stream.sessions:
            return  # a re-sent Hello of a rank this stream holds already
        for other in list(self._streams.values()):  # another stream's columns may be ahead of the rank's objects
            held = other.sessions.get(key)
            if held is not None and held.row >= 0:
                other.table.push(held.row)
        validator = StreamValidator(self._limits)
        validator.accept_hello(hello)
        if grant is not None:
            authorize(grant, hello.job_name, hello.run_id, self._ingestor.bound_job(hello.run_id))
        session = self._ingestor.open(hello, relayed=True)
        stream.sessions[key] = _Held(session, validator)

    async def _read(self, context: grpc.aio.ServicerContext) -> pb.RelayFrame | None:
        """The next frame; None at the end of the stream or after relay.link_timeout_s of silence."""
        try:
            raw = await asyncio.wait_for(context.read(), self._config.link_timeout_s)
        except TimeoutError:
            self._stats.rejected(RELAY_LINK_TIMEOUT)
            return None
        if raw is grpc.aio.EOF:
            return None
        try:
            return pb.RelayFrame.FromString(raw)
        except DecodeError:
            await self._reject(
                context, FrameRejected(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED, "a relay frame that does not parse")
            )
            return None

    async def _reject(self, context: grpc.aio.ServicerContext, exc: FrameRejected) -> None:
        self._stats.rejected(exc.reason)
        await context.abort(exc.code, exc.message, trailing_metadata=((REASON_METADATA_KEY, exc.reason),))


def _incident_ok(body: Any) -> bool:
    """Whether a relayed incident body has every field the database indexes, with its type."""
    if not isinstance(body, dict):
        return False
    for key, kind in _INCIDENT_FIELDS.items():
        value = body.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float if kind is float else kind):
            return False
    return True


def relays_route(servicer: RelayServicer | None, relay: Any) -> Callable[[str, dict[str, list[str]]], Any]:
    """GET /api/v1/relays: the relays connected to this aggregator and the ranks each holds; on a relay, its
    own upstream state (links, buffered entries, drops by reason)."""

    def route(path: str, query: dict[str, list[str]]) -> tuple[int, str, bytes] | None:
        del query
        if path != "/api/v1/relays":
            return None
        body = {
            "relays": servicer.relays() if servicer is not None else [],
            "upstream": relay.state() if relay is not None else None,
        }
        return 200, "application/json", json.dumps(body).encode()

    return route
