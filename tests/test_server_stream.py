"""Stream and Flush protocol against a real ServerApp: Welcome, cumulative acks, dedup, health, reflection."""

from __future__ import annotations

import dataclasses
import math
import queue
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gradwatch.server.app import ServerApp
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from server_support import (
    AgentStream,
    acks,
    hello,
    hello_frame,
    metric,
    report_frame,
    run_stream,
    sample,
    scrape,
    server_config,
    start_app,
)
from wait_support import wait_until


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app()
    yield app
    app.stop(grace=0)


def test_stream_welcome_then_cumulative_acks_when_reports_sent(app: ServerApp) -> None:
    frames = [hello_frame(run="flow"), *(report_frame(seq) for seq in range(1, 21))]
    responses = run_stream(app.grpc_target, frames)

    assert responses[0].WhichOneof("body") == "welcome"
    welcome = responses[0].welcome
    assert welcome.protocol_version == pb.PROTOCOL_VERSION_CURRENT
    assert welcome.acked_seq == 0
    assert welcome.server_version
    seqs = acks(responses)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # cumulative, rising
    assert seqs[-1] == 20
    [run] = [r for r in app.runs() if r["run"] == "flow"]
    assert run["step"] == 20 and run["ranks"][0]["reports"] == 20


def test_stream_acks_each_frame_promptly_when_sent_one_at_a_time(app: ServerApp) -> None:
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run="prompt"))
        assert stream.recv().WhichOneof("body") == "welcome"
        for seq in range(1, 6):
            sent = time.monotonic()
            stream.send(report_frame(seq))
            stream.recv_ack(seq)
            assert time.monotonic() - sent < 1.0  # the contract is ~100 ms; leave room for a loaded CI
    finally:
        stream.close()


def test_stream_reconnect_welcome_acked_seq_and_duplicates_dropped(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="replay"), *(report_frame(s) for s in range(1, 11))])
    before = metric(scrape(app), "gradwatch_ingest_duplicate_frames_total")

    # The agent reconnects with the same session and replays 6..15 (it never saw the acks for 6..10).
    responses = run_stream(app.grpc_target, [hello_frame(run="replay"), *(report_frame(s) for s in range(6, 16))])

    assert responses[0].welcome.acked_seq == 10
    assert acks(responses)[-1] == 15
    [run] = [r for r in app.runs() if r["run"] == "replay"]
    assert run["ranks"][0]["reports"] == 15  # 6..10 not applied twice
    assert sample(scrape(app), "gradwatch_ingest_duplicate_frames_total") == before + 5


@pytest.mark.parametrize("resent", [1, 3, 10])
def test_stream_resending_only_frames_already_applied_is_acknowledged_again(app: ServerApp, resent: int) -> None:
    """A client that ignores Welcome.acked_seq and resends frames the session already has (none of them new)
    gets an Ack covering them, on an open stream, without waiting for a new frame."""
    run = f"resent-{resent}"
    run_stream(app.grpc_target, [hello_frame(run=run), *(report_frame(s) for s in range(1, 11))])
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run=run))
        assert stream.recv().welcome.acked_seq == 10
        for seq in range(11 - resent, 11):
            stream.send(report_frame(seq))
        stream.recv_ack(10)  # fails (stream ended or no Ack in time) if a resend is not acknowledged
    finally:
        stream.close()
    [state] = [r for r in app.runs() if r["run"] == run]
    assert state["ranks"][0]["reports"] == 10  # nothing applied twice


def test_stream_new_session_same_rank_is_not_a_duplicate(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="restart", session="old"), *(report_frame(s) for s in (1, 2))])
    responses = run_stream(
        app.grpc_target, [hello_frame(run="restart", session="new"), *(report_frame(s) for s in (1, 2))]
    )
    assert responses[0].welcome.acked_seq == 0
    [run] = [r for r in app.runs() if r["run"] == "restart"]
    assert run["ranks"][0]["reports"] == 4


def test_stream_second_session_on_a_live_rank_is_refused_until_the_first_ends(app: ServerApp) -> None:
    first = AgentStream(app.grpc_target)
    try:
        first.send(hello_frame(run="shared-rank", session="first"))
        assert first.recv().WhichOneof("body") == "welcome"
        with pytest.raises(grpc.RpcError) as refused:
            run_stream(app.grpc_target, [hello_frame(run="shared-rank", session="second"), report_frame(1)])
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already streaming from another process" in refused.value.details()
        assert sample(scrape(app), "gradwatch_ingest_errors_total", reason="rank_in_use") >= 1
        # The same session reconnecting (a network blip) is let in.
        again = run_stream(app.grpc_target, [hello_frame(run="shared-rank", session="first"), report_frame(1)])
        assert acks(again)[-1] == 1
    finally:
        first.close()
    assert wait_until(lambda: not next(r for r in app.runs() if r["run"] == "shared-rank")["ranks"][0]["connected"])
    later = run_stream(app.grpc_target, [hello_frame(run="shared-rank", session="second"), report_frame(1)])
    assert acks(later)[-1] == 1
    [run] = [r for r in app.runs() if r["run"] == "shared-rank"]
    assert run["ranks"][0]["reports"] == 2  # one per session, never the refused stream's


def test_flush_applies_frames_and_returns_acked_seq(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="flush"), report_frame(1), report_frame(2)])
    request = pb.FlushRequest(hello=hello(run="flush"), frames=[report_frame(s) for s in (2, 3, 4)])
    with grpc.insecure_channel(app.grpc_target) as channel:
        response = pbg.IngestStub(channel).Flush(request, timeout=10)
    assert response.acked_seq == 4
    [run] = [r for r in app.runs() if r["run"] == "flush"]
    assert run["ranks"][0]["reports"] == 4


