"""Frames of every size around the limits, on a real server: gradwatch's limit (limits.max_message_bytes) and
gRPC core's own ceiling above it (2 × that + 1 MiB, server/config.py LimitsConfig.grpc_receive_bytes).

Up to the limit a frame is applied; above it, up to the ceiling, gradwatch refuses it with RESOURCE_EXHAUSTED,
the reason `frame_too_large` (trailer and counter) and a message naming the limit and its config key; above
the ceiling gRPC core refuses it from its length prefix (docs/security.md explains why the ceiling stays). In
every case what was acknowledged before stays applied and another stream on the same connection goes on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from gradwatch.server.grpc_service import REASON_METADATA_KEY
from gradwatch.server.validate import TOO_LARGE
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from server_support import (
    WAIT_S,
    AgentStream,
    hello,
    hello_frame,
    report_frame,
    sample,
    scrape,
    server_config,
    start_app,
)

LIMIT = 64 * 1024
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
_runs = itertools.count()


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app(server_config(max_message_bytes=LIMIT))
    yield app
    app.stop(grace=0)


def _welcome(stream: AgentStream) -> pb.Welcome:
    frame = stream.recv()
    assert isinstance(frame, pb.ServerFrame) and frame.WhichOneof("body") == "welcome", frame
    return frame.welcome


def _end(stream: AgentStream) -> Any:
    """Half-close `stream` and return what ended it: None (OK) or the grpc.RpcError."""
    stream.close()
    while isinstance(item := stream.recv(), pb.ServerFrame):
        pass
    return item


def _sized(make: Callable[[int], Any], size: int) -> Any | None:
    """make(k) for the k that makes its serialised size exactly `size` (None where no k does: a length
    prefix changes width there)."""
    k = max(0, size - make(0).ByteSize())
    for _ in range(4):
        message = make(k)
        miss = size - message.ByteSize()
        if miss == 0:
            return message
        k = max(0, k + miss)
    return None


def _event(seq: int, k: int) -> pb.AgentFrame:
    return pb.AgentFrame(seq=seq, event=pb.Event(kind="note", message="y" * k))


def _refused(app: ServerApp) -> float:
    return sample(scrape(app), "gradwatch_ingest_errors_total", reason=TOO_LARGE) or 0.0


def _expect(app: ServerApp, size: int, error: Any, refused_before: float) -> None:
    """The outcome for a frame (or Flush request) of `size` bytes: see the module docstring."""
    ceiling = app.config.limits.grpc_receive_bytes
    event("applied" if size <= LIMIT else "refused by gradwatch" if size <= ceiling else "refused by gRPC core")
    if size <= LIMIT:
        assert error is None, error
        assert _refused(app) == refused_before
        return
    assert isinstance(error, grpc.RpcError) and error.code() == EXHAUSTED, error
    if size <= ceiling:
        assert (REASON_METADATA_KEY, TOO_LARGE) in tuple(error.trailing_metadata() or ())
        assert f"limit of {LIMIT} bytes" in error.details() and "limits.max_message_bytes" in error.details()
        assert _refused(app) == refused_before + 1


def _around(x: int) -> st.SearchStrategy[int]:
    return st.integers(min_value=x - 3, max_value=x + 3)


CEILING = 2 * LIMIT + (1 << 20)
SIZES = st.one_of(
    _around(LIMIT),
    _around(CEILING),
    st.integers(min_value=1024, max_value=CEILING),
    st.integers(min_value=CEILING + 1, max_value=3 * CEILING),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=SIZES)
def test_frame_sizes_around_the_limits_on_a_stream(app: ServerApp, size: int) -> None:
    assert app.config.limits.grpc_receive_bytes == CEILING
    frame = _sized(lambda k: _event(2, k), size)
    if frame is None:
        return
    run = f"sized-{next(_runs)}"
    before = _refused(app)
    with grpc.insecure_channel(app.grpc_target) as channel:
        bystander = AgentStream(app.grpc_target, channel=channel)
        victim = AgentStream(app.grpc_target, channel=channel)
        bystander.send(hello_frame(run=f"{run}-other"))
        victim.send(hello_frame(run=run, session="v"))
        _welcome(bystander)
        _welcome(victim)
        victim.send(report_frame(1))
        victim.recv_ack(1)  # acknowledged before the sized frame

        victim.send(frame)
        error = _end(victim)

        bystander.send(report_frame(1))
        bystander.recv_ack(1)  # the connection and the other stream go on
        assert _end(bystander) is None
    _expect(app, size, error, before)
    again = AgentStream(app.grpc_target)
    again.send(hello_frame(run=run, session="v"))
    assert _welcome(again).acked_seq == (2 if size <= LIMIT else 1)  # nothing acknowledged was lost
    assert _end(again) is None


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=SIZES)
def test_flush_request_sizes_around_the_limits(app: ServerApp, size: int) -> None:
    run = f"flushed-{next(_runs)}"
    request = _sized(lambda k: pb.FlushRequest(hello=hello(run=run), frames=[report_frame(1), _event(2, k)]), size)
    if request is None:
        return
    before = _refused(app)
    with grpc.insecure_channel(app.grpc_target) as channel:
        bystander = AgentStream(app.grpc_target, channel=channel)
        bystander.send(hello_frame(run=f"{run}-other"))
        _welcome(bystander)
        try:
            response = pbg.IngestStub(channel).Flush(request, timeout=WAIT_S)
            error = None
        except grpc.RpcError as exc:
            error = exc
        bystander.send(report_frame(1))
        bystander.recv_ack(1)
        assert _end(bystander) is None
    _expect(app, size, error, before)
    if error is None:
        assert response.acked_seq == 2
