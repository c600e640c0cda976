"""The gradwatch.v1.Ingest service on grpc.aio, plus health and reflection.

Ingest handlers are registered by hand with raw-bytes deserialisation, so an
unparseable or oversized frame reaches gradwatch.server.validate and ends the
stream with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and our own reason, instead of
grpc's generic INTERNAL. Every rejection is counted by reason and also sent as
trailing metadata `gradwatch-reason`; other streams are unaffected.

Stream protocol (server side): read the Hello, reply Welcome(acked_seq, and the batch
limits: an AgentFrame.batch is unpacked into its reports and events, each checked and
applied as if sent alone); then apply frames in order, in bursts of the frames already
waiting (at most MAX_BURST_FRAMES), and acknowledge cumulatively: one Ack at most ACK_DELAY_S after the first
frame it covers was applied (a timer per stream; a resent frame the session already had is acknowledged again),
at once when Commands go out (they follow the Ack that covers their cause), when a Goodbye is applied (the agent
half-closes once everything is acknowledged: its close never waits for the timer), before a rejection and at the
end of the stream. A stream sending a report every few milliseconds thus costs one Ack write per ACK_DELAY_S, not
one per frame (the write was a fifth of the ingest CPU per report); at 0.5 s a rank reporting twice a second is
acknowledged about once a second (an Ack every frame at 50 ms: a sixth more server CPU per report end to end).

Limits (server/limits.py, docs/security.md): at most limits.max_streams streams at once; a stream whose
Hello has not arrived within limits.hello_timeout_s, or that sends nothing for limits.idle_stream_timeout_s,
ends with DEADLINE_EXCEEDED (`hello_timeout` / `idle_timeout`); each stream's reads follow a byte budget
(limits.stream_bytes_per_s), so a sender of large frames waits instead of starving the others; all Flush
calls together share one such budget (a call that would wait over MAX_FLUSH_WAIT_S is refused).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradwatch.server.auth import Grant, TokenSource, authorize
from gradwatch.server.config import LimitsConfig
from gradwatch.server.ingest import Ingestor, Session
from gradwatch.server.limits import ByteBudget
from gradwatch.server.stats import IngestStats
from gradwatch.server.validate import (
    FLUSH_BUDGET,
    HELLO_TIMEOUT,
    IDLE_TIMEOUT,
    MAX_BATCH_FRAMES,
    STREAM_LIMIT_REACHED,
    FrameRejected,
    StreamValidator,
    parse_agent_frame,
    parse_flush_request,
    unbatch,
)
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["INGEST_SERVICE", "REASON_METADATA_KEY", "IngestServicer", "build_grpc_server"]

log = logging.getLogger(__name__)

INGEST_SERVICE = pb.DESCRIPTOR.services_by_name["Ingest"].full_name  # "gradwatch.v1.Ingest"
REASON_METADATA_KEY = "gradwatch-reason"
#: Frames applied before an Ack is forced out during a long burst (bounds ack latency).
MAX_BURST_FRAMES = 256
#: Frames read ahead of processing per stream (backpressure beyond this).
READ_AHEAD_FRAMES = 512
#: Longest wait between applying a frame and acknowledging it (acks are coalesced over this window). The agent
#: keeps what is unacknowledged (bounded) and calls an Ack overdue after 10 s, so half a second costs it nothing.
ACK_DELAY_S = 0.5
#: Longest wait a Flush call is given for the Flush byte budget; beyond, it is refused.
MAX_FLUSH_WAIT_S = 5.0
#: Bytes of the Flush budget each frame of a Flush call is charged at least (its Hello counts as one).
FLUSH_FRAME_COST = 1024


@dataclass(frozen=True, slots=True)
class _Checked:
    """A stream's grant and the tokens-file generation it was checked against."""

    grant: Grant
    generation: int


class _ReadFailed:
    """Sentinel: the client side of the stream broke (cancelled, reset)."""


_ACK_DUE = object()  # queued by a stream's ack timer: its pending Ack is due


