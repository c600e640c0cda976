"""Out-of-range values, oversized maps and slow or silent clients get a status, a reason and a counter;
one stream cannot starve the others (issue: hardening, items 6, 7 (gRPC) and 8). Real servers throughout."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest

from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from hardening_support import NAN, reason_of, stream_outcome
from server_support import (
    AgentStream,
    columns,
    hello,
    hello_frame,
    metric,
    report_frame,
    sample,
    scrape,
    server_config,
    start_app,
)
from wait_support import wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
U64_MAX = (1 << 64) - 1


@pytest.fixture(scope="module")
def app():
    app = start_app()
    yield app
    app.stop(grace=0)


# ---------------------------------------------------------------------- item 8: integers and JSON


@pytest.mark.parametrize("step", [1 << 63, U64_MAX])
def test_a_step_beyond_int64_is_refused_and_the_run_advances_after(app, step: int) -> None:
    run = f"big-step-{step}"
    code, reason, details = stream_outcome(app.grpc_target, [hello_frame(run=run), report_frame(1, step=step)])
    assert (code, reason) == (INVALID, "out_of_range"), details
    assert "2^63 - 1" in details
    frames = [hello_frame(run=run, session="s-2"), report_frame(1, step=5), report_frame(2, step=6)]
    assert stream_outcome(app.grpc_target, frames)[0] == grpc.StatusCode.OK
    (view,) = [r for r in app.runs() if r["run"] == run]
    assert view["ranks"][0]["step"] == 6


@pytest.mark.parametrize(
    "frame",
    [
        pb.AgentFrame(seq=1 << 63, event=pb.Event(kind="x", step=1)),
        pb.AgentFrame(seq=1, event=pb.Event(kind="x", step=U64_MAX)),
        pb.AgentFrame(heartbeat=pb.Heartbeat(step=U64_MAX)),
        pb.AgentFrame(heartbeat=pb.Heartbeat(dropped={"queue_full": U64_MAX})),
        pb.AgentFrame(goodbye=pb.Goodbye(final_step=1 << 63)),
        pb.AgentFrame(seq=1, report=pb.StepReport(step=1, optimizer_step=U64_MAX)),
    ],
    ids=["seq", "event_step", "heartbeat_step", "dropped_count", "final_step", "optimizer_step"],
)
def test_every_uint64_field_beyond_int64_is_refused(app, frame: pb.AgentFrame) -> None:
    code, reason, details = stream_outcome(app.grpc_target, [hello_frame(run="u64"), frame])
    assert (code, reason) == (INVALID, "out_of_range"), details


def test_param_counts_beyond_int64_are_refused_and_leave_no_ghost_rank(app) -> None:
    frame = hello_frame(run="ghost", layers=2)
    frame.hello.schema.local_param_counts.extend([U64_MAX, 1])
    before = metric(scrape(app), "gradwatch_ingest_errors_total", reason="out_of_range")
    for _ in range(5):
        code, reason, _ = stream_outcome(app.grpc_target, [frame])
        assert (code, reason) == (INVALID, "out_of_range")
    text = scrape(app)
    assert metric(text, "gradwatch_ingest_errors_total", reason="out_of_range") == before + 5
    assert not sample(text, "gradwatch_run_ranks_connected", run="ghost")


def _request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


QUERIES = [f"offset={1 << 63}", f"offset={U64_MAX}", "limit=0", "offset=-1", "limit=x", f"limit={1 << 70}"]


@pytest.mark.parametrize(
    ("path", "query"),
    [(path, q) for path in ("incidents", "runs", "alerts") for q in QUERIES]
    + [("incidents", "since=nan"), ("incidents", "since=1e999"), ("runs/x/series", f"last={1 << 64}")],
)
def test_out_of_range_query_values_answer_400_and_are_counted(app, path: str, query: str) -> None:
    before = metric(scrape(app), "gradwatch_http_rejected_total", reason="bad_query")
    status, body = _request(f"{app.http_url}/api/v1/{path}?{query}")
    assert status == 400, body
    assert b"error" in body
    assert metric(scrape(app), "gradwatch_http_rejected_total", reason="bad_query") == before + 1


@pytest.mark.parametrize("body", [b"[" * 60_000, b"{" * 20 + b"}" * 20, b'{"run": ' + b"[" * 17 + b"]" * 17 + b"}"])
def test_deeply_nested_json_answers_400_and_is_counted(app, body: bytes) -> None:
    before = metric(scrape(app), "gradwatch_http_rejected_total", reason="bad_body")
    status, answer = _request(app.http_url + "/api/v1/silences", "POST", body)
    assert status == 400 and b"nests deeper" in answer
    assert metric(scrape(app), "gradwatch_http_rejected_total", reason="bad_body") == before + 1
    assert _request(app.http_url + "/healthz")[0] == 200


# ---------------------------------------------------------------------- item 6: fairness and repeated fields


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (pb.AgentFrame(heartbeat=pb.Heartbeat(dropped={f"r{i}": 1 for i in range(200_000)})), "frame_too_large"),
        (pb.AgentFrame(heartbeat=pb.Heartbeat(dropped={f"r{i}": 1 for i in range(5000)})), "too_many_entries"),
        (pb.AgentFrame(seq=1, event=pb.Event(attributes={f"a{i}": "v" for i in range(5000)})), "too_many_entries"),
        (pb.AgentFrame(seq=1, report=pb.StepReport(step=1, learning_rates=[0.1] * 5000)), "too_many_entries"),
        (pb.AgentFrame(seq=1, report=pb.StepReport(step=1, label_histogram=b"\0" * 4 * 5000)), "too_many_entries"),
    ],
    ids=["200k_drop_reasons", "5k_drop_reasons", "event_attributes", "learning_rates", "label_histogram"],
)
def test_every_repeated_field_is_bounded(app, frame: pb.AgentFrame, reason: str) -> None:
    code, got, details = stream_outcome(app.grpc_target, [hello_frame(run="maps"), frame])
    assert got == reason, details
    assert code in (INVALID, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _raw_stream(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """Ingest/Stream taking frames already serialised (so the test's own threads spend little CPU)."""
    return channel.stream_stream("/gradwatch.v1.Ingest/Stream", request_serializer=None,
                                 response_deserializer=pb.ServerFrame.FromString)  # fmt: skip


def _flood(target: str, stop: threading.Event, frame: pb.AgentFrame, run: str) -> None:
    """Send `frame` as fast as the server takes it: its body bytes after a fresh seq and step each time."""
    body = frame.report.layers.SerializeToString()
    first = hello_frame(run=run, layers=len(frame.report.layers.grad_norm) // 4).SerializeToString()

    def frames():
        yield first
        seq = 0
        while not stop.is_set():
            seq += 1
            report = pb.StepReport(step=seq, wall_time=1.0, loss=0.5, has_loss=True, grad_sum_squares=1.0)
            yield _with_layers(seq, report, body)

    with grpc.insecure_channel(target) as channel, contextlib.suppress(grpc.RpcError):
        for _ in _raw_stream(channel)(frames(), timeout=60):
            pass


def _with_layers(seq: int, report: pb.StepReport, layers: bytes) -> bytes:
    """A serialised AgentFrame whose report carries `layers` (already serialised LayerStats), built by
    concatenation: field 12 of StepReport, field 3 (report) of AgentFrame."""
    inner = report.SerializeToString() + _field(12, layers)
    return pb.AgentFrame(seq=seq).SerializeToString() + _field(_REPORT_FIELD, inner)


_REPORT_FIELD = pb.AgentFrame.DESCRIPTOR.fields_by_name["report"].number


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _heartbeat_flood(target: str, stop: threading.Event) -> None:
    """New streams, each a Hello and a heartbeat naming 200,000 drop reasons (~3 MB), back to back."""
    beat = pb.AgentFrame(heartbeat=pb.Heartbeat(dropped={f"reason_{i}": 1 for i in range(200_000)}))
    raw = beat.SerializeToString()
    i = 0
    with grpc.insecure_channel(target) as channel:
        while not stop.is_set():
            i += 1
            first = hello_frame(run="beats", session=f"b{i}").SerializeToString()
            with contextlib.suppress(grpc.RpcError):
                list(_raw_stream(channel)(iter([first, raw, raw]), timeout=30))


def test_floods_of_large_valid_frames_do_not_starve_another_runs_alert() -> None:
    """One stream of ~3 MiB valid reports and streams of 3 MB heartbeats run flat out; every new run's NaN
    still pages within a second."""
    app = start_app(server_config(max_layer_series_per_run=16))
    stop = threading.Event()
    n = 48_000
    big = report_frame(1, layers=columns(n, grad_norm=np.ones(n), grad_max_abs=1.0, grad_mean=0.0,
                                          weight_norm=1.0, weight_max_abs=1.0, weight_mean=0.0,
                                          grad_zero_fraction=0.0, weight_zero_fraction=0.0, grad_non_finite=0.0,
                                          weight_non_finite=0.0, grad_min=0.0, grad_max=1.0, weight_min=0.0,
                                          weight_max=1.0, update_ratio=0.0))  # fmt: skip
    assert 2 << 20 < big.ByteSize() < app.config.limits.max_message_bytes
    floods = [threading.Thread(target=_flood, args=(app.grpc_target, stop, big, "flood"), daemon=True)]
    floods += [threading.Thread(target=_heartbeat_flood, args=(app.grpc_target, stop), daemon=True) for _ in range(2)]
    try:
        for flood in floods:
            flood.start()
        # Past the flooder's initial burst (2 × max_message_bytes, under 3 of its reports): the steady state.
        wait_until(lambda: (sample(scrape(app), "gradwatch_ingest_frames_total", kind="report") or 0) >= 4,
                   timeout=30, what="the flood to be applied")  # fmt: skip
        latencies = []
        for i in range(5):
            stream = AgentStream(app.grpc_target)
            started = time.monotonic()
            stream.send(hello_frame(run=f"victim-{i}"))
            stream.send(report_frame(1, grad_norm=NAN))
            stream.recv_ack(1)
            latencies.append(time.monotonic() - started)
            assert app.alert_book.firing_alert(f"victim-{i}", "non_finite") is not None
            stream.close()
        assert max(latencies) < 1.0, latencies
        assert metric(scrape(app), "gradwatch_ingest_frames_total", kind="report") > 3
    finally:
        stop.set()
        for flood in floods:
            flood.join(30)
        app.stop(grace=0)


def test_a_flood_of_flush_calls_waits_or_is_refused_and_streams_go_on() -> None:
    """Flush calls share one byte budget: 16 concurrent ~3.5 MiB calls partly wait, partly get
    RESOURCE_EXHAUSTED `flush_budget_exceeded`; a stream's NaN meanwhile still pages within a second."""
    from concurrent.futures import ThreadPoolExecutor

    from hardening_support import flush_outcome

    app = start_app(server_config(max_runs=100))
    try:
        big = hello(run="flush-flood")
        big.host = "h" * (3 << 20) + "h" * (1 << 19)
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(flush_outcome, app.grpc_target, big) for _ in range(16)]
            time.sleep(0.3)
            stream = AgentStream(app.grpc_target)
            started = time.monotonic()
            stream.send(hello_frame(run="flush-victim"))
            stream.send(report_frame(1, grad_norm=NAN))
            stream.recv_ack(1)
            latency = time.monotonic() - started
            stream.close()
            outcomes = [f.result()[:2] for f in futures]
        refused = (grpc.StatusCode.RESOURCE_EXHAUSTED, "flush_budget_exceeded")
        assert set(outcomes) == {(grpc.StatusCode.OK, None), refused}, outcomes
        assert outcomes.count(refused) >= 6
        assert latency < 1.0
        assert metric(scrape(app), "gradwatch_ingest_errors_total", reason="flush_budget_exceeded") == outcomes.count(
            refused
        )
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- item 7 (gRPC): silent streams


def test_streams_that_never_send_a_hello_time_out_and_are_counted() -> None:
    app = start_app(server_config(hello_timeout_s=0.5))
    channel = grpc.insecure_channel(app.grpc_target)
    try:
        never = threading.Event()
        calls = [pbg.IngestStub(channel).Stream(iter(never.wait, True)) for _ in range(50)]
        def seen(text: str) -> float:  # each stream is open, or already ended by the timeout (a slow host opens
            # the 50 over more than the 0.5 s it gives the first)
            timed_out = sample(text, "gradwatch_ingest_errors_total", reason="hello_timeout") or 0.0
            return metric(text, "gradwatch_ingest_active_streams") + timed_out

        wait_until(lambda: seen(scrape(app)) == 50, what="50 streams seen by the server")
        outcomes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            outcomes.append((ended.value.code(), reason_of(ended.value)))
        assert set(outcomes) == {(grpc.StatusCode.DEADLINE_EXCEEDED, "hello_timeout")}
        text = scrape(app)
        assert metric(text, "gradwatch_ingest_active_streams") == 0
        assert metric(text, "gradwatch_ingest_errors_total", reason="hello_timeout") == 50
        never.set()
    finally:
        channel.close()
        app.stop(grace=0)


def test_an_idle_stream_times_out_and_a_heartbeating_one_does_not() -> None:
    app = start_app(server_config(idle_stream_timeout_s=0.6))
    idle, busy = AgentStream(app.grpc_target), AgentStream(app.grpc_target)
    try:
        for stream, run in ((idle, "idle"), (busy, "busy")):
            stream.send(hello_frame(run=run))
            assert stream.recv().WhichOneof("body") == "welcome"
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            busy.send(pb.AgentFrame(heartbeat=pb.Heartbeat(step=1)))
            time.sleep(0.1)
        ended = idle.recv()
        assert isinstance(ended, grpc.RpcError) and reason_of(ended) == "idle_timeout"
        assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.send(report_frame(1))
        busy.recv_ack(1)
    finally:
        busy.close()
        idle.close()
        app.stop(grace=0)


def test_streams_beyond_the_limit_are_refused_with_a_reason() -> None:
    app = start_app(server_config(max_streams=3))
    streams = [AgentStream(app.grpc_target) for _ in range(3)]
    try:
        for i, stream in enumerate(streams):
            stream.send(hello_frame(run=f"s{i}"))
            assert stream.recv().WhichOneof("body") == "welcome"
        code, reason, _ = stream_outcome(app.grpc_target, [hello_frame(run="one-more")])
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "stream_limit_reached")
        streams.pop().close()
        wait_until(lambda: metric(scrape(app), "gradwatch_ingest_active_streams") == 2, what="a free slot")
        assert stream_outcome(app.grpc_target, [hello_frame(run="one-more")])[0] == grpc.StatusCode.OK
    finally:
        for stream in streams:
            stream.close()
        app.stop(grace=0)


