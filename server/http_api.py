"""The HTTP side: /metrics, /healthz and the JSON API, on a stdlib ThreadingHTTPServer.

Routes (an unknown GET path is 404; a method not listed for a path is 405):
  GET    /metrics                 Prometheus text format from the app's own registry
  GET    /healthz                 200 "ok"
  GET    /api/v1/runs             {"runs": [run, ...]}
  GET    /api/v1/alerts           {"alerts": [alert, ...]}; query `run=ID`, `state=firing|resolved` (else 400)
  GET    /api/v1/notifications    {"notifications": [...]}: per firing alert, notified or muted and why
  GET    /api/v1/silences         {"silences": [silence, ...]}
  POST   /api/v1/silences         body {"run", "detector"?, "duration_s", "comment"?, "created_by"?}
                                  -> 201 {"silence": ...}; 400 {"error"} on a bad body
  DELETE /api/v1/silences/<id>    -> 200 {"silence": ...} (expired now); 404 if not active
  GET    /api/v1/runs/..., /api/v1/incidents...: the query API (gradwatch.server.query_api), which also
                                  paginates and filters /api/v1/runs and /api/v1/alerts
JSON is strict (no NaN): the app's views are JSON-safe by contract.

With a TLS context source the port speaks only TLS (the context is asked for at every connection, so
rotated certificates apply to new connections) (the handshake runs on the request's own thread, with a
timeout, so a slow client cannot stall the others). With a guard (server/auth.py), requests without the
bearer token a path needs get 401 (with `WWW-Authenticate: Bearer`) or 403 before any route runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gradwatch.server.auth import HttpGuard
from gradwatch.server.limits import BAD_BODY, BadRequest, HttpRejections, parse_json_body
from gradwatch.server.silences import SilenceBook

__all__ = ["HttpApi"]

log = logging.getLogger(__name__)

RunsView = Callable[[], list[dict[str, Any]]]
AlertsView = Callable[[str | None, str | None], list[dict[str, Any]]]
NotificationsView = Callable[[], list[dict[str, Any]]]
#: (path, query) -> (status, content type, body), or None when the path is not one of its routes.
Routes = Callable[[str, dict[str, list[str]]], tuple[int, str, bytes] | None]

SILENCES = "/api/v1/silences"
#: Largest request body accepted (silences are a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Seconds a client gets to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0


class _TlsHttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that wraps each accepted connection in TLS on the request's thread."""

    tls_context: Callable[[], ssl.SSLContext]

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(TLS_HANDSHAKE_TIMEOUT_S)
        try:
            tls = self.tls_context().wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # plaintext or a client that gave up: not our problem
            log.debug("http: TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            tls.settimeout(None)
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()


class HttpApi:
    """Serves the routes above from a background thread; `start()` returns once listening."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        registry: CollectorRegistry,
        runs: RunsView,
        alerts: AlertsView,
        notifications: NotificationsView,
        silences: SilenceBook,
        tls_context: Callable[[], ssl.SSLContext] | None = None,
        guard: HttpGuard | None = None,
        routes: Routes | None = None,
        rejections: HttpRejections | None = None,
    ) -> None:
        handler = type(
            "GradwatchHandler",
            (_Handler,),
            {
                "registry": registry,
                "runs": staticmethod(runs),
                "alerts": staticmethod(alerts),
                "notifications": staticmethod(notifications),
                "silences": silences,
                "guard": guard,
                "routes": staticmethod(routes) if routes is not None else None,
                "rejections": rejections,
            },
        )
        if tls_context is None:
            self._server = ThreadingHTTPServer((host, port), handler)
        else:
            self._server = _TlsHttpServer((host, port), handler)
            self._server.tls_context = tls_context
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
    notifications: NotificationsView
    silences: SilenceBook
    guard: HttpGuard | None
    routes: Routes | None
    rejections: HttpRejections | None
    server_version = "gradwatch"

    def _allowed(self) -> bool:
        """Apply the guard; False when a 401/403 has been sent."""
        if self.guard is None:
            return True
        refusal = self.guard.check(urlsplit(self.path).path, self.headers.get("Authorization"), self.command)
        if refusal is None:
            return True
        status, message = refusal
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="gradwatch"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return False

    def do_GET(self) -> None:
        if not self._allowed():
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            routed = self.routes(url.path, query) if self.routes is not None else None
            if routed is not None:
                status, content_type, body = routed
                self._send(status, body, content_type)
            elif url.path == "/metrics":
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
            elif url.path == "/api/v1/notifications":
                self._json(200, {"notifications": self.notifications()})
            elif url.path == SILENCES:
                self._json(200, {"silences": self.silences.view()})
            else:
                self._json(404, {"error": f"no such path: {url.path}"})
        except Exception:  # a bug in a view must not kill the server thread; report 500
            log.exception("error serving %s", self.path)
            self._json(500, {"error": "internal error"})

    def do_POST(self) -> None:
        if not self._allowed():
            return
        if urlsplit(self.path).path != SILENCES:
            self._not_allowed()
            return
        try:
            body = self._read_json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            unknown = set(body) - {"run", "detector", "duration_s", "comment", "created_by"}
            if unknown:
                raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
            silence = self.silences.add(
                body.get("run"),  # type: ignore[arg-type]  # checked by add()
                body.get("detector"),
                body.get("duration_s"),  # type: ignore[arg-type]
                body.get("comment", ""),
                body.get("created_by", ""),
            )
        except ValueError as exc:
            if self.rejections is not None:
                self.rejections.count(exc.reason if isinstance(exc, BadRequest) else BAD_BODY)
            self._json(400, {"error": str(exc)})
            return
        self._json(201, {"silence": silence})

    def do_DELETE(self) -> None:
        if not self._allowed():
            return
        path = urlsplit(self.path).path
        if not path.startswith(SILENCES + "/"):
            self._not_allowed()
            return
        silence = self.silences.expire(path[len(SILENCES) + 1 :])
        if silence is None:
            self._json(404, {"error": "no such active silence"})
        else:
            self._json(200, {"silence": silence})

    def do_PUT(self) -> None:
        self._not_allowed()

    do_PATCH = do_PUT

    def _not_allowed(self) -> None:
        self._json(405, {"error": "method not allowed"})

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise ValueError("bad Content-Length") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise ValueError(f"body must be 1..{MAX_BODY_BYTES} bytes of JSON")
        return parse_json_body(self.rfile.read(length))

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