class IngestServicer:
    """Async handlers of gradwatch.v1.Ingest over raw bytes."""

    def __init__(
        self,
        ingestor: Ingestor,
        stats: IngestStats,
        limits: LimitsConfig,
        server_version: str,
        *,
        tokens: TokenSource | None = None,
        extra_methods: dict[str, grpc.RpcMethodHandler] | None = None,
    ) -> None:
        """`extra_methods`: more methods of the Ingest service (the aggregator's Relay, server/upstream.py)."""
        self._extra_methods = dict(extra_methods or {})
        self._ingestor = ingestor
        self._stats = stats
        self._limits = limits
        self._version = server_version
        #: Bearer-token grants (server/auth.py); None: every caller may write every run.
        self._tokens = tokens
        self._open_streams = 0
        #: One byte budget for all Flush calls together: a flood of them waits, and beyond MAX_FLUSH_WAIT_S is
        #: refused (`flush_budget_exceeded`), so Flush cannot starve the streams or pile up requests in memory.
        self._flush_budget = ByteBudget(limits, time.monotonic)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler for INGEST_SERVICE (requests stay bytes; responses are serialised)."""
        return grpc.method_handlers_generic_handler(INGEST_SERVICE, self.method_handlers())

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Stream": grpc.stream_stream_rpc_method_handler(
                self.stream, request_deserializer=None, response_serializer=pb.ServerFrame.SerializeToString
            ),
            "Flush": grpc.unary_unary_rpc_method_handler(
                self.flush, request_deserializer=None, response_serializer=pb.FlushResponse.SerializeToString
            ),
            **self._extra_methods,
        }

    async def stream(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        del request_iterator  # frames are read with context.read() by the reader task
        limits = self._limits
        if self._open_streams >= limits.max_streams:
            message = f"this server already serves limits.max_streams={limits.max_streams} streams; retry later"
            full = FrameRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, STREAM_LIMIT_REACHED, message)
            await self._reject(context, full)
        self._open_streams += 1
        self._stats.stream_opened()
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=READ_AHEAD_FRAMES)
        reader = asyncio.ensure_future(_read_all(context, queue, ByteBudget(limits, time.monotonic)))
        session: Session | None = None
        try:
            validator = StreamValidator(limits)
            try:
                grant = self._authenticate(context)
            except FrameRejected as exc:
                await self._reject(context, exc)
                return
            first = await _next(queue, limits.hello_timeout_s, HELLO_TIMEOUT, "no Hello")
            if isinstance(first, FrameRejected):
                await self._reject(context, first)
            if first is grpc.aio.EOF or isinstance(first, _ReadFailed):
                return
            try:
                frame = parse_agent_frame(first, self._limits)
                validator.check(frame)
                self._authorize(grant, frame.hello)
                session = self._ingestor.open(frame.hello)
            except FrameRejected as exc:
                await self._reject(context, exc)
                return
            await context.write(
                pb.ServerFrame(
                    welcome=pb.Welcome(
                        # The session speaks the agent's version (already checked to be in our range).
                        protocol_version=frame.hello.protocol_version,
                        server_version=self._version,
                        acked_seq=session.acked_seq,
                        max_batch_frames=MAX_BATCH_FRAMES,
                        max_frame_bytes=self._limits.max_message_bytes,
                    )
                )
            )
            await self._serve_frames(context, queue, validator, session, grant)
        finally:
            reader.cancel()
            if session is not None:
                self._ingestor.close(session)
            self._open_streams -= 1
            self._stats.stream_closed()

    async def _serve_frames(
        self,
        context: grpc.aio.ServicerContext,
        queue: asyncio.Queue[Any],
        validator: StreamValidator,
        session: Session,
        grant: _Checked | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        sent_ack = session.acked_seq
        #: A frame the session had already applied arrived (a client resending what the Welcome's acked_seq
        #: said it need not): it is acknowledged again, so a resend never waits for an Ack that would not come.
        repeated = False
        ack_due: float | None = None  # loop time by which the applied, unacknowledged frames must be acked
        done = False
        idle_s = self._limits.idle_stream_timeout_s
        while not done:
            head = queue.get_nowait() if not queue.empty() else await _next(queue, idle_s, IDLE_TIMEOUT, "no frame")
            if isinstance(head, FrameRejected):
                await self._reject(context, head)
            burst = [head]
            while len(burst) < MAX_BURST_FRAMES and not queue.empty():
                burst.append(queue.get_nowait())
            commands: list[pb.Command] = []
            rejected: FrameRejected | None = None
            farewell = False  # a Goodbye was applied: the agent waits for the Ack of everything to close
            if grant is not None and self._tokens is not None:
                self._tokens.book()  # notices a changed file (one stat per RELOAD_CHECK_INTERVAL_S at most)
                if grant.generation != self._tokens.generation:
                    try:  # the grants changed: the stream goes on only if its token still may write the run
                        grant = self._recheck(context, session.hello)
                    except FrameRejected as exc:
                        await self._reject(context, exc)
            for raw in burst:
                if raw is _ACK_DUE:
                    continue
                if raw is grpc.aio.EOF or isinstance(raw, _ReadFailed):
                    done = True
                    break
                try:
                    message = parse_agent_frame(raw, self._limits)
                    if message.WhichOneof("body") == "batch":
                        self._stats.frame("batch")  # its frames are counted by kind as they are applied
                    for frame in unbatch(message):
                        kind = validator.check(frame)
                        repeated = repeated or 0 < frame.seq <= sent_ack
                        commands.extend(self._ingestor.apply(session, frame, kind))
                        farewell = farewell or kind == "goodbye"
                except FrameRejected as exc:
                    rejected = exc
                    break
            if session.acked_seq > sent_ack or repeated:
                now = loop.time()
                if ack_due is None:  # the first frame this Ack covers: it goes out by ACK_DELAY_S from now
                    ack_due = now + ACK_DELAY_S
                    loop.call_at(ack_due, _nudge, queue)
                # (asyncio may run a timer up to its clock resolution early: a due Ack must not wait for a frame)
                if commands or rejected is not None or done or farewell or now >= ack_due - 0.001:
                    # Acknowledge what was applied, even just before a rejection: the agent drops it.
                    sent_ack, ack_due, repeated = session.acked_seq, None, False
                    await context.write(pb.ServerFrame(ack=pb.Ack(seq=sent_ack)))
            for command in commands:
                await context.write(pb.ServerFrame(command=command))
            if rejected is not None:
                await self._reject(context, rejected)

    async def flush(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.FlushResponse:
        try:
            grant = self._authenticate(context)
            request = parse_flush_request(raw, self._limits)
        except FrameRejected as exc:
            await self._reject(context, exc)
            raise AssertionError("unreachable: abort raises") from None
        # Applying a frame costs about as much however small it is: each is charged FLUSH_FRAME_COST at least.
        cost = max(len(raw), FLUSH_FRAME_COST * (1 + len(request.frames)))
        pause = self._flush_budget.spend(cost)
        if pause > MAX_FLUSH_WAIT_S:
            self._flush_budget.refund(cost)  # refused: it costs nothing
            message = (
                f"Flush calls exceed this server's byte budget ({self._limits.stream_bytes_per_s} B/s); retry later"
            )
            await self._reject(context, FrameRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, FLUSH_BUDGET, message))
        if pause > 0:
            await asyncio.sleep(pause)
        try:
            validator = StreamValidator(self._limits)
            validator.accept_hello(request.hello)
            self._authorize(grant, request.hello)
            session = self._ingestor.open(request.hello, streaming=False)
            for frame in (inner for outer in request.frames for inner in unbatch(outer)):
                kind = validator.check(frame)
                self._ingestor.apply(session, frame, kind)
            self._ingestor.flushed(session)
        except FrameRejected as exc:
            await self._reject(context, exc)
            raise AssertionError("unreachable: abort raises") from None
        return pb.FlushResponse(acked_seq=session.acked_seq)

    def _authenticate(self, context: grpc.aio.ServicerContext) -> _Checked | None:
        """The call's grant when tokens are configured (FrameRejected UNAUTHENTICATED without one)."""
        if self._tokens is None:
            return None
        grant = self._tokens.authenticate(context.invocation_metadata())
        return _Checked(grant, self._tokens.generation)

    def _authorize(self, checked: _Checked | None, hello: pb.Hello) -> None:
        """FrameRejected PERMISSION_DENIED unless the grant may write the Hello's run (see server/auth.py)."""
        if checked is not None:
            authorize(checked.grant, hello.job_name, hello.run_id, self._ingestor.bound_job(hello.run_id))

    def _recheck(self, context: grpc.aio.ServicerContext, hello: pb.Hello) -> _Checked:
        """The stream's grant under new grants (its run is bound to its job already)."""
        fresh = self._authenticate(context)
        assert fresh is not None
        authorize(fresh.grant, hello.job_name, hello.run_id, None)
        return fresh

    async def _reject(self, context: grpc.aio.ServicerContext, exc: FrameRejected) -> None:
        """Count the rejection and end the RPC with its status (raises grpc's AbortError)."""
        self._stats.rejected(exc.reason)
        log.debug("rejected %s: %s", exc.reason, exc.message)
        await context.abort(exc.code, exc.message, trailing_metadata=((REASON_METADATA_KEY, exc.reason),))


