"""Silencing a run through the JSON API, the notification view, notifier metrics, and the alerting
configuration: YAML, environment, `gradwatch serve --alertmanager-url` (repeatable)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gradwatch.server.app import ServerApp
from gradwatch.server.config import (
    DEFAULT_RUNBOOK_BASE_URL,
    ENV_ALERTMANAGER_URLS,
    AlertingConfig,
    config_from_args,
    load_config_file,
)
from gradwatch.server.sinks import InMemorySink
from paging_support import WebhookReceiver
from server_support import (
    get_json,
    hello_frame,
    http_get,
    metric,
    promtool_check,
    report_frame,
    run_stream,
    scrape,
    server_config,
    start_app,
)
from wait_support import wait_until

WAIT_S = 10.0


def _request(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def app_and_sink() -> Iterator[tuple[ServerApp, InMemorySink]]:
    sink = InMemorySink()
    app = start_app(server_config(), extra_sinks=[sink])
    yield app, sink
    app.stop(grace=0)


def _nan(app: ServerApp, run: str) -> None:
    run_stream(app.grpc_target, [hello_frame(run=run), report_frame(1, loss=math.nan)])


def test_api_silence_create_list_expire(app_and_sink: tuple[ServerApp, InMemorySink]) -> None:
    app, _ = app_and_sink
    url = app.http_url + "/api/v1/silences"
    status, body = _request("POST", url, {"run": "r", "duration_s": 3600, "comment": "lr sweep", "created_by": "al"})
    assert status == 201
    silence = body["silence"]
    assert silence["run"] == "r" and silence["detector"] is None and silence["state"] == "active"
    assert silence["ends_at"] - silence["created_at"] == 3600
    assert get_json(url)["silences"] == [silence]
    status, body = _request("DELETE", f"{url}/{silence['id']}")
    assert status == 200 and body["silence"]["state"] == "expired"
    assert _request("DELETE", f"{url}/{silence['id']}")[0] == 404
    assert get_json(url)["silences"][0]["state"] == "expired"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"duration_s": 60}, "run"),
        ({"run": "r", "duration_s": 0}, "duration_s"),
        ({"run": "r", "duration_s": 8 * 24 * 3600}, "duration_s"),
        ({"run": "r", "duration_s": "1h"}, "duration_s"),
        ({"run": "r", "duration_s": 60, "detector": "no_such_detector"}, "unknown detector"),
        ({"run": "r", "duration_s": 60, "matchers": []}, "unknown fields"),
        ([1, 2], "JSON object"),
        (b"{not json", "not JSON"),
    ],
)
def test_api_silence_bad_requests_are_400(
    app_and_sink: tuple[ServerApp, InMemorySink], body: Any, message: str
) -> None:
    status, answer = _request("POST", app_and_sink[0].http_url + "/api/v1/silences", body)
    assert status == 400 and message in answer["error"]


def test_api_other_methods_stay_405(app_and_sink: tuple[ServerApp, InMemorySink]) -> None:
    app, _ = app_and_sink
    assert _request("POST", app.http_url + "/api/v1/alerts", {})[0] == 405
    assert _request("DELETE", app.http_url + "/api/v1/runs")[0] == 405
    assert _request("PUT", app.http_url + "/api/v1/silences", {})[0] == 405


def test_api_silenced_run_is_not_paged_others_are_and_it_shows(app_and_sink: tuple[ServerApp, InMemorySink]) -> None:
    app, sink = app_and_sink
    status, body = _request("POST", app.http_url + "/api/v1/silences", {"run": "quiet", "duration_s": 600})
    assert status == 201
    _nan(app, "quiet")
    _nan(app, "loud")
    assert sink.wait_for(lambda ns: any(n.labels["run"] == "loud" for n in ns), WAIT_S)
    assert app.notifier.workers[0].wait_idle(WAIT_S)
    assert {n.labels["run"] for n in sink.notifications} == {"loud"}
    assert {a["run"] for a in app.alerts(state="firing")} == {"quiet", "loud"}  # both still fire
    views = {v["run"]: v for v in get_json(app.http_url + "/api/v1/notifications")["notifications"]}
    assert views["quiet"]["silenced_by"] == [body["silence"]["id"]] and not views["quiet"]["notified"]
    assert views["loud"]["notified"] and views["loud"]["labels"]["alertname"] == "GradwatchNonFinite"
    text = scrape(app)
    assert metric(text, "gradwatch_alerts_muted", reason="silenced") == 1
    assert metric(text, "gradwatch_silences_active") == 1
    assert metric(text, "gradwatch_alert_notifications_total", sink="memory", outcome="sent") == 1
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    # Lifting the silence pages the still-firing alert within a tick.
    assert _request("DELETE", f"{app.http_url}/api/v1/silences/{body['silence']['id']}")[0] == 200
    assert sink.wait_for(lambda ns: any(n.labels["run"] == "quiet" for n in ns), WAIT_S)


def test_config_alerting_from_yaml_env_and_arguments(tmp_path: Path) -> None:
    path = tmp_path / "gradwatch.yaml"
    path.write_text(
        "alerting:\n  alertmanager_urls: [http://am-0:9093, http://am-1:9093]\n  resend_interval_s: 30\n"
    )
    assert load_config_file(path).alerting.alertmanager_urls == ("http://am-0:9093", "http://am-1:9093")
    assert load_config_file(path).alerting.runbook_base_url == DEFAULT_RUNBOOK_BASE_URL
    env = {ENV_ALERTMANAGER_URLS: "http://env-am:9093, http://env-am2:9093"}
    assert config_from_args(config_file=path, environ=env).alerting.alertmanager_urls == (
        "http://env-am:9093",
        "http://env-am2:9093",
    )
    config = config_from_args(config_file=path, environ=env, alertmanager_urls=["http://arg:9093"])
    assert config.alerting.alertmanager_urls == ("http://arg:9093",) and config.alerting.resend_interval_s == 30
    for doc in AlertingConfig.describe().values():
        assert doc[1]


@pytest.mark.parametrize(
    ("alerting", "message"),
    [
        ({"alertmanager_urls": "http://one"}, "list of strings"),
        ({"alertmanager_urls": ["am:9093"]}, "http(s) URL"),
        ({"webhook_urls": ["http://a/x", "http://a/x"]}, "twice"),
        ({"resend_interval_s": 0}, "resend_interval_s"),
        ({"pager": True}, "unknown setting"),
    ],
)
def test_config_alerting_errors_name_the_key(tmp_path: Path, alerting: dict[str, Any], message: str) -> None:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"alerting": alerting}))
    with pytest.raises(ValueError, match="alerting") as info:
        load_config_file(path)
    assert message in str(info.value)


def _stored(url: str) -> tuple[int, str, bytes] | None:
    """The answer for `url` once it is not a 404: the recorder's writer thread stores an incident just after its
    alert."""
    answer = http_get(url)
    return None if answer[0] == 404 else answer


def test_cli_serve_pushes_to_every_alertmanager_url() -> None:
    """`gradwatch serve --alertmanager-url A --alertmanager-url B`: both get POST /api/v2/alerts."""
    with WebhookReceiver() as first, WebhookReceiver() as second:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
             "--http-port", "0", "--alertmanager-url", first.url, "--alertmanager-url", second.url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "GRADWATCH_CONFIG": ""},
        )
        try:
            assert proc.stderr is not None
            banner = proc.stderr.readline()  # names the ports the system chose
            bound = re.search(r"gRPC on 127\.0\.0\.1:(\d+), HTTP on http://127\.0\.0\.1:(\d+) ", banner)
            assert bound is not None, banner
            grpc_port, http_port = int(bound[1]), int(bound[2])
            run_stream(f"127.0.0.1:{grpc_port}", [hello_frame(run="cli"), report_frame(1, loss=math.nan)])
            for receiver in (first, second):
                got = receiver.wait_alert(lambda d, a: a["labels"]["run"] == "cli", WAIT_S)
                assert got is not None and got[0].path == "/api/v2/alerts"
                assert "status" not in got[1] and got[1]["labels"]["alertname"] == "GradwatchNonFinite"
                # One click from the page: the link is the incident's HTML report on this server.
                link = urllib.parse.urlsplit(got[1]["generatorURL"])
                assert link.port == http_port and link.path.startswith("/incidents/"), link
                page = f"http://127.0.0.1:{http_port}{link.path}"
                answer = wait_until(functools.partial(_stored, page), WAIT_S, what=f"{page} stored", interval=0.05)
                assert answer[0] == 200 and answer[1].startswith("text/html") and b"non_finite" in answer[2]
            assert http_get(f"http://127.0.0.1:{http_port}/healthz")[0] == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=WAIT_S)
            if proc.stderr is not None:
                proc.stderr.close()
