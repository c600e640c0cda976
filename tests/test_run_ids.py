"""Any run id the server accepts can be addressed: the API's per-run paths, the overview narrowed to the run and
the fan-out to a peer all find a run whose id holds "/", "%", "?", "#", spaces or any printable character.

Run ids come from users and frameworks ("team/exp-1", an output directory, "lr=1e-3 50%"); the API takes
them as one quoted path segment, so the server must split the path before decoding it.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch.server.app import ServerApp
from relay_support import serve_peers
from server_support import http_get, short_run, start_app

#: Ids a user or a framework writes, and any printable text the server accepts (Hello validation).
RUN_IDS = st.sampled_from(["team/exp-1", "a%2Fb", "100%", "../up", "q?x=1#frag", " spaced out ", "ü/ß%20"]) | st.text(
    min_size=1, max_size=40
).filter(str.isprintable)


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    server = start_app()
    try:
        yield server
    finally:
        server.stop()


def _segment(run: str) -> str:
    return urllib.parse.quote(run, safe="")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=RUN_IDS)
def test_every_accepted_run_id_is_found_by_the_api_and_the_overview(app: ServerApp, run: str) -> None:
    short_run(f"127.0.0.1:{app.grpc_port}", run)
    base = f"http://127.0.0.1:{app.http_port}"
    status, _, body = http_get(f"{base}/api/v1/runs/{_segment(run)}")
    assert status == 200, body
    assert json.loads(body)["run"]["run"] == run
    status, _, body = http_get(f"{base}/api/v1/runs/{_segment(run)}/ranks")
    assert status == 200 and [r["rank"] for r in json.loads(body)["ranks"]] == [0]
    status, _, body = http_get(f"{base}/api/v1/runs/{_segment(run)}/series")
    assert status == 200, body
    status, _, page = http_get(f"{base}/?{urllib.parse.urlencode({'run': run})}")
    assert status == 200 and html.escape(run).encode() in page


def test_a_peer_finds_a_run_whose_id_holds_a_slash_and_a_percent(tmp_path: Path) -> None:
    a, b = serve_peers(tmp_path, "ab")
    try:
        run = "team/exp 50%"
        short_run(b.grpc_target, run)
        assert a.get(f"/api/v1/runs/{_segment(run)}")["run"]["run"] == run  # asked of B through A
        assert [r["rank"] for r in a.get(f"/api/v1/runs/{_segment(run)}/ranks")["ranks"]] == [0]
    finally:
        assert a.stop() == 0
        b.stop()
