"""gRPC plumbing for the sender: one open `Ingest.Stream`, and the one-shot `Ingest.Flush`.

Contract: everything here is called from the sender thread, except the two small loops gRPC's synchronous
API forces onto other threads: gRPC's own request thread pulls frames from `OpenStream.outbound` (None
half-closes the stream), and a reader thread per stream relays every ServerFrame, then how the stream ended,
into the sender's inbox as `Response` / `StreamEnded` tagged with the stream's generation, so that messages
from an abandoned stream can be told apart. Nothing here retries or decides; sender.py does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pb_grpc

__all__ = [
    "CHANNEL_OPTIONS", "FLUSH_MAX_BYTES", "ChannelFactory", "OpenStream", "Response", "StreamEnded", "flush",
    "insecure_channel",
]  # fmt: skip

ChannelFactory = Callable[[str], grpc.Channel]

# The server's default receive limit is 4 MiB: keep the one-shot Flush request comfortably below it.
FLUSH_MAX_BYTES = 3 * 1024 * 1024


#: Every agent channel has its own connection: gRPC otherwise shares one per target between the channels of a
#: process, with its reconnect backoff (up to 120 s), so a fresh channel to a server that just came back failed at
#: once while an older channel to it was still backing off (the final Flush after a server restart did). The
#: sender's own retry policy decides when to try again.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def insecure_channel(target: str) -> grpc.Channel:
    """The default channel: plaintext, no keepalive pings (servers reject frequent pings by default; the
    agent's heartbeats on the stream keep it alive), its own connection (CHANNEL_OPTIONS)."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


@dataclass(slots=True)
class Response:
    """A ServerFrame that arrived on stream `gen`."""

    gen: int
    frame: pb.ServerFrame


@dataclass(slots=True)
class StreamEnded:
    """Stream `gen` is over: `error` is the grpc.RpcError, or None when the server ended it cleanly."""

    gen: int
    error: BaseException | None


def _requests(outbound: queue.SimpleQueue[pb.AgentFrame | None]) -> Iterator[pb.AgentFrame]:
    """The request iterator gRPC consumes on its own thread; None half-closes the stream."""
    while (frame := outbound.get()) is not None:
        yield frame


def _relay(call: Any, inbox: queue.SimpleQueue[object], gen: int) -> None:
    """Reader thread body: forward every ServerFrame, then how the stream ended."""
    error: BaseException | None = None
    try:
        for frame in call:
            inbox.put(Response(gen, frame))
    except Exception as exc:  # grpc.RpcError normally; anything else the sender reports as a bug
        error = exc
    inbox.put(StreamEnded(gen, error))


@dataclass(slots=True)
class OpenStream:
    """One `Ingest.Stream` call: its own channel, the outbound queue and the reader thread."""

    gen: int
    channel: grpc.Channel
    call: Any
    outbound: queue.SimpleQueue[pb.AgentFrame | None]
    reader: threading.Thread

    @classmethod
    def open(
        cls,
        factory: ChannelFactory,
        target: str,
        hello: pb.AgentFrame,
        inbox: queue.SimpleQueue[object],
        gen: int,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> OpenStream:
        """Open a fresh channel and stream with `hello` queued first; returns at once (no network wait).
        `metadata` goes with the call (the bearer token)."""
        channel = factory(target)
        try:
            outbound: queue.SimpleQueue[pb.AgentFrame | None] = queue.SimpleQueue()
            outbound.put(hello)
            call = pb_grpc.IngestStub(channel).Stream(_requests(outbound), metadata=tuple(metadata) or None)
            reader = threading.Thread(target=_relay, args=(call, inbox, gen), name="gradwatch-reader", daemon=True)
            stream = cls(gen, channel, call, outbound, reader)
            reader.start()
        except BaseException:
            channel.close()
            raise
        return stream

    def send(self, frame: pb.AgentFrame) -> None:
        self.outbound.put(frame)

    def backlog(self) -> int:
        """Frames handed to gRPC's request thread and not yet taken by it."""
        return self.outbound.qsize()

    def half_close(self) -> None:
        """No more frames from us; the server ends the call when it is done."""
        self.outbound.put(None)

    def abort(self) -> None:
        """End the call now and release the channel (the reader thread then finishes on its own)."""
        self.outbound.put(None)  # lets gRPC's request thread return
        self.call.cancel()
        self.channel.close()


def flush(
    factory: ChannelFactory,
    target: str,
    hello: pb.Hello,
    frames: Iterable[pb.AgentFrame],
    timeout_s: float,
    metadata: Sequence[tuple[str, str]] = (),
) -> int:
    """One unary `Ingest.Flush` of `frames` (oldest first, as many as fit FLUSH_MAX_BYTES); returns the
    server's acked_seq. Raises grpc.RpcError on failure, after at most `timeout_s` seconds."""
    request = pb.FlushRequest(hello=hello)
    size = request.ByteSize()
    for frame in frames:
        size += frame.ByteSize() + 8  # field tag and length prefix, generously
        if size > FLUSH_MAX_BYTES:
            break
        request.frames.append(frame)
    channel = factory(target)
    try:
        stub = pb_grpc.IngestStub(channel)
        return int(stub.Flush(request, timeout=timeout_s, metadata=tuple(metadata) or None).acked_seq)
    finally:
        channel.close()