# ---------------------------------------------------------------------- item 5: bounded query responses


def test_per_rank_lists_are_capped_and_paginated(app) -> None:
    import json as _json

    from gradwatch.server.views import RANKS_IN_VIEW
    from hardening_support import flush_outcome

    for rank in range(100):
        assert flush_outcome(app.grpc_target, hello(run="wide", rank=rank, world_size=100),
                             [report_frame(1)])[0] == grpc.StatusCode.OK  # fmt: skip
    (view,) = [r for r in _json.loads(urllib.request.urlopen(app.http_url + "/api/v1/runs").read())["runs"]
               if r["run"] == "wide"]  # fmt: skip
    assert len(view["ranks"]) == RANKS_IN_VIEW == 64 and view["ranks_total"] == 100
    seen, offset = [], 0
    while offset is not None:
        page = _json.loads(urllib.request.urlopen(f"{app.http_url}/api/v1/runs/wide/ranks?limit=30&offset={offset}")
                           .read())  # fmt: skip
        assert len(page["ranks"]) <= 30 and page["total"] == 100
        seen += [r["rank"] for r in page["ranks"]]
        offset = page["next_offset"]
    assert seen == list(range(100))
    series = _json.loads(urllib.request.urlopen(f"{app.http_url}/api/v1/runs/wide/series").read())
    assert len(series["ranks"]) == 64 and series["next_offset"] == 64


def test_a_flush_of_many_tiny_frames_is_charged_per_frame() -> None:
    """Frames cost CPU however small: a Flush of 60,000 empty-bodied reports (a few hundred kB) would take
    seconds of the ingest loop; it is charged per frame and refused."""
    from hardening_support import flush_outcome

    app = start_app()
    try:
        tiny = [pb.AgentFrame(seq=i, report=pb.StepReport(step=i)) for i in range(1, 60_001)]
        code, reason, _ = flush_outcome(app.grpc_target, hello(run="tiny"), tiny)
        assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "flush_budget_exceeded")
        assert flush_outcome(app.grpc_target, hello(run="tiny", session="s2"), tiny[:2000])[0] == grpc.StatusCode.OK
    finally:
        app.stop(grace=0)