def test_flush_rejects_hello_inside_frames(app: ServerApp) -> None:
    request = pb.FlushRequest(hello=hello(run="flush-bad"), frames=[hello_frame(run="flush-bad")])
    with grpc.insecure_channel(app.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pbg.IngestStub(channel).Flush(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "second Hello" in info.value.details()


def test_stream_active_streams_gauge_counts_open_streams(app: ServerApp) -> None:
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run="gauge"))
        stream.recv()
        assert metric(scrape(app), "gradwatch_ingest_active_streams") >= 1
        [run] = [r for r in app.runs() if r["run"] == "gauge"]
        assert run["ranks"][0]["connected"] is True
    finally:
        stream.close()


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _goodbye() -> pb.AgentFrame:
    return pb.AgentFrame(goodbye=pb.Goodbye(final_step=1, reason="done"))


def test_finished_run_stays_in_metrics_and_firing_until_retention_expires() -> None:
    clock = FakeClock()
    config = dataclasses.replace(server_config(), finished_run_retention_s=60.0)
    app = start_app(config, clock=clock)
    try:
        run_stream(app.grpc_target, [hello_frame(run="bye", world_size=2), report_frame(1, loss=math.nan), _goodbye()])
        assert app.runs()[0]["state"] == "active"  # rank 1 has not said Goodbye
        frames = [hello_frame(run="bye", rank=1, world_size=2, session="r1"), report_frame(1), _goodbye()]
        run_stream(app.grpc_target, frames)
        [run] = app.runs()
        assert run["state"] == "finished" and run["finished_at"] == 1000.0

        clock.now += 59.0
        assert app.sweep() == []
        assert metric(scrape(app), "gradwatch_alert_firing", run="bye", detector="non_finite") == 1

        clock.now += 2.0
        assert app.sweep() == ["bye"]
        assert 'run="bye"' not in scrape(app)
        [alert] = app.alerts(run="bye")
        assert alert["state"] == "resolved" and "run finished" in alert["summary"]
        assert app.runs()[0]["state"] == "finished"  # still listed by the API until evicted
    finally:
        app.stop(grace=0)


def test_finished_run_with_zero_retention_leaves_metrics_at_goodbye() -> None:
    app = start_app(dataclasses.replace(server_config(), finished_run_retention_s=0.0))
    try:
        run_stream(app.grpc_target, [hello_frame(run="quick"), report_frame(1), _goodbye()])
        assert 'run="quick"' not in scrape(app)
        assert app.runs()[0]["state"] == "finished"
    finally:
        app.stop(grace=0)


def test_health_reports_serving_for_server_and_ingest(app: ServerApp) -> None:
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "gradwatch.v1.Ingest"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_ingest(app: ServerApp) -> None:
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="gradwatch.v1.Ingest"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert "gradwatch.v1.Ingest" in names and "grpc.health.v1.Health" in names
    assert described.WhichOneof("message_response") == "file_descriptor_response"
    assert any(b"AgentFrame" in fd for fd in described.file_descriptor_response.file_descriptor_proto)


def test_stream_event_frames_are_kept_in_the_run_view(app: ServerApp) -> None:
    event = pb.Event(kind="cadence_changed", step=3, wall_time=1.0, message="every step", attributes={"k": "v"})
    run_stream(app.grpc_target, [hello_frame(run="events"), pb.AgentFrame(seq=1, event=event)])
    [run] = [r for r in app.runs() if r["run"] == "events"]
    assert run["recent_events"] == [
        {"rank": 0, "kind": "cadence_changed", "step": 3, "wall_time": 1.0, "message": "every step",
         "attributes": {"k": "v"}}
    ]  # fmt: skip


def test_app_uses_injected_clock_for_report_and_alert_times() -> None:
    app = start_app(clock=lambda: 1234.5)
    try:
        run_stream(app.grpc_target, [hello_frame(run="clock"), report_frame(1, loss=float("nan"))])
        [alert] = app.alerts()
        assert alert["started_at"] == 1234.5
        assert app.runs()[0]["ranks"][0]["last_report_at"] == 1234.5
    finally:
        app.stop(grace=0)


def test_app_stop_ends_open_streams_after_grace_with_unavailable() -> None:
    app = start_app()
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run="shutdown"))
        assert stream.recv().WhichOneof("body") == "welcome"
        started = time.monotonic()
        app.stop(grace=0.5)
        assert time.monotonic() - started < 5.0
        ended = stream.recv()
        assert isinstance(ended, grpc.RpcError) and ended.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stream.close()
        app.stop(grace=0)


def test_acks_wait_for_the_timer_but_a_goodbye_is_acknowledged_at_once(
    app: ServerApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks are coalesced over ACK_DELAY_S; an agent closing waits for the Ack of everything before it half-closes,
    so the Goodbye's burst is acknowledged without waiting for the timer (here ten minutes)."""
    import gradwatch.server.grpc_service as grpc_service

    monkeypatch.setattr(grpc_service, "ACK_DELAY_S", 600.0)
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run="farewell"))
        assert stream.recv().WhichOneof("body") == "welcome"
        for seq in (1, 2, 3):
            stream.send(report_frame(seq))
        with pytest.raises(queue.Empty):  # applied, not yet acknowledged: the timer has ten minutes to go
            stream.recv(timeout=1.0)
        stream.send(pb.AgentFrame(goodbye=pb.Goodbye(final_step=3, reason="done")))
        stream.recv_ack(3, timeout=10.0)
    finally:
        stream.close()
