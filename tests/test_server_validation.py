"""Every rejection: right status code, a reason string, counted in /metrics, other streams unaffected."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from gradwatch.server.app import ServerApp
from gradwatch.server.grpc_service import REASON_METADATA_KEY
from gradwatch.server.validate import REASONS
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import (
    AgentStream,
    columns,
    hello,
    hello_frame,
    metric,
    report_frame,
    run_stream,
    sample,
    scrape,
    start_app,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Healthy:
    stream: AgentStream
    seqs: Iterator[int]

    def still_works(self) -> None:
        seq = next(self.seqs)
        self.stream.send(report_frame(seq))
        self.stream.recv_ack(seq)


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app()
    yield app
    app.stop(grace=0)


@pytest.fixture(scope="module")
def healthy(app: ServerApp) -> Iterator[Healthy]:
    """A well-behaved agent stream open for the whole module."""
    stream = AgentStream(app.grpc_target)
    stream.send(hello_frame(run="healthy"))
    assert stream.recv().WhichOneof("body") == "welcome"
    yield Healthy(stream, itertools.count(1))
    stream.close()


def _bad_schema_hello() -> pb.AgentFrame:
    frame = hello_frame(run="bad-schema", layers=3)
    del frame.hello.schema.module_types[-1]
    return frame


def _dup_names_hello() -> pb.AgentFrame:
    frame = hello_frame(run="dup-names", layers=2)
    frame.hello.schema.names[1] = frame.hello.schema.names[0]
    return frame


CASES = {
    "report_before_hello": ([report_frame(1)], INVALID, "missing_hello", "first frame must be a Hello"),
    "second_hello": ([hello_frame(run="h2"), hello_frame(run="h2")], INVALID, "duplicate_hello", "second Hello"),
    "protocol_too_new": (
        [hello_frame(run="v2", version=2)],
        grpc.StatusCode.FAILED_PRECONDITION,
        "unsupported_protocol",
        "agent speaks protocol 2; this server accepts 1–1",
    ),
    "protocol_unspecified": (
        [hello_frame(run="v0", version=0)],
        grpc.StatusCode.FAILED_PRECONDITION,
        "unsupported_protocol",
        "accepts 1–1",
    ),
    "empty_run_id": ([hello_frame(run="")], INVALID, "invalid_run_id", "run_id is empty"),
    "rank_not_below_world_size": (
        [hello_frame(run="r", rank=2, world_size=2)],
        INVALID,
        "invalid_rank",
        "rank 2 is not below world_size 2",
    ),
    "empty_session": ([hello_frame(run="r", session="")], INVALID, "invalid_session_id", "session_id is empty"),
    "world_size_over_limit": (
        [hello_frame(run="big", world_size=1 << 20)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit_exceeded",
        "world_size 1048576 exceeds",
    ),
    "schema_lengths_mismatch": ([_bad_schema_hello()], INVALID, "invalid_schema", "3 names but 2 module_types"),
    "schema_names_repeat": ([_dup_names_hello()], INVALID, "invalid_schema", "not unique"),
    "layer_column_wrong_length": (
        [hello_frame(run="cols", layers=4), report_frame(1, layers=columns(3, grad_norm=1.0))],
        INVALID,
        "invalid_layer_stats",
        "grad_norm has 12 bytes; the schema's 4 layers need 16",
    ),
    "report_without_seq": ([hello_frame(run="s0"), report_frame(0, step=1)], INVALID, "invalid_seq", "seq 0"),
    "heartbeat_with_seq": (
        [hello_frame(run="hb"), pb.AgentFrame(seq=3, heartbeat=pb.Heartbeat())],
        INVALID,
        "invalid_seq",
        "heartbeat frames carry seq 0",
    ),
    "seq_backwards": (
        [hello_frame(run="back"), report_frame(5), report_frame(3, step=6)],
        INVALID,
        "non_monotonic",
        "seq 3 after seq 5",
    ),
    "step_backwards": (
        [hello_frame(run="stepback"), report_frame(1, step=9), report_frame(2, step=4)],
        INVALID,
        "non_monotonic",
        "step 4 after step 9",
    ),
    "empty_frame": ([hello_frame(run="empty"), pb.AgentFrame(seq=1)], INVALID, "empty_frame", "has no body"),
    "negative_sum_of_squares": (
        [hello_frame(run="neg"), report_frame(1, grad_sum_squares=-1.0)],
        INVALID,
        "invalid_report",
        "grad_sum_squares is negative",
    ),
    "detector_settings_unknown_setting": (
        [hello_frame(run="ds1", detector_settings={"exploding_gradient.fctor": "20"})],
        INVALID,
        "invalid_detector_settings",
        "detectors.exploding_gradient.fctor': unknown setting",
    ),
    "detector_settings_out_of_range": (
        [hello_frame(run="ds2", detector_settings={"exploding_gradient.factor": "0.5"})],
        INVALID,
        "invalid_detector_settings",
        "detectors.exploding_gradient.factor': must be > 1.0",
    ),
    "detector_settings_unknown_detector": (
        [hello_frame(run="ds3", detector_settings={"no_such.enabled": "false"})],
        INVALID,
        "invalid_detector_settings",
        "detectors.no_such': unknown detector",
    ),
    "detector_settings_too_many": (
        [hello_frame(run="ds4", detector_settings={f"non_finite.k{i}": "1" for i in range(65)})],
        INVALID,
        "invalid_detector_settings",
        "65 entries; the limit is 64",
    ),
    "first_non_finite_layer_out_of_range": (
        [hello_frame(run="fnl", layers=2), report_frame(1, first_non_finite_layer=2)],
        INVALID,
        "invalid_report",
        "first_non_finite_layer 2",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_rejects_with_code_reason_and_counter(app: ServerApp, healthy: Healthy, case: str) -> None:
    frames, code, reason, text = CASES[case]
    before = metric(scrape(app), "gradwatch_ingest_errors_total", reason=reason)

    with pytest.raises(grpc.RpcError) as info:
        run_stream(app.grpc_target, frames)

    assert info.value.code() == code
    assert text in info.value.details()
    assert (REASON_METADATA_KEY, reason) in tuple(info.value.trailing_metadata() or ())
    assert sample(scrape(app), "gradwatch_ingest_errors_total", reason=reason) == before + 1
    healthy.still_works()


def test_validation_unparseable_bytes_give_invalid_argument_not_internal(app: ServerApp, healthy: Healthy) -> None:
    before = metric(scrape(app), "gradwatch_ingest_errors_total", reason="malformed_frame")
    with grpc.insecure_channel(app.grpc_target) as channel:
        raw = channel.stream_stream("/gradwatch.v1.Ingest/Stream", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            list(raw(iter([b"\xff\xff\xff\xff\xff"]), timeout=10))
    assert info.value.code() == INVALID
    assert info.value.details().startswith("malformed AgentFrame: ")
    assert sample(scrape(app), "gradwatch_ingest_errors_total", reason="malformed_frame") == before + 1
    healthy.still_works()


def test_validation_unparseable_frame_after_hello_acks_what_was_applied(app: ServerApp) -> None:
    with grpc.insecure_channel(app.grpc_target) as channel:
        raw = channel.stream_stream(
            "/gradwatch.v1.Ingest/Stream", request_serializer=None, response_deserializer=pb.ServerFrame.FromString
        )
        requests = [hello_frame(run="partial").SerializeToString(), report_frame(1).SerializeToString(), b"\xff\xff"]
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for frame in raw(iter(requests), timeout=10):
                received.append(frame)
    assert info.value.code() == INVALID
    assert [f.ack.seq for f in received if f.WhichOneof("body") == "ack"][-1] == 1


def test_validation_oversized_frame_resource_exhausted_and_counted(app: ServerApp, healthy: Healthy) -> None:
    limit = app.config.limits.max_message_bytes
    big = pb.AgentFrame(seq=1, event=pb.Event(kind="x", message="y" * (limit + 1)))
    before = metric(scrape(app), "gradwatch_ingest_errors_total", reason="frame_too_large")

    with pytest.raises(grpc.RpcError) as info:
        run_stream(app.grpc_target, [hello_frame(run="huge"), big])

    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {limit} bytes" in info.value.details()
    assert sample(scrape(app), "gradwatch_ingest_errors_total", reason="frame_too_large") == before + 1
    healthy.still_works()


def test_validation_oversized_flush_request_rejected(app: ServerApp) -> None:
    from gradwatch.v1 import gradwatch_pb2_grpc as pbg

    limit = app.config.limits.max_message_bytes
    request = pb.FlushRequest(
        hello=hello(run="huge-flush"), frames=[pb.AgentFrame(seq=1, event=pb.Event(message="z" * limit))]
    )
    with grpc.insecure_channel(app.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pbg.IngestStub(channel).Flush(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_validation_error_counters_exist_at_zero_for_every_reason() -> None:
    app = start_app()
    try:
        text = scrape(app)
        for reason in REASONS:
            assert sample(text, "gradwatch_ingest_errors_total", reason=reason) == 0.0
    finally:
        app.stop(grace=0)
