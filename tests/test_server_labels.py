"""Label values from agents are bounded and printable, and no agent can blow up the number of series:
rejections with their reason, sanitised drop reasons, truncated identity fields, capped runs and layers."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.app import ServerApp
from gradwatch.server.grpc_service import REASON_METADATA_KEY
from gradwatch.server.ingest import MAX_DROP_REASONS
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import (
    AgentStream,
    acks,
    columns,
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

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app(server_config(max_job_name_chars=40, max_layer_name_chars=64))
    yield app
    app.stop(grace=0)


def _long_layer_hello() -> pb.AgentFrame:
    frame = hello_frame(run="long-layer", layers=2)
    frame.hello.schema.names[1] = "x" * 65
    return frame


def _control_module_hello() -> pb.AgentFrame:
    frame = hello_frame(run="ctl-module")
    frame.hello.activation_schema.names.append("encoder\n")
    return frame


CASES = {
    "run_id_with_newline": (hello_frame(run="run\nfake_series 1"), "invalid_run_id", "non-printable"),
    "run_id_with_nul": (hello_frame(run="run\x00"), "invalid_run_id", "non-printable"),
    "job_name_too_long": (hello_frame(run="j1", job_name="j" * 41), "invalid_job_name", "41 characters; the limit"),
    "job_name_with_tab": (hello_frame(run="j2", job_name="a\tb"), "invalid_job_name", "non-printable"),
    "layer_name_too_long": (_long_layer_hello(), "invalid_schema", "name of 65 characters; the limit is 64"),
    "module_name_with_newline": (_control_module_hello(), "invalid_schema", "control characters"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_labels_bad_values_are_rejected_with_reason(app: ServerApp, case: str) -> None:
    frame, reason, text = CASES[case]
    before = metric(scrape(app), "gradwatch_ingest_errors_total", reason=reason)
    with pytest.raises(grpc.RpcError) as info:
        run_stream(app.grpc_target, [frame])
    assert info.value.code() == INVALID
    assert text in info.value.details()
    assert (REASON_METADATA_KEY, reason) in tuple(info.value.trailing_metadata() or ())
    assert sample(scrape(app), "gradwatch_ingest_errors_total", reason=reason) == before + 1
    assert frame.hello.run_id not in [r["run"] for r in app.runs()]


def test_labels_printable_unicode_names_within_limits_are_accepted(app: ServerApp) -> None:
    frame = hello_frame(run="exp/ü-1 run", job_name="训练 job", layers=1)
    assert acks(run_stream(app.grpc_target, [frame, report_frame(1)])) == [1]
    assert sample(scrape(app), "gradwatch_run_info", run="exp/ü-1 run", job_name="训练 job", world_size="1") == 1


def test_labels_agent_drop_reasons_are_sanitised_and_capped(app: ServerApp) -> None:
    stream = AgentStream(app.grpc_target)
    stream.send(hello_frame(run="drops"))
    assert stream.recv().WhichOneof("body") == "welcome"
    dropped = {f"reason_{i:03d}": 1 for i in range(200)}
    dropped.update({"queue_full": 5, "Bad Reason\n": 7, "x" * 500: 11})
    stream.send(pb.AgentFrame(heartbeat=pb.Heartbeat(dropped=dropped)))
    stream.send(report_frame(1))
    stream.recv_ack(1)
    stream.close()

    series = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(scrape(app))
        for s in family.samples
        if s.name == "gradwatch_agent_dropped_total" and s.labels["run"] == "drops"
    }
    assert len(series) == MAX_DROP_REASONS + 1
    assert "other" in series and all(len(r) <= 64 and r.isidentifier() for r in series)
    assert sum(series.values()) == sum(dropped.values())  # nothing lost, only folded


def test_labels_identity_fields_are_truncated(app: ServerApp) -> None:
    frame = pb.AgentFrame(hello=hello(run="big-host"))
    frame.hello.host = "h" * 10_000
    frame.hello.torch_version = "v" * 10_000
    run_stream(app.grpc_target, [frame])
    (run,) = [r for r in app.runs() if r["run"] == "big-host"]
    assert len(run["ranks"][0]["host"]) == 256


def test_labels_series_stay_bounded_whatever_agents_send() -> None:
    """Twenty runs of 50 layers each against max_runs=3 and 4 layer series per run: at most 3 × 4 series per
    layer family, 3 run_info series, and the evictions are counted."""
    app = start_app(server_config(max_runs=3, max_layer_series_per_run=4, at_max_runs="evict_idle"))
    try:
        for i in range(20):
            frames = [hello_frame(run=f"flood-{i}", layers=50), report_frame(1, layers=columns(50, grad_norm=1.0))]
            assert acks(run_stream(app.grpc_target, frames)) == [1]
        text = scrape(app)
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                counts[s.name] = counts.get(s.name, 0) + 1
        assert counts["gradwatch_layer_grad_norm"] == 3 * 4
        assert counts["gradwatch_run_info"] == 3
        assert metric(text, "gradwatch_runs_evicted_total") == 17
        assert metric(text, "gradwatch_layer_series_dropped_total", run="flood-19") == 46
    finally:
        app.stop(grace=0)
