"""/metrics: promtool-clean, counters born at 0, per-layer series capped and aggregated, bounded runs."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY as GLOBAL_REGISTRY

from gradwatch.server.app import ServerApp
from gradwatch.server.detectors import REGISTRY
from gradwatch.server.stats import FRAME_KINDS
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import (
    columns,
    get_json,
    hello_frame,
    http_get,
    metric,
    promtool_check,
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
    app = start_app(server_config(max_layer_series_per_run=8))
    yield app
    app.stop(grace=0)


def test_metrics_scrape_passes_promtool(app: ServerApp) -> None:
    frames = [
        hello_frame(run="lint", layers=12),
        report_frame(1, layers=columns(12, grad_norm=1.0, weight_norm=2.0)),
        report_frame(2, loss=math.nan),
        pb.AgentFrame(heartbeat=pb.Heartbeat(dropped={"queue_full": 2})),
    ]
    run_stream(app.grpc_target, frames)
    text = scrape(app)
    assert "gradwatch_layer_grad_norm" in text and "gradwatch_ingest_latency_seconds_bucket" in text

    result = promtool_check(text)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "_created" not in text
    assert 'job="' not in text and 'instance="' not in text


def test_metrics_content_type_is_prometheus_text(app: ServerApp) -> None:
    status, content_type, _ = http_get(app.http_url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")


def test_metrics_run_counters_exist_at_zero_on_registration(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="fresh", job_name="train-7", world_size=4)])
    text = scrape(app)
    assert sample(text, "gradwatch_run_info", run="fresh", job_name="train-7", world_size="4") == 1
    for kind in ("loss", "gradient", "weight"):
        assert sample(text, "gradwatch_non_finite_events_total", run="fresh", kind=kind) == 0
    for spec in REGISTRY:
        assert sample(text, "gradwatch_alert_firing", run="fresh", detector=spec.name) == 0
        assert sample(text, "gradwatch_detector_triggers_total", run="fresh", detector=spec.name) == 0
    assert sample(text, "gradwatch_layer_series_dropped_total", run="fresh") == 0


def test_metrics_self_counters_precreated_for_every_kind(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="tracked")])  # its own run: the test passes alone
    text = scrape(app)
    for kind in FRAME_KINDS:
        assert sample(text, "gradwatch_ingest_frames_total", kind=kind) is not None
    assert sample(text, "gradwatch_ingest_duplicate_frames_total") is not None
    assert sample(text, "gradwatch_runs_evicted_total") is not None
    assert metric(text, "gradwatch_runs_tracked") >= 1


def test_metrics_detector_ticks_rise_with_the_detector_loop(app: ServerApp) -> None:
    """gradwatch_detector_ticks_total is the detector loop's own count (Ingestor.ticks), rising once a second."""
    first = sample(scrape(app), "gradwatch_detector_ticks_total")
    assert first is not None and first <= app.ingestor.ticks
    assert wait_until(lambda: sample(scrape(app), "gradwatch_detector_ticks_total") >= first + 2)
    assert sample(scrape(app), "gradwatch_detector_ticks_total") <= app.ingestor.ticks


def test_metrics_run_level_aggregates_over_ranks(app: ServerApp) -> None:
    for rank, (norm, loss, step) in enumerate([(3.0, 1.0, 10), (4.0, 3.0, 12)]):
        frames = [
            hello_frame(run="agg", rank=rank, world_size=2, session=f"a{rank}"),
            report_frame(1, step=step, grad_norm=norm, loss=loss),
        ]
        run_stream(app.grpc_target, frames)
    text = scrape(app)
    assert sample(text, "gradwatch_run_step", run="agg") == 12
    assert sample(text, "gradwatch_run_loss", run="agg") == pytest.approx(2.0)
    assert sample(text, "gradwatch_run_grad_norm", run="agg", agg="max") == pytest.approx(4.0)
    assert sample(text, "gradwatch_run_grad_norm", run="agg", agg="min") == pytest.approx(3.0)
    assert metric(text, "gradwatch_rank_last_report_timestamp_seconds", run="agg", rank="1") > 0


def test_metrics_nan_loss_is_exported_as_nan_with_its_last_finite_step(app: ServerApp) -> None:
    run_stream(app.grpc_target, [hello_frame(run="nanloss"), report_frame(1, loss=2.0), report_frame(2, loss=math.nan)])
    text = scrape(app)
    loss = sample(text, "gradwatch_run_loss", run="nanloss")
    assert loss is not None and math.isnan(loss)  # never a stale finite value
    assert sample(text, "gradwatch_run_last_finite_loss_step", run="nanloss") == 1
    assert sample(text, "gradwatch_non_finite_events_total", run="nanloss", kind="loss") == 1
    run_stream(app.grpc_target, [hello_frame(run="infloss"), report_frame(1, loss=-math.inf)])
    assert sample(scrape(app), "gradwatch_run_loss", run="infloss") == -math.inf


