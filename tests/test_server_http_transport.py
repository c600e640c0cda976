"""The HTTP transport (aiohttp): request timeouts, the connection bound, gzip for /metrics, security headers."""

from __future__ import annotations

import dataclasses
import gzip
import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from gradwatch.server.app import ServerApp
from gradwatch.server.config import HttpConfig, ServerConfig
from server_support import http_get, metric, scrape
from wait_support import wait_until

WAIT_S = 30.0


@pytest.fixture
def make_app() -> Iterator[Callable[..., ServerApp]]:
    apps: list[ServerApp] = []

    def make(**http: Any) -> ServerApp:
        config = ServerConfig.local()
        config = dataclasses.replace(config, http=dataclasses.replace(config.http, **http))
        apps.append(ServerApp(config).start())
        return apps[-1]

    yield make
    for app in apps:
        app.stop(grace=0)


def connect(app: ServerApp) -> socket.socket:
    return socket.create_connection(("127.0.0.1", app.http_port), timeout=WAIT_S)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (EOF or reset)."""
    sock.settimeout(0.001)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_http_a_thousand_half_sent_requests_hold_no_threads_and_are_closed(make_app: Callable[..., ServerApp]) -> None:
    app = make_app(request_timeout_s=2.0, max_connections=2000)
    threads_before = threading.active_count()
    slow = []
    for _ in range(1000):
        sock = connect(app)
        sock.sendall(b"GET /api/v1/runs HTTP/1.1\r\nHost: gradwatch\r\nX-Slow: ")  # never finished
        slow.append(sock)
    http = app._http
    assert http is not None
    wait_until(lambda: http.stats.open >= 1000, what="1000 open connections")
    # Everyone else is served meanwhile, and the half-sent requests cost no thread each.
    assert http_get(app.http_url + "/healthz")[0::2] == (200, b"ok\n")
    assert threading.active_count() <= threads_before + 8
    # After request_timeout_s the server closes every one of them, and counts them.
    wait_until(lambda: all(closed_by_server(s) for s in slow), what="all closed")
    for sock in slow:
        sock.close()
    wait_until(lambda: http.stats.open == 0, what="none open")
    assert metric(scrape(app), "gradwatch_http_connections_incomplete_total") >= 1000


def test_http_a_half_sent_post_body_gets_408(make_app: Callable[..., ServerApp]) -> None:
    app = make_app(request_timeout_s=1.0)
    with connect(app) as sock:
        sock.sendall(
            b"POST /api/v1/silences HTTP/1.1\r\nHost: gradwatch\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"run": '
        )
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_http_connections_beyond_the_bound_get_503_until_one_closes(make_app: Callable[..., ServerApp]) -> None:
    app = make_app(max_connections=4, request_timeout_s=30.0)
    http = app._http
    assert http is not None
    held = [connect(app) for _ in range(4)]
    wait_until(lambda: http.stats.open == 4, what="4 open connections")
    with connect(app) as extra:
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: gradwatch\r\n\r\n")
        reply = extra.recv(65536)
    assert reply.startswith(b"HTTP/1.1 503 ") and b"too many connections" in reply
    assert http.stats.refused == 1
    held.pop().close()
    wait_until(lambda: http.stats.open == 3, what="a free slot")
    assert http_get(app.http_url + "/healthz")[0] == 200
    for sock in held:
        sock.close()


def test_http_metrics_are_gzipped_when_the_client_asks(make_app: Callable[..., ServerApp]) -> None:
    app = make_app()
    plain = http_get(app.http_url + "/metrics")[2]
    request = urllib.request.Request(app.http_url + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        body = gzip.decompress(response.read())
    assert len(plain) > 1000 and b"# TYPE gradwatch_http_connections_open gauge" in body
    # The same exposition either way (values of live gauges may move between the two scrapes).
    assert [line for line in body.splitlines() if line.startswith(b"#")] == [
        line for line in plain.splitlines() if line.startswith(b"#")
    ]


def test_http_json_responses_say_nosniff(make_app: Callable[..., ServerApp]) -> None:
    app = make_app()
    for path in ("/api/v1/runs", "/api/v1/alerts", "/api/v1/incidents", "/nope"):
        try:
            response = urllib.request.urlopen(app.http_url + path, timeout=WAIT_S)
        except urllib.error.HTTPError as exc:
            response = exc
        with response:
            assert response.headers["Content-Type"] == "application/json", path
            assert response.headers["X-Content-Type-Options"] == "nosniff", path
            json.loads(response.read())


def test_http_bind_error_names_the_http_port(make_app: Callable[..., ServerApp]) -> None:
    first = make_app()
    config = ServerConfig.local()
    config = dataclasses.replace(config, http=HttpConfig(host="127.0.0.1", port=first.http_port))
    with pytest.raises(OSError, match=f"cannot bind HTTP to 127.0.0.1:{first.http_port}"):
        ServerApp(config).start()