def _nudge(queue: asyncio.Queue[Any]) -> None:
    """Wake the stream's handler for a due Ack (a full queue wakes it anyway)."""
    if not queue.full():
        queue.put_nowait(_ACK_DUE)


async def _next(queue: asyncio.Queue[Any], timeout_s: float, reason: str, what: str) -> Any:
    """The next item of `queue`, or a FrameRejected DEADLINE_EXCEEDED `reason` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            return await queue.get()
    except TimeoutError:
        return FrameRejected(grpc.StatusCode.DEADLINE_EXCEEDED, reason, f"{what} for {timeout_s:g} s: stream closed")


async def _read_all(context: grpc.aio.ServicerContext, queue: asyncio.Queue[Any], budget: ByteBudget) -> None:
    """Move raw frames from the RPC into `queue`, ending with EOF or a _ReadFailed. Over the stream's byte
    budget, the next read waits (HTTP/2 flow control then holds the sender back)."""
    try:
        while True:
            raw = await context.read()
            await queue.put(raw)
            if raw is grpc.aio.EOF:
                return
            pause = budget.spend(len(raw))
            if pause > 0:
                await asyncio.sleep(pause)
    except asyncio.CancelledError:
        raise
    except Exception:  # the peer went away mid-read; the handler ends the stream
        await queue.put(_ReadFailed())


def build_grpc_server(
    servicer: IngestServicer, limits: LimitsConfig
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with Ingest, health (SERVING) and reflection. Call from the server's loop."""
    options = [
        ("grpc.max_receive_message_length", limits.grpc_receive_bytes),
        ("grpc.max_send_message_length", limits.grpc_receive_bytes),
        # Without this, Linux lets a second server bind the same port and share its traffic.
        ("grpc.so_reuseport", 0),
        # Agents may keep their stream alive with pings every 30 s or more.
        ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((servicer.handler(),))
    # Registered methods take grpc's faster dispatch path, as generated code does.
    server.add_registered_method_handlers(INGEST_SERVICE, servicer.method_handlers())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (INGEST_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    return server, health_servicer
