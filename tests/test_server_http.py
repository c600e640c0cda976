"""HTTP routes: /healthz, /api/v1/runs and /api/v1/alerts JSON shapes and filters, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import pytest

from gradwatch.server.app import ServerApp
from server_support import get_json, hello_frame, http_get, report_frame, run_stream, start_app

ALERT_KEYS = {
    "id",
    "run",
    "ranks",
    "detector",
    "severity",
    "state",
    "step",
    "last_step",
    "layer",
    "value",
    "summary",
    "started_at",
    "resolved_at",
    "runbook",
    "autopsy",
}


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = start_app()
    frames = [
        hello_frame(run="api", job_name="job-api", layers=3),
        report_frame(1, loss=1.25, grad_norm=2.0),
        report_frame(2, loss=math.nan, grad_norm=math.nan),
    ]
    run_stream(app.grpc_target, frames)
    run_stream(app.grpc_target, [hello_frame(run="quiet"), report_frame(1)])
    yield app
    app.stop(grace=0)


def test_http_healthz_ok(app: ServerApp) -> None:
    assert http_get(app.http_url + "/healthz")[0::2] == (200, b"ok\n")


def test_http_unknown_path_404_json(app: ServerApp) -> None:
    status, content_type, body = http_get(app.http_url + "/nope")
    assert status == 404 and content_type == "application/json" and "error" in json.loads(body)


def test_http_runs_shape(app: ServerApp) -> None:
    runs = {r["run"]: r for r in get_json(app.http_url + "/api/v1/runs")["runs"]}
    run = runs["api"]
    assert run["job_name"] == "job-api" and run["world_size"] == 1 and run["state"] == "active"
    assert run["step"] == 2 and run["loss"] == 1.25 and run["grad_norm_max"] == 2.0
    assert run["non_finite_events"] == {"loss": 1, "gradient": 1, "weight": 0}
    assert run["firing"] == ["non_finite"]
    assert run["layers_exported"] == 3 and run["layers_dropped"] == 0
    [rank] = run["ranks"]
    assert {
        "rank",
        "host",
        "pid",
        "session_id",
        "step",
        "last_report_at",
        "loss",
        "grad_norm",
        "connected",
        "reports",
        "layers",
    } <= rank.keys()
    assert rank["reports"] == 2 and rank["layers"] == 3 and rank["session_id"] == "s-1"
    assert runs["quiet"]["firing"] == []
    assert app.runs() == get_json(app.http_url + "/api/v1/runs")["runs"]


def test_http_alerts_shape_and_filters(app: ServerApp) -> None:
    [alert] = get_json(app.http_url + "/api/v1/alerts")["alerts"]
    assert alert.keys() == ALERT_KEYS
    assert alert["run"] == "api" and alert["state"] == "firing" and alert["step"] == 2 and alert["ranks"] == [0]
    assert get_json(app.http_url + "/api/v1/alerts?run=quiet")["alerts"] == []
    assert get_json(app.http_url + "/api/v1/alerts?state=resolved")["alerts"] == []
    assert len(get_json(app.http_url + "/api/v1/alerts?run=api&state=firing")["alerts"]) == 1
    assert app.alerts(run="api") == get_json(app.http_url + "/api/v1/alerts?run=api")["alerts"]


def test_http_alerts_bad_state_is_400(app: ServerApp) -> None:
    status, _, body = http_get(app.http_url + "/api/v1/alerts?state=bogus")
    assert status == 400 and "firing" in json.loads(body)["error"]


def test_http_post_is_405(app: ServerApp) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(app.http_url + "/api/v1/runs", data=b"{}"), timeout=10)
    assert info.value.code == 405


def test_app_second_server_on_same_ports_fails_to_start(app: ServerApp) -> None:
    import dataclasses

    from server_support import server_config

    base = server_config()
    clash = dataclasses.replace(base, grpc=dataclasses.replace(base.grpc, port=app.grpc_port))
    with pytest.raises(OSError):
        start_app(clash)
    clash = dataclasses.replace(base, http=dataclasses.replace(base.http, port=app.http_port))
    with pytest.raises(OSError):
        start_app(clash)
