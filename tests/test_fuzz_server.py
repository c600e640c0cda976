"""Property-based fuzzing of a real server: generated wire frames (valid-shaped protobufs with extreme values,
coherent streams with hostile numbers, random bytes) and HTTP requests. Each case must get an answer from the
documented set (a gRPC status with a `gradwatch-reason`, or an HTTP status below 500), never an internal error;
after the batches the server still answers /healthz, a normal run still gets its alert within a second, and
the process's memory stayed within a bound. Examples are bounded for CI (a few seconds each); the longer,
coverage-guided run is scripts/fuzz_ingest.py (results in docs/security.md)."""

from __future__ import annotations

import os
import resource
import time
import urllib.error
import urllib.request

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_support import coherent_streams, http_requests, messages
from gradwatch.v1 import gradwatch_pb2 as pb
from hardening_support import NAN, reason_of
from server_support import AgentStream, hello_frame, report_frame, server_config, start_app

#: Every status the server may end a call with; UNKNOWN or INTERNAL would be an unhandled exception.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Examples per property: 50 in CI; GRADWATCH_FUZZ_EXAMPLES=N for a longer run.
FUZZ = settings(
    max_examples=int(os.environ.get("GRADWATCH_FUZZ_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
#: Growth of the test process's peak RSS over all batches (server and client share the process).
MEMORY_BOUND_BYTES = 512 << 20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(scope="module")
def app():
    app = start_app(server_config(max_runs=100, at_max_runs="evict_idle", hello_timeout_s=5.0))
    app.fuzz_rss_at_start = _peak_rss()  # type: ignore[attr-defined]
    app.fuzz_channel = grpc.insecure_channel(app.grpc_target)  # type: ignore[attr-defined]
    yield app
    app.fuzz_channel.close()  # type: ignore[attr-defined]
    app.stop(grace=0)


def _stream(app, raws: list[bytes]) -> tuple[grpc.StatusCode, str | None]:
    call = app.fuzz_channel.stream_stream("/gradwatch.v1.Ingest/Stream", request_serializer=None,
                                          response_deserializer=pb.ServerFrame.FromString)  # fmt: skip
    try:
        list(call(iter(raws), timeout=20))
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, None


def _flush(app, raw: bytes) -> tuple[grpc.StatusCode, str | None]:
    call = app.fuzz_channel.unary_unary("/gradwatch.v1.Ingest/Flush", request_serializer=None,
                                        response_deserializer=pb.FlushResponse.FromString)  # fmt: skip
    try:
        call(raw, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), reason_of(exc)  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, None


def _check(outcome: tuple[grpc.StatusCode, str | None]) -> None:
    code, reason = outcome
    assert code in ALLOWED, outcome
    assert code == grpc.StatusCode.OK or reason, f"{code} without a gradwatch-reason"


@FUZZ
@given(frames=st.lists(messages(pb.AgentFrame.DESCRIPTOR), min_size=1, max_size=4), valid_hello=st.booleans())
def test_fuzzed_frames_get_a_status_and_a_reason(app, frames, valid_hello) -> None:
    raws = [f.SerializeToString() for f in frames]
    if valid_hello:
        raws.insert(0, hello_frame(run="fuzz-generic").SerializeToString())
    _check(_stream(app, raws))


@FUZZ
@given(frames=coherent_streams())
def test_coherent_streams_with_hostile_numbers(app, frames) -> None:
    _check(_stream(app, [f.SerializeToString() for f in frames]))


@FUZZ
@given(request=messages(pb.FlushRequest.DESCRIPTOR), frames=coherent_streams(run="fuzz-flush"))
def test_fuzzed_flush_requests(app, request, frames) -> None:
    _check(_flush(app, request.SerializeToString()))
    coherent = pb.FlushRequest(hello=frames[0].hello, frames=frames[1:])
    _check(_flush(app, coherent.SerializeToString()))


@FUZZ
@given(raws=st.lists(st.binary(max_size=600), min_size=1, max_size=4))
def test_random_bytes(app, raws) -> None:
    _check(_stream(app, raws))
    _check(_flush(app, raws[0]))


@FUZZ
@given(request=http_requests())
def test_fuzzed_http_requests_never_get_a_server_error(app, request) -> None:
    method, path, body = request
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(app.http_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status = resp.status
            resp.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.read()
    # 501: a method the HTTP layer does not implement at all (HEAD, PATCH on the standard library server).
    assert status < 500 or (status == 501 and method in ("HEAD", "PATCH")), (method, path, body, status)


def test_after_the_batches_the_server_is_healthy_and_pages_promptly(app) -> None:
    """Runs after the fuzz batches above (file order): liveness, a normal run's alert, memory."""
    with urllib.request.urlopen(app.http_url + "/healthz", timeout=10) as resp:
        assert resp.status == 200
    stream = AgentStream(app.grpc_target)
    try:
        started = time.monotonic()
        stream.send(hello_frame(run="after-fuzz"))
        stream.send(report_frame(1, grad_norm=NAN))
        stream.recv_ack(1)
        assert time.monotonic() - started < 1.0
        assert app.alert_book.firing_alert("after-fuzz", "non_finite") is not None
    finally:
        stream.close()
    assert _peak_rss() - app.fuzz_rss_at_start < MEMORY_BOUND_BYTES
