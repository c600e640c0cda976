"""Test support for the agent: a scriptable Ingest peer on a real gRPC server, and a small real model.

`ScriptableIngest` is a real `gradwatch.v1.Ingest` servicer whose behaviour a test scripts: it records every
frame, acknowledges (or withholds acks), rejects streams with a status, sends commands, and can be stopped
and restarted on the same port (`ScriptableServer`). It deduplicates numbered frames by
(run, rank, session, seq) like the real server does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from torch import nn

from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pb_grpc
from wait_support import wait_until  # noqa: F401  (re-exported: agent tests import it from here)

SessionKey = tuple[str, int, str]  # run_id, rank, session_id


@dataclass
class _Session:
    hello: pb.Hello
    frames: dict[int, pb.AgentFrame] = field(default_factory=dict)  # seq -> first copy received
    acked_seq: int = 0


class ScriptableIngest(pb_grpc.IngestServicer):
    """An Ingest peer whose behaviour tests set through plain attributes (see the module docstring)."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.sessions: dict[SessionKey, _Session] = {}
        self.stream_frames: list[pb.AgentFrame] = []  # every frame from every stream, duplicates included
        self.flush_requests: list[pb.FlushRequest] = []
        self.streams_opened = 0
        self.streams_ended = 0
        self.acking = True  # False: withhold Acks (Welcome still reports what was acked before)
        self.reject_streams_with: grpc.StatusCode | None = None  # abort every Stream with this status
        self.reject_flush_with: grpc.StatusCode | None = None
        self.welcome_gate = threading.Event()  # clear it to hold Welcome back (a slow server)
        self.welcome_gate.set()
        self._outboxes: list[queue.SimpleQueue[pb.ServerFrame | None]] = []

    # ------------------------------------------------------------------ scripting and inspection

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def send_command(self, steps: int, reason: str = "test") -> None:
        command = pb.ServerFrame(command=pb.Command(kind=pb.COMMAND_KIND_FULL_STATS, steps=steps, reason=reason))
        with self.changed:
            for outbox in self._outboxes:
                outbox.put(command)

    def ack_all(self) -> None:
        """Acknowledge everything held (after a period of withheld acks)."""
        with self.changed:
            for session in self.sessions.values():
                session.acked_seq = max(session.frames, default=0)
            top = max((s.acked_seq for s in self.sessions.values()), default=0)
            for outbox in self._outboxes:
                outbox.put(pb.ServerFrame(ack=pb.Ack(seq=top)))

    def frames(self, session: str | None = None) -> list[pb.AgentFrame]:
        """Distinct numbered frames held, in sequence order (one session, or the only one)."""
        with self.changed:
            sessions = [s for k, s in self.sessions.items() if session is None or k[2] == session]
            assert len(sessions) <= 1, "several sessions: name one"
            return [f for _, f in sorted(sessions[0].frames.items())] if sessions else []

    def reports(self, session: str | None = None) -> list[pb.StepReport]:
        return [f.report for f in self.frames(session) if f.WhichOneof("body") == "report"]

    def of_kind(self, kind: str) -> list[pb.AgentFrame]:
        with self.changed:
            return [f for f in self.stream_frames if f.WhichOneof("body") == kind]

    # ------------------------------------------------------------------ the service

    def Stream(
        self, request_iterator: Iterator[pb.AgentFrame], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerFrame]:
        if self.reject_streams_with is not None:
            context.abort(self.reject_streams_with, "scripted rejection")
        first = next(request_iterator)
        if first.WhichOneof("body") != "hello":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first frame must be a Hello")
        outbox: queue.SimpleQueue[pb.ServerFrame | None] = queue.SimpleQueue()
        context.add_callback(lambda: outbox.put(None))  # RPC over (cancelled, server stopped): stop yielding
        with self.changed:
            self.streams_opened += 1
            self.stream_frames.append(first)
            session = self._session(first.hello)
            self._outboxes.append(outbox)
            self.changed.notify_all()
        reader = threading.Thread(
            target=self._read, args=(request_iterator, session, outbox), name="scriptable-ingest-reader", daemon=True
        )
        reader.start()
        try:
            while not self.welcome_gate.wait(0.05):
                if not context.is_active():
                    return
            yield pb.ServerFrame(
                welcome=pb.Welcome(protocol_version=1, server_version="test", acked_seq=session.acked_seq)
            )
            while (frame := outbox.get()) is not None:
                yield frame
        finally:
            with self.changed:
                self._outboxes.remove(outbox)
                self.streams_ended += 1
                self.changed.notify_all()

    def Flush(self, request: pb.FlushRequest, context: grpc.ServicerContext) -> pb.FlushResponse:
        if self.reject_flush_with is not None:
            context.abort(self.reject_flush_with, "scripted rejection")
        with self.changed:
            self.flush_requests.append(request)
            session = self._session(request.hello)
            for frame in request.frames:
                session.frames.setdefault(frame.seq, frame)
            session.acked_seq = max(session.frames, default=0)
            self.changed.notify_all()
            return pb.FlushResponse(acked_seq=session.acked_seq)

    def _read(
        self,
        requests: Iterator[pb.AgentFrame],
        session: _Session,
        outbox: queue.SimpleQueue[pb.ServerFrame | None],
    ) -> None:
        try:
            for frame in requests:
                with self.changed:
                    self.stream_frames.append(frame)
                    if frame.seq:
                        session.frames.setdefault(frame.seq, frame)
                        if self.acking:
                            session.acked_seq = max(session.acked_seq, frame.seq)
                            outbox.put(pb.ServerFrame(ack=pb.Ack(seq=session.acked_seq)))
                    self.changed.notify_all()
        except grpc.RpcError:
            pass  # the client went away
        outbox.put(None)  # requests done (half-close or failure): end the call with OK

    def _session(self, hello: pb.Hello) -> _Session:
        key = (hello.run_id, hello.rank, hello.session_id)
        if key not in self.sessions:
            self.sessions[key] = _Session(hello)
        return self.sessions[key]