def test_metrics_layer_series_capped_stable_and_max_over_ranks(app: ServerApp) -> None:
    n = 20
    for rank in (0, 1):
        values = [float(i + 10 * rank) if i % 2 else float(i) for i in range(n)]
        frames = [
            hello_frame(run="layers", rank=rank, world_size=2, session=f"l{rank}", layers=n),
            report_frame(1, layers=columns(n, grad_norm=values, weight_norm=1.5)),
        ]
        run_stream(app.grpc_target, frames)
    text = scrape(app)
    names = [f"model.layers.{i}.linear" for i in range(n)]
    for i, name in enumerate(names[:8]):  # first 8 in schema order
        expected = float(i + 10) if i % 2 else float(i)
        assert sample(text, "gradwatch_layer_grad_norm", run="layers", layer=name) == expected
        assert sample(text, "gradwatch_layer_weight_norm", run="layers", layer=name) == 1.5
    for name in names[8:]:
        assert sample(text, "gradwatch_layer_grad_norm", run="layers", layer=name) is None
    assert sample(text, "gradwatch_layer_series_dropped_total", run="layers") == n - 8


def test_metrics_app_registry_is_not_the_global_default(app: ServerApp) -> None:
    assert app.registry is not GLOBAL_REGISTRY
    from prometheus_client import generate_latest

    assert b"gradwatch_run_info" not in generate_latest(GLOBAL_REGISTRY)


def test_store_evicts_least_recently_active_run_and_counts_it() -> None:
    app = start_app(server_config(max_runs=3, at_max_runs="evict_idle"))
    try:
        for run in ("r1", "r2", "r3"):
            run_stream(app.grpc_target, [hello_frame(run=run), report_frame(1)])
        run_stream(app.grpc_target, [hello_frame(run="r1"), report_frame(2)])  # r1 active again: r2 is oldest
        run_stream(app.grpc_target, [hello_frame(run="r4"), report_frame(1)])

        assert sorted(r["run"] for r in get_json(app.http_url + "/api/v1/runs")["runs"]) == ["r1", "r3", "r4"]
        text = scrape(app)
        assert sample(text, "gradwatch_runs_evicted_total") == 1
        assert sample(text, "gradwatch_runs_tracked") == 3
        assert 'run="r2"' not in text
    finally:
        app.stop(grace=0)


def test_store_never_evicts_a_run_with_an_open_stream() -> None:
    import grpc

    from server_support import AgentStream

    app = start_app(server_config(max_runs=1, at_max_runs="evict_idle"))
    stream = AgentStream(app.grpc_target)
    try:
        stream.send(hello_frame(run="long"))
        stream.recv()
        with pytest.raises(grpc.RpcError) as refused:
            run_stream(app.grpc_target, [hello_frame(run="other")])
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limits.max_runs=1" in refused.value.details()
        stream.send(report_frame(1))
        stream.recv_ack(1)
        assert [r["run"] for r in app.runs()] == ["long"]
    finally:
        stream.close()
        app.stop(grace=0)


def test_store_ring_is_bounded_per_rank() -> None:
    app = start_app(server_config(ring_length=16))
    try:
        run_stream(app.grpc_target, [hello_frame(run="ring"), *(report_frame(s) for s in range(1, 101))])
        state = app.store.get("ring").ranks[0]
        rows = state.ring.rows()
        assert len(rows) == 16 and state.ring.count == 100
        assert list(rows["step"]) == list(range(85, 101))
    finally:
        app.stop(grace=0)


def test_metrics_layer_series_survive_nan_values(app: ServerApp) -> None:
    values = [1.0, float("nan"), float("inf"), 2.0]
    run_stream(
        app.grpc_target, [hello_frame(run="nanlayer", layers=4), report_frame(1, layers=columns(4, grad_norm=values))]
    )
    text = scrape(app)
    got = [
        metric(text, "gradwatch_layer_grad_norm", run="nanlayer", layer=f"model.layers.{i}.linear") for i in range(4)
    ]
    assert got[0] == 1.0 and math.isnan(got[1]) and math.isinf(got[2]) and got[3] == 2.0
    assert promtool_check(text).returncode == 0
