"""The server's pages in headless Chromium: the overview, one click to the incident report; hostile names escaped;
behind the HTTP guard when tokens are on."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from browser_support import Browser  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import AuthConfig, ServerConfig  # noqa: E402
from gradwatch.server.http_api import CSP  # noqa: E402
from server_support import http_get  # noqa: E402

WAIT_S = 30.0
#: Names that would run script, inject markup or break out of an attribute if a page did not escape them.
HOSTILE_RUN = "<script>window.pwned=1</script>\"'&run"
HOSTILE_LAYER = '<img src=x onerror="window[\x27pwned\x27]=2">'
HOSTILE_JOB = "</td><b id=injected>job"

PLOTS_JS = """JSON.stringify([...document.querySelectorAll('svg.plot')].map(e => {
  const r = e.getBoundingClientRect();
  return {section: e.closest('section').id, w: r.width, h: r.height, marks: e.querySelectorAll('path,rect').length};
}))"""
#: What injected markup or script would leave behind in the page.
INJECTED_JS = """JSON.stringify({pwned: window.pwned || 0, scripts: document.scripts.length,
  imgs: document.images.length, injected: !!document.getElementById('injected')})"""


def nan_run(server: str) -> None:
    """A small model with a hostile layer name whose input turns NaN at step 30 (a critical incident)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module(HOSTILE_LAYER, torch.nn.Linear(8, 16))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("head", torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.attach(model, optimizer, run=HOSTILE_RUN, job_name=HOSTILE_JOB, server=server,
                          overhead_budget=0) as monitor:  # fmt: skip
        for step in range(1, 61):
            x = torch.randn(32, 8)
            if step == 30:
                x[0, 0] = float("nan")
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        assert monitor.close(timeout=10)


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = ServerApp(ServerConfig.local()).start()
    nan_run(app.grpc_target)
    deadline = time.monotonic() + WAIT_S
    while not [i for i in _incidents(app) if i["status"] == "complete"]:
        assert time.monotonic() < deadline, "no complete incident"
        time.sleep(0.05)
    yield app
    app.stop()


def _incidents(app: ServerApp) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{app.http_url}/api/v1/incidents", timeout=WAIT_S) as response:
        return list(json.loads(response.read())["incidents"])


def test_pages_overview_to_incident_in_chromium_escaped_and_drawn(app: ServerApp) -> None:
    status, content_type, body = http_get(app.http_url + "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert HOSTILE_RUN.encode() not in body and HOSTILE_LAYER.encode() not in body  # only escaped forms
    with Browser() as browser:
        page = browser.new_page()
        page.open(app.http_url + "/")
        assert page.errors == []
        assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
        text = page.evaluate("document.body.innerText")
        assert HOSTILE_RUN in text and HOSTILE_JOB in text  # shown as text, exactly
        assert "NaN (last finite" in text  # the run's loss is NaN since step 30
        sections = page.evaluate("[...document.querySelectorAll('section')].map(s => s.id).join(',')")
        assert sections == "firing,runs,incidents"
        # The firing non_finite alert links to its incident: follow that link, as a person would.
        link = page.evaluate("[...document.querySelectorAll('#firing a')].find(a => a.textContent === 'incident').href")
        (incident,) = [i for i in _incidents(app) if i["detector"] == "non_finite"]
        assert link == f"{app.http_url}/incidents/{incident['id']}"
        page.open(link)
        assert page.errors == []
        assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
        assert HOSTILE_LAYER in page.evaluate("document.body.innerText")
        plots = json.loads(page.evaluate(PLOTS_JS))
        back = page.evaluate("document.querySelector('a').href")
    assert [p["section"] for p in plots][:3] == ["loss", "grad-norm", "heatmap"], plots
    assert all(p["w"] > 100 and p["h"] > 50 and p["marks"] > 3 for p in plots), plots
    assert back == app.http_url + "/"
    status, content_type, body = http_get(f"{app.http_url}/incidents/{incident['id']}")
    assert status == 200 and b"<script" not in body


def test_pages_headers_latest_link_and_unknown_incident(app: ServerApp) -> None:
    (incident,) = [i for i in _incidents(app) if i["detector"] == "non_finite"]
    with urllib.request.urlopen(app.http_url + "/", timeout=WAIT_S) as response:
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    query = urllib.parse.urlencode({"run": HOSTILE_RUN, "detector": "non_finite"})
    status, _, latest = http_get(f"{app.http_url}/incidents/latest?{query}")
    assert status == 200 and incident["id"].encode() in latest
    status, content_type, body = http_get(app.http_url + "/incidents/ffffffffffff")
    assert status == 404 and content_type.startswith("text/html") and b'href="../"' in body


def test_pages_are_behind_the_guard_when_tokens_are_on(tmp_path: pathlib.Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text('tokens: [{name: oncall, token: "oncall-secret-0123456789", api: true}]\n')
    config = dataclasses.replace(ServerConfig.local(), auth=AuthConfig(tokens_file=str(tokens)))
    app = ServerApp(config).start()
    try:
        for path in ("/", "/incidents/ffffffffffff"):
            assert http_get(app.http_url + path)[0] == 401
            request = urllib.request.Request(
                app.http_url + path, headers={"Authorization": "Bearer oncall-secret-0123456789"}
            )
            try:
                status = urllib.request.urlopen(request, timeout=WAIT_S).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == (200 if path == "/" else 404)
    finally:
        app.stop()
