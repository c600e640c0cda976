"""The HTTP side: /metrics, /healthz and the JSON API, on a stdlib ThreadingHTTPServer.

Routes (GET only; anything else is 404, other methods 405):
  /metrics          Prometheus text format from the app's own registry
  /healthz          200 "ok"
  /api/v1/runs      {"runs": [run, ...]}
  /api/v1/alerts    {"alerts": [alert, ...]}; query `run=ID`, `state=firing|resolved` (else 400)
JSON is strict (no NaN): the app's views are JSON-safe by contract.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HttpApi"]

log = logging.getLogger(__name__)

RunsView = Callable[[], list[dict[str, Any]]]
AlertsView = Callable[[str | None, str | None], list[dict[str, Any]]]


class HttpApi:
    """Serves the routes above from a background thread; `start()` returns once listening."""

    def __init__(
        self, host: str, port: int, *, registry: CollectorRegistry, runs: RunsView, alerts: AlertsView
    ) -> None:
        handler = type(
            "GradwatchHandler",
            (_Handler,),
            {"registry": registry, "runs": staticmethod(runs), "alerts": staticmethod(alerts)},
        )
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="gradwatch-http", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    registry: CollectorRegistry
    runs: RunsView
    alerts: AlertsView
    server_version = "gradwatch"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path == "/metrics":
                self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            elif url.path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif url.path == "/api/v1/runs":
                self._json(200, {"runs": self.runs()})
            elif url.path == "/api/v1/alerts":
                state = _one(query, "state")
                if state is not None and state not in ("firing", "resolved"):
                    self._json(400, {"error": f"state must be 'firing' or 'resolved', got {state!r}"})
                    return
                self._json(200, {"alerts": self.alerts(_one(query, "run"), state)})
            else:
                self._json(404, {"error": f"no such path: {url.path}"})
        except Exception:  # a bug in a view must not kill the server thread; report 500
            log.exception("error serving %s", self.path)
            self._json(500, {"error": "internal error"})

    def do_POST(self) -> None:
        self._json(405, {"error": "only GET is supported"})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _json(self, status: int, body: Any) -> None:
        self._send(status, json.dumps(body, allow_nan=False).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None
