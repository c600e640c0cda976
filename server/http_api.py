"""The HTTP side: /metrics, /healthz, the JSON API and the pages, served by aiohttp on its own event loop.

Routes (an unknown path is 404; a method not listed for a path is 405):
  GET    /metrics                 Prometheus text format from the app's own registry (prometheus_client's
                                  exposition), gzip-compressed when the client accepts it (Prometheus does)
  GET    /healthz                 200 "ok"
  GET    /api/v1/runs             {"runs": [run, ...]}
  GET    /api/v1/alerts           {"alerts": [alert, ...]}; query `run=ID`, `state=firing|resolved` (else 400)
  GET    /api/v1/notifications    {"notifications": [...]}: per firing alert, notified or muted and why
  GET    /api/v1/silences         {"silences": [silence, ...]}
  POST   /api/v1/silences         body {"run", "detector"?, "duration_s", "comment"?, "created_by"?}
                                  -> 201 {"silence": ...}; 400 {"error"} on a bad body
  DELETE /api/v1/silences/<id>    -> 200 {"silence": ...} (expired now); 404 if not active
  GET    anything `routes` answer: framework-independent functions (path, query) -> (status, content type, body)
                                  or None, asked in order (the query API of gradwatch.server.query_api, which also
                                  paginates and filters /api/v1/runs and /api/v1/alerts; the pages of
                                  gradwatch.server.pages)
JSON is strict (no NaN): the app's views are JSON-safe by contract.

Transport contract
- Views run on a small thread pool (VIEW_THREADS), never on the event loop, so a slow view (a large run under
  the store's lock) holds up no other connection. /metrics and /healthz have threads of their own
  (OWN_THREADS): views that wait on peers (server/fanout.py: up to its deadline while a replica hangs) can
  take every view thread, and a scrape must not queue behind them. Bodies are written in WRITE_CHUNK_BYTES
  pieces, each awaited until the socket drains: a slow reader holds one body, not the server, and one that
  takes no piece within `request_timeout_s` is disconnected.
- A connection gets `request_timeout_s` to send a request's headers, counted from when it opened or its
  previous response ended, and is then closed; a POST body gets `request_timeout_s` more (else 408).
  Half-sent requests and idle keep-alive connections cost a socket and a few hundred bytes of loop state,
  never a thread. At `max_connections` open
  connections a new one gets 503 and is closed. Both are counted (gradwatch_http_connections_* in /metrics).
- With a TLS context source the port speaks only TLS; the context is asked for at every handshake (a rotated
  certificate applies to new connections), and a handshake gets TLS_HANDSHAKE_TIMEOUT_S.
- With a guard (server/auth.py), requests without the bearer token a path needs get 401 (with
  `WWW-Authenticate: Bearer`) or 403 before any route runs. With page sessions (server/sessions.py) the
  HTML pages also take a session cookie from a login form (`GET`/`POST /login`, `/logout`); a page without
  either answers 401 with a page that leads to the login. The API and /metrics take bearer tokens only.
- Every response carries `X-Content-Type-Options: nosniff`; HTML carries a Content-Security-Policy that allows
  no script, no network access and only inline styles and data: images (the pages are self-contained).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.auth import HttpGuard
from gradwatch.server.fanout import FanOut
from gradwatch.server.limits import HttpRejections
from gradwatch.server.sessions import ALLOWED, HTML, LOGIN, LOGOUT, MAX_FORM_BYTES, Answer, PageSessions
from gradwatch.server.sessions_api import SESSIONS, SessionsApi
from gradwatch.server.silences import SilenceBook
from gradwatch.server.silences_api import SILENCES, SilencesApi

__all__ = ["CSP", "HttpApi", "HttpCollector", "HttpStats"]

log = logging.getLogger(__name__)

RunsView = Callable[[], list[dict[str, Any]]]
AlertsView = Callable[[str | None, str | None], list[dict[str, Any]]]
NotificationsView = Callable[[], list[dict[str, Any]]]
#: (path, query) -> (status, content type, body), or None when the path is not one of its routes.
Routes = Callable[[str, dict[str, list[str]]], tuple[int, str, bytes] | None]

#: Largest request body accepted (silences are a few hundred bytes).
MAX_BODY_BYTES = 64 * 1024
#: Seconds a client gets to complete the TLS handshake.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
#: Threads that run views (each holds the store's lock only as long as its view needs).
VIEW_THREADS = 4
#: Threads that answer only /metrics and /healthz (what Prometheus and probes read), apart from the views.
OWN_THREADS = 2
_OWN_PATHS = frozenset({"/metrics", "/healthz"})
#: Bodies are written in pieces of this size, each drained before the next.
WRITE_CHUNK_BYTES = 64 * 1024
#: Content-Security-Policy of every HTML page: self-contained pages need nothing else.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
#: The CSP of the login and logout pages: the pages' own, letting their form post to this server.
FORM_CSP = CSP.replace("form-action 'none'", "form-action 'self'")
START_TIMEOUT_S = 30.0


class HttpStats:
    """Connection counters of the HTTP side (read by the metrics collector); updated on the HTTP loop only."""

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0  # at max_connections
        self.incomplete = 0  # closed before one complete request arrived (request_timeout_s, or the client left)


class HttpApi:
    """Serves the routes above from the "gradwatch-http" thread; `start()` returns once listening."""

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
        sessions: PageSessions | None = None,
        routes: Sequence[Routes] = (),
        fanout: FanOut | None = None,
        rejections: HttpRejections | None = None,
        max_connections: int = 512,
        request_timeout_s: float = 10.0,
    ) -> None:
        self._host, self._requested_port = host, port
        self._registry = registry
        self._runs, self._alerts, self._notifications = runs, alerts, notifications
        self._silences_api = SilencesApi(silences, fanout, rejections)
        self._tls_context = tls_context
        self._guard = guard
        self._sessions = sessions
        self._sessions_api = SessionsApi(sessions) if sessions is not None else None
        self._routes = tuple(routes)
        self._rejections = rejections
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
        self.stats = HttpStats()
        self._pool = concurrent.futures.ThreadPoolExecutor(VIEW_THREADS, thread_name_prefix="gradwatch-http-view")
        self._own_pool = concurrent.futures.ThreadPoolExecutor(OWN_THREADS, thread_name_prefix="gradwatch-http-own")
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._web: web.Server | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("HttpApi not started")
        return self._port

    def start(self) -> None:
        """Bind and serve; OSError naming the address when the port cannot be bound."""
        self._thread = threading.Thread(target=self._loop.run_forever, name="gradwatch-http", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            self._port = future.result(timeout=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 2.0) -> None:
        """Stop listening, close open connections (giving running requests `timeout` seconds). Idempotent."""
        if self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(self._stop(timeout), self._loop).result(timeout + 5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._thread = None
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._own_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ serving

    async def _start(self) -> int:
        self._handler_args: dict[str, Any] = {
            "keepalive_timeout": self._request_timeout_s,  # armed from connect: also bounds a half-sent request
            "access_log": None,
            "max_line_size": 8190,
            "max_field_size": 8190,
        }
        self._web = web.Server(self._handle, handler_cancellation=True, **self._handler_args)
        tls = None
        if self._tls_context is not None:
            tls = self._tls_context()
            source = self._tls_context

            def fresh_context(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
                sock.context = source()  # the current certificate, for every new handshake

            tls.sni_callback = fresh_context
        address = f"{self._host}:{self._requested_port}"
        try:
            self._server = await self._loop.create_server(
                self._protocol,
                self._host,
                self._requested_port,
                ssl=tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if tls is not None else None,
                backlog=1024,
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(f"cannot bind HTTP to {address}: {reason}") from None
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> asyncio.Protocol:
        assert self._web is not None
        if len(self._web.connections) >= self._max_connections:
            self.stats.refused += 1
            return _Refuse()
        return _CountedHandler(self._web, self.stats, loop=self._loop, **self._handler_args)

    async def _stop(self, timeout: float) -> None:
        if self._server is not None:
            self._server.close()
        if self._web is not None:
            await self._web.shutdown(timeout)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        answer = None if self._sessions is None else await self._session_gate(request)
        if answer is not None and answer is not ALLOWED:
            headers = {**answer.headers, **({"Content-Security-Policy": FORM_CSP} if answer.form else {})}
            return await self._send(request, answer.status, answer.body, HTML, headers, answer.cookies)
        if self._guard is not None and answer is not ALLOWED:
            refusal = self._guard.check(request.path, request.headers.get(hdrs.AUTHORIZATION), request.method)
            if refusal is not None:
                status, message = refusal
                headers = {"WWW-Authenticate": 'Bearer realm="gradwatch"'} if status == 401 else {}
                return await self._send(request, status, _json_bytes({"error": message}), "application/json", headers)
        try:
            if request.method == hdrs.METH_GET:
                own = request.path in _OWN_PATHS
                # Routes split the path still encoded and decode each segment (a run id may hold "/" or "%"), and
                # parse the query once from its raw form (aiohttp's query_string is already decoded).
                url = request.rel_url
                status, content_type, body = await self._view(self._get, url.raw_path, url.raw_query_string, own)
            elif request.method == hdrs.METH_POST and request.path == SILENCES:
                status, content_type, body = await self._post_silence(request)
            elif request.method == hdrs.METH_DELETE and request.path.startswith(SESSIONS + "/") and self._sessions_api:
                digest = request.path[len(SESSIONS) + 1 :]
                end_session = self._sessions_api.delete
                status, content_type, body = await self._loop.run_in_executor(self._pool, end_session, digest)
            elif request.method == hdrs.METH_DELETE and request.path.startswith(SILENCES + "/"):
                status, reply = await self._loop.run_in_executor(
                    self._pool, self._silences_api.expire, request.path[len(SILENCES) + 1 :], *_writer(request)
                )
                status, content_type, body = _json(status, reply)
            else:
                status, content_type, body = _json(405, {"error": "method not allowed"})
        except Exception:  # a bug in a view must not kill the connection silently; report 500
            log.exception("error serving %s %s", request.method, request.path)
            status, content_type, body = _json(500, {"error": "internal error"})
        return await self._send(request, status, body, content_type, {})

    async def _session_gate(self, request: web.BaseRequest) -> Answer | None:
        """The page sessions' answer (gradwatch.server.sessions): login and logout, or a page's verdict."""
        assert self._sessions is not None
        cookies, authorization = request.cookies, request.headers.get(hdrs.AUTHORIZATION)
        gate = self._sessions.gate
        args = (request.method, request.raw_path, request.path, cookies, authorization)
        # With peers a session may be another replica's: asking them blocks, so it runs on the view threads.
        if self._sessions.peers is None:
            answer = gate(*args)
        else:
            answer = await self._loop.run_in_executor(self._pool, gate, *args)
        if answer is None and request.method == hdrs.METH_POST and request.path in (LOGIN, LOGOUT):
            body = await self._read_body(request, MAX_FORM_BYTES)
            form = self._sessions.login if request.path == LOGIN else self._sessions.logout
            answer = await self._loop.run_in_executor(self._pool, form, body or b"", cookies)
        return answer

    async def _view(self, view: Callable[[str, str], tuple[int, str, bytes]], path: str, query: str,
                    own: bool = False) -> Any:  # fmt: skip
        return await self._loop.run_in_executor(self._own_pool if own else self._pool, view, path, query)

    async def _send(
        self,
        request: web.BaseRequest,
        status: int,
        body: bytes,
        content_type: str,
        headers: dict[str, str],
        cookies: tuple[str, ...] = (),
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers=headers)
        response.headers[hdrs.CONTENT_TYPE] = content_type  # as given: the exposition's `version=` must stay
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers[hdrs.SERVER] = "gradwatch"
        for cookie in cookies:
            response.headers.add(hdrs.SET_COOKIE, cookie)
        if content_type.startswith("text/html"):
            response.headers.setdefault("Content-Security-Policy", CSP)
        if request.path == "/metrics" and "gzip" in request.headers.get(hdrs.ACCEPT_ENCODING, ""):
            response.enable_compression(web.ContentCoding.gzip)
        else:
            response.content_length = len(body)
        await response.prepare(request)
        view = memoryview(body)
        try:
            for start in range(0, len(body), WRITE_CHUNK_BYTES):
                # Waits while the socket is full; a reader that takes no chunk within the timeout is dropped.
                async with asyncio.timeout(self._request_timeout_s):
                    await response.write(view[start : start + WRITE_CHUNK_BYTES])
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            raise
        await response.write_eof()
        return response

    # ------------------------------------------------------------------ routes (on the view threads)

    def _get(self, path: str, query_string: str) -> tuple[int, str, bytes]:
        query = parse_qs(query_string)
        for route in self._routes:
            routed = route(path, query)
            if routed is not None:
                return routed
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/api/v1/runs":
            return _json(200, {"runs": self._runs()})
        if path == "/api/v1/alerts":
            state = _one(query, "state")
            if state is not None and state not in ("firing", "resolved"):
                return _json(400, {"error": f"state must be 'firing' or 'resolved', got {state!r}"})
            return _json(200, {"alerts": self._alerts(_one(query, "run"), state)})
        if path == "/api/v1/notifications":
            return _json(200, {"notifications": self._notifications()})
        if path == SILENCES:
            return _json(*self._silences_api.list(bool(query.get("local"))))
        return _json(404, {"error": f"no such path: {path}"})

    async def _read_body(self, request: web.BaseRequest, limit: int) -> bytes | None:
        """Up to `limit` + 1 bytes of the request's body (more than `limit`: too large); None when it did not
        arrive within request_timeout_s."""
        if request.content_length is not None and request.content_length > limit:
            return bytes(limit + 1)
        try:
            async with asyncio.timeout(self._request_timeout_s):
                raw = bytearray()
                while len(raw) <= limit:
                    chunk = await request.content.read(limit + 1 - len(raw))
                    if not chunk:
                        break
                    raw += chunk
        except TimeoutError:
            return None
        return bytes(raw)

    async def _post_silence(self, request: web.BaseRequest) -> tuple[int, str, bytes]:
        raw = await self._read_body(request, MAX_BODY_BYTES)
        if raw is None:
            return _json(408, {"error": f"the body did not arrive within {self._request_timeout_s:g} s"})
        if not 0 < len(raw) <= MAX_BODY_BYTES:
            return _json(400, {"error": f"body must be 1..{MAX_BODY_BYTES} bytes of JSON"})
        status, answer = await self._loop.run_in_executor(self._pool, self._silences_api.add, bytes(raw),
                                                          *_writer(request))  # fmt: skip
        return _json(status, answer)


def _writer(request: web.BaseRequest) -> tuple[bool, str | None]:
    """A silence write's `local=1` (this replica only) and the caller's Authorization (passed on to peers)."""
    return "local" in request.rel_url.query, request.headers.get(hdrs.AUTHORIZATION)


class _CountedHandler(RequestHandler):
    """aiohttp's connection handler, counting open connections and those closed before a complete request."""

    def __init__(self, manager: web.Server, stats: HttpStats, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._stats = stats
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._stats.open += 1
        self._counted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._stats.open -= 1
            if self._request_count == 0:
                self._stats.incomplete += 1  # timed out (or gave up) before sending one whole request
        super().connection_lost(exc)


class _Refuse(asyncio.Protocol):
    """A connection over max_connections: 503 and close, before reading anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        body = b'{"error": "too many connections"}'
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nX-Content-Type-Options: nosniff\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body
        )  # fmt: skip
        transport.close()


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", _json_bytes(body)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


class HttpCollector(Collector):
    """gradwatch_http_connections_* families: open connections, refused ones, ones closed before a request."""

    def __init__(self, stats: HttpStats) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        yield GaugeMetricFamily("gradwatch_http_connections_open", "Open HTTP connections.", value=stats.open)
        yield CounterMetricFamily(
            "gradwatch_http_connections_refused_total",
            "HTTP connections answered 503 and closed at http.max_connections.",
            value=stats.refused,
        )
        yield CounterMetricFamily(
            "gradwatch_http_connections_incomplete_total",
            "HTTP connections closed before one complete request (http.request_timeout_s, or the client left).",
            value=stats.incomplete,
        )
