"""The views people look at: the query CLI, the HTML incident report in headless Chromium, on a real incident."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from browser_support import Browser  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from server_support import get_json, http_get  # noqa: E402
from wait_support import wait_until  # noqa: E402

WAIT_S = 30.0


@pytest.fixture(scope="module")
def exploded() -> Iterator[tuple[ServerApp, dict[str, Any]]]:
    """A server that watched a real run whose gradients explode at step 100; its exploding_gradient incident.

    Only non_finite and exploding_gradient run: the assertions below count and name alerts, and the other
    detectors' verdicts on this run are their own tests' business."""
    base = ServerConfig.local()
    watched = ("non_finite", "exploding_gradient")
    detectors = {name: config if name in watched else dataclasses.replace(config, enabled=False)
                 for name, config in base.detectors.items()}  # fmt: skip
    app = ServerApp(dataclasses.replace(base, detectors=detectors)).start()
    training = DemoTraining(seed=2)
    monitor = gradwatch.attach(
        training.model, training.optimizer, run="boom", server=app.grpc_target, job_name="lm-7b", overhead_budget=0
    )
    for step in range(1, 161):
        monitor.step(training.step("explode" if step == 100 else "none"))
    assert monitor.close(timeout=10)

    def complete() -> dict[str, Any] | None:
        found = get_json(f"{app.http_url}/api/v1/incidents?detector=exploding_gradient")["incidents"]
        return found[0] if found and found[0]["status"] == "complete" else None

    incident = wait_until(complete, WAIT_S, what="a complete exploding_gradient incident", interval=0.05)
    yield app, incident
    app.stop()


def gradwatch_cli(*args: str, env: dict[str, str] | None = None, cwd: pathlib.Path | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---------------------------------------------------------------------- JSON API and CLI


def test_api_lists_paginate_and_filter(exploded: tuple[ServerApp, dict[str, Any]]) -> None:
    app, _ = exploded
    alerts = get_json(f"{app.http_url}/api/v1/alerts?limit=1")
    assert alerts["total"] == 2 and len(alerts["alerts"]) == 1 and alerts["next_offset"] == 1
    rest = get_json(f"{app.http_url}/api/v1/alerts?limit=1&offset=1")
    assert rest["next_offset"] is None
    assert {alerts["alerts"][0]["detector"], rest["alerts"][0]["detector"]} == {"exploding_gradient", "non_finite"}
    assert get_json(f"{app.http_url}/api/v1/incidents?run=other")["incidents"] == []
    assert get_json(f"{app.http_url}/api/v1/runs?job=lm-7b")["total"] == 1
    assert get_json(f"{app.http_url}/api/v1/runs?state=finished")["total"] == 1
    status, _, body = http_get(f"{app.http_url}/api/v1/incidents?severity=fatal")
    assert status == 400 and "severity" in json.loads(body)["error"]
    series = get_json(f"{app.http_url}/api/v1/runs/boom/series?last=20")
    (rank,) = series["ranks"]
    assert rank["step"] == list(range(141, 161)) and all(v is None for v in rank["grad_norm"][-5:])
    assert http_get(f"{app.http_url}/api/v1/runs/nope/ranks")[0] == 404


def test_cli_lists_and_shows_runs_alerts_incidents(exploded: tuple[ServerApp, dict[str, Any]]) -> None:
    app, incident = exploded
    env = {"GRADWATCH_HTTP": app.http_url.removeprefix("http://")}  # host:port works as well as a URL
    runs = gradwatch_cli("runs", env=env).splitlines()
    assert runs[0].split()[:3] == ["RUN", "JOB", "STATE"] and runs[1].split()[:3] == ["boom", "lm-7b", "finished"]
    (run,) = json.loads(gradwatch_cli("runs", "--json", "--server", app.http_url))
    assert run["run"] == "boom" and run["step"] == 160
    assert "RANK" in gradwatch_cli("runs", "show", "boom", env=env)
    firing = json.loads(gradwatch_cli("alerts", "--state", "firing", "--json", env=env))
    assert {a["detector"] for a in firing} == {"exploding_gradient", "non_finite"}
    (only,) = json.loads(gradwatch_cli("alerts", "--detector", "non_finite", "--run", "boom", "--json", env=env))
    assert only["detector"] == "non_finite"
    assert json.loads(gradwatch_cli("alerts", "--severity", "info", "--json", env=env)) == []
    shown = gradwatch_cli("alerts", "show", firing[0]["id"][:8], env=env)
    assert f"detector:    {firing[0]['detector']}" in shown
    listed = gradwatch_cli("incidents", "list", env=env)
    assert incident["id"] in listed and "exploding_gradient" in listed
    text = gradwatch_cli("incidents", "show", incident["id"], env=env)
    assert "provenance (first sign first):" in text and "exploding_gradient fired" in text
    # Where it started: the first layer whose gradient norm left its own baseline, at or after the fault.
    body = json.loads(gradwatch_cli("incidents", "show", incident["id"], "--json", env=env))
    (onset,) = [e for e in body["provenance"] if e["kind"] == "layer"]
    assert onset["layer"] in ("0", "2", "4") and 100 <= onset["step"] <= incident["step"] + 16, onset
    assert f"layer {onset['layer']} first abnormal" in text
    assert json.loads(gradwatch_cli("incidents", "show", incident["id"], "--json", env=env))["step"] == incident["step"]


def test_cli_says_when_the_server_is_unreachable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", "runs", "--server", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "cannot reach the gradwatch server at http://127.0.0.1:9" in result.stderr


# ---------------------------------------------------------------------- HTML report


PLOTS_JS = """JSON.stringify([...document.querySelectorAll('svg.plot')].map(e => {
  const r = e.getBoundingClientRect();
  return {section: e.closest('section').id, x: r.x + scrollX, y: r.y + scrollY, w: r.width, h: r.height};
}))"""


def test_report_renders_in_chromium_without_errors_and_its_plots_are_not_empty(
    exploded: tuple[ServerApp, dict[str, Any]], tmp_path: pathlib.Path
) -> None:
    from PIL import Image

    app, incident = exploded
    out = gradwatch_cli("report", incident["id"][:6], "-o", "incident.html", "--server", app.http_url, cwd=tmp_path)
    path = tmp_path / "incident.html"
    assert out.strip() == "incident.html" and path.exists()
    page_html = path.read_text()
    # Self-contained: no scripts, no external stylesheets, images or fonts; the runbook is the only link.
    assert "<script" not in page_html and " src=" not in page_html and "<link" not in page_html
    assert page_html.count("href=") == 1 and 'href="https://' in page_html
    with Browser() as browser:
        page = browser.new_page()
        page.open(path.as_uri())
        assert page.errors == []
        plots = json.loads(page.evaluate(PLOTS_JS))
        shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    sections = [p["section"] for p in plots]
    assert sections[:3] == ["loss", "grad-norm", "heatmap"], sections
    assert sections.count("activations") >= 2 and sections.count("histograms") >= 1
    pixels = np.asarray(shot, dtype=np.int16)
    for plot in plots:
        x, y, w, h = (round(plot[k]) for k in ("x", "y", "w", "h"))
        region = pixels[y : y + h, x : x + w]
        assert region.shape[0] == h and region.shape[1] == w, plot  # inside the screenshot
        chroma = region.max(axis=2) - region.min(axis=2)  # data is drawn in colour; axes and text are grey
        coloured = int((chroma > 60).sum())
        assert region.var() > 100 and coloured > 400, (plot, float(region.var()), coloured)
    heat = next(p for p in plots if p["section"] == "heatmap")
    cells = pixels[int(heat["y"]) + 30 : int(heat["y"]) + 60, int(heat["x"]) + 40 : int(heat["x"] + heat["w"]) - 20]
    assert len(np.unique(cells.reshape(-1, 3), axis=0)) > 8  # a colour scale, not one flat colour


def test_report_for_unknown_incident_fails_with_the_servers_reason(exploded: tuple[ServerApp, dict[str, Any]]) -> None:
    app, _ = exploded
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", "ffffffffffff", "--server", app.http_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1 and "404 no incident 'ffffffffffff'" in result.stderr