class ScriptableServer:
    """A real gRPC server around a ScriptableIngest on 127.0.0.1, port chosen by the OS, restartable."""

    def __init__(self, servicer: ScriptableIngest | None = None, port: int = 0) -> None:
        self.servicer = servicer or ScriptableIngest()
        self.port = port
        self._server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ScriptableServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="scriptable-ingest"))
        pb_grpc.add_IngestServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert self.port, "could not bind"
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> ScriptableServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def agent_side_threads() -> set[threading.Thread]:
    """Live threads that do not belong to a ScriptableServer (the agent's, gRPC client's, the test's)."""
    return {t for t in threading.enumerate() if not t.name.startswith("scriptable-ingest")}


# ---------------------------------------------------------------------- a small real model


def make_mlp(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def batch(step: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    monitor: object,
    steps: int,
    *,
    nan_at: int | None = None,
    set_grads_to_none_before_monitor_step: bool = False,
    before_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Plain training loop; `nan_at` (1-based step) poisons that step's input; `before_step(step)` runs
    before each forward (to inject a fault). Returns host-side losses (read after monitor.step(), outside
    the agent, so the agent's own hot path stays sync-free)."""
    losses: list[torch.Tensor] = []
    for step in range(1, steps + 1):
        if before_step is not None:
            before_step(step)
        x, y = batch(step)
        if step == nan_at:
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(model(x), y)
        if optimizer is not None:
            optimizer.zero_grad()
        else:
            model.zero_grad()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            if set_grads_to_none_before_monitor_step:
                optimizer.zero_grad(set_to_none=True)
        monitor.step(loss)  # type: ignore[attr-defined]
        losses.append(loss.detach())
    return [float(loss) for loss in losses]


class Emitter(nn.Linear):
    """A square Linear whose own forward can put a non-finite value into its output (`poison`, at [0, 1]), so the
    module itself emits it: what the NaN provenance tests inject."""

    def __init__(self, width: int) -> None:
        super().__init__(width, width)
        self.poison: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.poison is not None:
            out = out.clone()
            out[0, 1] = self.poison
        return out
