"""Composition root: wires store, detectors, alerts, metrics, gRPC and HTTP; `serve()` runs it.

    app = ServerApp(ServerConfig(grpc=GrpcConfig(port=0), http=HttpConfig(port=0))).start()
    channel = grpc.insecure_channel(app.grpc_target)   # "127.0.0.1:PORT"
    urllib.request.urlopen(app.http_url + "/metrics")
    app.stop()

Threads (ARCHITECTURE.md, "Server concurrency model"): the grpc.aio server runs on its
own asyncio loop in the "gradwatch-grpc" thread (all ingestion happens there); the HTTP
server (aiohttp) runs its own loop in the "gradwatch-http" thread and answers from a
small pool of view threads, from snapshots of the store (`RunStore.snapshot`), never
holding a lock while it builds an answer; the per-second persistence runs on a worker
thread. Alert listeners are called on the gRPC thread: they must be quick and must not
block. The notifier is such a
listener: it hands notifications to one delivery thread per sink
("gradwatch-sink-<name>") and resends from its "gradwatch-notify" ticker thread. With
cluster.peers, "gradwatch-silence-sync" reconciles the silences with the peers'.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry

from gradwatch._version import __version__
from gradwatch.server import logs
from gradwatch.server.alerts import AlertBook, AlertListener
from gradwatch.server.auth import AuthCollector, HttpGuard, TokenSource
from gradwatch.server.config import AlertingConfig, ServerConfig
from gradwatch.server.database import Database
from gradwatch.server.detectors import REGISTRY, TICK_INTERVAL_S, DetectorSpec, inhibitions
from gradwatch.server.fanout import FanOut
from gradwatch.server.grpc_service import INGEST_SERVICE, IngestServicer, build_grpc_server
from gradwatch.server.http_api import HttpApi, HttpCollector
from gradwatch.server.incident_metrics import RecorderCollector
from gradwatch.server.ingest import Ingestor
from gradwatch.server.limits import HttpRejections
from gradwatch.server.metrics import GradwatchCollector
from gradwatch.server.notify import Notifier, NotifierCollector
from gradwatch.server.pages import Pages
from gradwatch.server.persistence import StateKeeper
from gradwatch.server.query_api import QueryApi
from gradwatch.server.recorder import FlightRecorder
from gradwatch.server.relay import IncidentTap, Relay, RelayCollector
from gradwatch.server.render import AlertRenderer
from gradwatch.server.sessions import PageSessions
from gradwatch.server.sessions_api import FanOutPeers, SessionsApi
from gradwatch.server.silences import SilenceBook
from gradwatch.server.silences_api import SilencesApi, SilenceSync
from gradwatch.server.sinks import AlertmanagerSink, AlertSink, DeliveryPolicy, LogSink, SinkWorker, WebhookSink
from gradwatch.server.stats import IngestStats
from gradwatch.server.store import RunState, RunStore
from gradwatch.server.tls import TlsCollector, load_server_tls
from gradwatch.server.upstream import RelayServicer, relays_route
from gradwatch.server.views import RANKS_IN_VIEW, run_view

__all__ = ["ServerApp", "serve"]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
#: How often finished runs are checked for expiry (finished_run_retention_s).
SWEEP_INTERVAL_S = 1.0
#: How often a run whose agents all went quiet is checked against the other replicas (cluster.peers).
QUIET_RECHECK_S = 10.0
#: How often the database's retention limits are applied (also once at start).
PRUNE_INTERVAL_S = 60.0


class ServerApp:
    """The gradwatch server: construct, `start()`, query, `stop()`. Usable as a context manager.

    Nothing binds or starts before `start()`; ports 0 pick free ports, readable from
    `grpc_port` / `http_port` afterwards. Notifications go to the sinks named in
    `config.alerting`, plus `extra_sinks` (e.g. an InMemorySink in tests).
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        detectors: tuple[DetectorSpec, ...] = REGISTRY,
        extra_sinks: Sequence[AlertSink] = (),
    ) -> None:
        self.config = config if config is not None else ServerConfig()
        limits = self.config.limits
        # TLS files and tokens are read here, so a bad path fails before anything binds (ValueError).
        self._tls = load_server_tls(self.config.tls)
        auth = self.config.auth
        self.tokens = TokenSource(auth.tokens_file) if auth.tokens_file else None
        self._guard = None
        #: Browser sessions for the HTML pages, when the guard protects them (server/sessions.py).
        self.page_sessions: PageSessions | None = None
        if self.tokens is not None:
            self._guard = HttpGuard(self.tokens, protect_api=auth.protect_api, protect_metrics=auth.protect_metrics)
            if auth.protect_api:
                secure = self._tls is not None or self.config.alerting.external_url.startswith("https://")
                self.page_sessions = PageSessions(self.tokens, self._guard, secure=secure)
        names = tuple(spec.name for spec in detectors)
        self.store = RunStore(limits, detector_names=names, clock=clock, can_evict=self._without_firing_alerts)
        alerting = self.config.alerting
        self.renderer = AlertRenderer(
            runbook_base_url=alerting.runbook_base_url, job_name_of=self._job_name_of, specs=detectors
        )
        self.alert_book = AlertBook(clock=clock, history=limits.alert_history, runbook_url=self.renderer.runbook_url)
        self.stats = IngestStats()
        #: Run registry, alerts and incidents on disk (config.storage); in memory when data_dir is empty.
        self.database = Database(self.config.storage, alert_history=limits.alert_history, clock=clock)
        self.keeper = StateKeeper(self.database, self.store, self.alert_book, ring_length=limits.ring_length)
        #: With relay.upstream: this server is a relay (per-rank work here, compact records upstream).
        self.relay = _relay(self.config, self.alert_book, lambda run, rank, cmd: self.ingestor.queue_command(
            run, rank, cmd))  # fmt: skip
        self.recorder = FlightRecorder(
            self.config.recorder,
            self.database if self.relay is None else IncidentTap(self.database, self.relay),  # type: ignore[arg-type]
            self.store,
            self.alert_book,
            specs=detectors,
            runbook_url=self.renderer.runbook_url,
            clock=clock,
        )
        self.ingestor = Ingestor(
            self.config,
            self.store,
            self.alert_book,
            self.stats,
            clock=clock,
            detectors=detectors,
            on_join=self.keeper.on_join,
            on_report=self.recorder.observe if self.config.recorder.enabled else None,
            on_rows=self.recorder.observe_rows if self.config.recorder.enabled else None,
            registry=self.database.run,
            scopes=("rank",) if self.relay is not None else ("rank", "run"),
            forwarder=self.relay,
        )
        #: The app's own Prometheus registry (never the global default).
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            GradwatchCollector(
                self.store,
                self.alert_book,
                self.stats,
                detector_names=names,
                version=__version__,
                max_layer_series=limits.max_layer_series,
                ticks=lambda: self.ingestor.ticks,
            )
        )
        self.silences = SilenceBook(clock=clock, detectors=names, persist=self.database.put_silences)
        self.notifier = Notifier(
            self.alert_book,
            self.silences,
            self.renderer,
            [SinkWorker(sink, _policy(alerting)) for sink in (*_configured_sinks(alerting), *extra_sinks)],
            resend_interval_s=alerting.resend_interval_s,
            inhibitions=inhibitions(detectors),
            clock=clock,
        )
        self.alert_book.add_listener(self.notifier.on_alert)
        self.registry.register(NotifierCollector(self.notifier, self.silences))
        if self.tokens is not None and self._guard is not None:
            self.registry.register(AuthCollector(self.tokens, self._guard))
        if self._tls is not None:
            self.registry.register(TlsCollector(self._tls))
        self.alert_book.add_listener(self.keeper.on_alert)
        self.alert_book.add_listener(self.recorder.on_alert)
        self.registry.register(RecorderCollector(self.recorder, self.database))
        #: With cluster.peers: the read API answered for every replica, and runs that moved handed over.
        self.fanout: FanOut | None = None
        if self.config.cluster.peers:
            token = _read_token(self.config.cluster.token_file, "cluster.token_file")
            self.fanout = FanOut(self.config.cluster.peers, local=(), own_port=lambda: self.http_port, token=token,
                                 scheme="https" if self._tls is not None else "http")  # fmt: skip
        self._quiet_checked: dict[str, float] = {}
        #: With cluster.peers: this replica's silences reconciled with the peers' (server/silences_api.py).
        self._silence_sync: SilenceSync | None = None
        if self.fanout is not None and self.page_sessions is not None:
            self.page_sessions.peers = FanOutPeers(self.fanout)
        if self.fanout is not None:
            api = SilencesApi(self.silences, self.fanout)
            self._silence_sync = SilenceSync(api, self.config.cluster.silence_sync_s)
        #: HTTP requests answered 400, by reason (server/limits.py).
        self.http_rejections = HttpRejections()
        self.registry.register(self.http_rejections)
        self._last_prune = -math.inf
        #: Relays that connect to this server (none on a relay: a relay has no cross-rank detectors to feed).
        self.relays: RelayServicer | None = None
        if self.relay is None:
            self.relays = RelayServicer(self.ingestor, self.stats, limits, self.config.relay, __version__,
                                        tokens=self.tokens, clock=clock,
                                        store_incident=self.database.put_incident)  # fmt: skip
        else:
            self.registry.register(RelayCollector(self.relay))
        extra = self.relays.method_handlers() if self.relays is not None else None
        self._servicer = IngestServicer(
            self.ingestor, self.stats, limits, __version__, tokens=self.tokens, extra_methods=extra
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._grpc_server: grpc.aio.Server | None = None
        self._health: Any = None
        self._http: HttpApi | None = None
        self._grpc_port: int | None = None
        self._sweeper: asyncio.Future[None] | None = None
        self._ticker: asyncio.Future[None] | None = None

    def _routes(self) -> tuple[Any, ...]:
        """The HTTP read routes; with cluster.peers, the read API fanned out over every replica first."""
        query = QueryApi(self).route
        local: tuple[Any, ...] = (query, Pages(self, query).route, relays_route(self.relays, self.relay))
        if self.page_sessions is not None:
            local = (*local, SessionsApi(self.page_sessions).route)
        if self.fanout is None:
            return local
        self.fanout.local = (query,)
        return (self.fanout.route, *local)

    def _without_firing_alerts(self, runs: list[RunState]) -> list[RunState]:
        """The runs limits.at_max_runs `evict_idle` may drop: eviction never resolves a firing alert."""
        firing = {run for run, _ in self.alert_book.firing_detectors()}
        return [run for run in runs if run.run_id not in firing]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> ServerApp:
        """Bind and start gRPC and HTTP; returns once both listen. OSError if a port cannot be bound."""
        if self._thread is not None:
            raise RuntimeError("ServerApp already started")
        self.keeper.restore(self.config.limits.max_runs)
        self.ingestor.sweep()  # restored runs finished past the retention leave /metrics before the first scrape
        self.silences.restore(self.database.silences())
        self._prune()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="gradwatch-grpc", daemon=True)
        self._thread.start()
        try:
            future = asyncio.run_coroutine_threadsafe(self._start_grpc(), self._loop)
            self._grpc_port = future.result(timeout=START_TIMEOUT_S)
            if self.relay is not None and not self.relay.relay_id:
                self.relay.relay_id = f"{socket.gethostname()}:{self._grpc_port}"
            http = self.config.http
            self._http = HttpApi(
                http.host,
                http.port,
                registry=self.registry,
                runs=self.runs,
                alerts=self.alerts,
                notifications=self.notifier.view,
                silences=self.silences,
                tls_context=self._http_tls_context if self._tls is not None else None,
                guard=self._guard,
                sessions=self.page_sessions,
                routes=self._routes(),
                fanout=self.fanout,
                rejections=self.http_rejections,
                max_connections=http.max_connections,
                request_timeout_s=http.request_timeout_s,
            )
            self._http.start()
            self.registry.register(HttpCollector(self._http.stats))
            self.renderer.server_url = self.config.alerting.external_url.rstrip("/") or self._default_url()
            self.notifier.start()
            if self._silence_sync is not None:
                self._silence_sync.start()
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, give open streams `grace` seconds to finish, then stop everything. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            if self._grpc_server is not None:
                future = asyncio.run_coroutine_threadsafe(self._stop_grpc(grace), loop)
                future.result(timeout=grace + 10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
        if self.relay is not None:  # after the streams ended: their last frames and goodbyes go upstream
            self.relay.stop(timeout_s=grace)
        if self._silence_sync is not None:
            self._silence_sync.stop()
        if self._http is not None:
            self._http.stop()
            self._http = None
        self.notifier.stop(timeout_s=grace)
        if self._grpc_server is not None:  # started: close open incidents and save progress
            self.recorder.close_all()
            self.keeper.checkpoint()
        self._grpc_server = None

    def __enter__(self) -> ServerApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ addresses

    @property
    def grpc_port(self) -> int:
        if self._grpc_port is None:
            raise RuntimeError("ServerApp not started")
        return self._grpc_port

    @property
    def http_port(self) -> int:
        if self._http is None:
            raise RuntimeError("ServerApp not started")
        return self._http.port

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.http_scheme}://127.0.0.1:{self.http_port}"

    @property
    def http_scheme(self) -> str:
        """ "https" when the HTTP port speaks TLS (tls.cert_file set), else "http"."""
        return "https" if self._tls is not None else "http"

    # ------------------------------------------------------------------ views

    def runs(self, *, max_ranks: int = RANKS_IN_VIEW) -> list[dict[str, Any]]:
        """Every tracked run (least recently active first) as a JSON-safe dict listing at most `max_ranks` ranks."""
        firing: dict[str, list[str]] = {}
        for run_id, detector in self.alert_book.firing_detectors():
            firing.setdefault(run_id, []).append(detector)
        return [run_view(run, firing.get(run.run_id, []), max_ranks=max_ranks) for run in self.store.snapshot()]

    def alerts(self, run: str | None = None, state: str | None = None) -> list[dict[str, Any]]:
        """Alerts in their JSON form (as /api/v1/alerts lists them), optionally for one run and/or state
        ("firing" | "resolved")."""
        return [alert.to_json() for alert in self.alert_book.list(run=run, state=state)]

    def sweep(self) -> list[str]:
        """Expire runs finished longer than the retention now (also done every SWEEP_INTERVAL_S)."""
        return self.ingestor.sweep()

    def persist(self) -> None:
        """Close incidents that are due, checkpoint runs and alerts, and apply retention when due (every sweep)."""
        self._hand_over_moved()
        self.recorder.sweep()
        self.keeper.checkpoint()
        if time.monotonic() - self._last_prune >= PRUNE_INTERVAL_S:
            self._prune()

    def _hand_over_moved(self) -> None:
        """With cluster.peers: hand over the runs whose agents (connected directly) all went quiet here for
        relay.handover_after_s while another replica saw them since: they moved (dns:/// routing), so they are
        neither stalled nor dead here. Each quiet run is asked about at most every QUIET_RECHECK_S."""
        if self.fanout is None:
            return
        now = time.monotonic()
        for run_id, seen in self.ingestor.quiet_runs(self.config.relay.handover_after_s):
            if now - self._quiet_checked.get(run_id, -math.inf) < QUIET_RECHECK_S:
                continue
            self._quiet_checked[run_id] = now
            if self.fanout.newer_elsewhere(run_id, seen) and self.ingestor.hand_over(run_id, relayed=False):
                log.info("run %r handed over: its agents moved to another replica", run_id)
        if len(self._quiet_checked) > self.config.limits.max_runs:
            self._quiet_checked.clear()

    def _prune(self) -> None:
        self._last_prune = time.monotonic()
        with self.store.lock:
            live = frozenset(run.run_id for run in self.store.runs())
        try:
            self.database.prune(keep_runs=live, series_rows=self.config.limits.ring_length)
        except Exception:
            self.database.write_errors += 1
            log.exception("pruning the database failed")

    def add_alert_listener(self, callback: AlertListener) -> None:
        """Call `callback(alert)` (an `Alert`) whenever an alert fires or resolves (on the gRPC thread)."""
        self.alert_book.add_listener(callback)

    def _http_tls_context(self) -> ssl.SSLContext:
        assert self._tls is not None
        return self._tls.http_context

    def _job_name_of(self, run_id: str) -> str:
        with self.store.lock:
            run = self.store.get(run_id)
            return run.job_name if run is not None else ""

    def _default_url(self) -> str:
        host = self.config.http.host
        if host in ("", "0.0.0.0", "::"):
            host = socket.gethostname()
        return f"{self.http_scheme}://{host}:{self.http_port}"

    # ------------------------------------------------------------------ loop thread

    def _run_loop(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _start_grpc(self) -> int:
        server, health = build_grpc_server(self._servicer, self.config.limits)
        address = f"{self.config.grpc.host}:{self.config.grpc.port}"
        try:
            if self._tls is not None:
                port = server.add_secure_port(address, self._tls.grpc_credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {address}: {exc}") from None
        await server.start()
        await health.set(INGEST_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._grpc_server, self._health = server, health
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        self._ticker = asyncio.ensure_future(self._tick_forever())
        return port

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            if self.relays is not None:
                self.relays.flush()  # relayed columns kept for their runs' batches (server/relay_coalesce.py)
            self.ingestor.sweep()
            if self.relays is not None:
                self.relays.sweep()
            try:
                # Off the loop: a checkpoint of every run and firing alert, incident closing and retention
                # pruning are SQLite transactions that must not hold up the frames of every stream.
                await asyncio.to_thread(self.persist)
            except Exception:  # the loop must keep sweeping; each part counts its own failures
                log.exception("persisting server state failed")

    async def _tick_forever(self) -> None:
        """Cross-rank detectors judge every run each TICK_INTERVAL_S, so a hang is seen while nothing arrives."""
        while True:
            await asyncio.sleep(TICK_INTERVAL_S)
            if self.relays is not None:
                self.relays.flush()  # ticks judge every report that arrived
            self.ingestor.tick()

    async def _stop_grpc(self, grace: float) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._grpc_server is not None:
            await self._grpc_server.stop(grace)


def _relay(config: ServerConfig, alerts: AlertBook, deliver: Callable[[str, int, Any], None]) -> Relay | None:
    """The relay's upstream when relay.upstream is set (ValueError for an unreadable token file), else None."""
    settings = config.relay
    if not settings.upstream:
        return None
    token = _read_token(settings.token_file, "relay.token_file")
    credentials = None
    if settings.ca_file:
        files = {}
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(settings, key)
            try:
                files[key] = Path(path).read_bytes() if path else None
            except OSError as exc:
                raise ValueError(f"relay.{key} {path!r}: {exc.strerror or exc}") from None
        credentials = grpc.ssl_channel_credentials(files["ca_file"], files["key_file"], files["cert_file"])
    return Relay(settings.upstream, relay_id=settings.relay_id, buffer_entries=settings.buffer_entries,
                 token=token, credentials=credentials, deliver=deliver, firing=alerts.export_firing,
                 max_incident_bytes=config.limits.max_message_bytes)  # fmt: skip


def _read_token(path: str, key: str) -> str:
    """The bearer token in file `path` ("" for no file); ValueError naming `key` when it cannot be read."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise ValueError(f"{key} {path!r}: {exc.strerror or exc}") from None


def _tls_summary(config: ServerConfig) -> str:
    if not config.tls.enabled:
        return "off"
    return "mutual (client certificates required on gRPC)" if config.tls.client_ca_file else "on"


def _configured_sinks(alerting: AlertingConfig) -> list[AlertSink]:
    sinks: list[AlertSink] = [AlertmanagerSink(url) for url in alerting.alertmanager_urls]
    sinks += [WebhookSink(url) for url in alerting.webhook_urls]
    if alerting.log:
        sinks.append(LogSink())
    return sinks


def _policy(alerting: AlertingConfig) -> DeliveryPolicy:
    return DeliveryPolicy(
        timeout_s=alerting.timeout_s, deadline_s=alerting.retry_deadline_s, max_pending=alerting.max_pending
    )


def serve(
    config: ServerConfig,
    *,
    alert_listener: AlertListener | None = None,
    log_format: str = "text",
    log_level: str = "INFO",
    port_file: Path | None = None,
) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT; returns the exit status.

    Must be called from the main thread (it installs signal handlers, restored on
    return). Configures logging (gradwatch.server.logs: timestamps and levels, text or
    JSON) on stderr; the first line says where it listens, and a signal is logged with
    the shutdown that follows. On a signal:
    health turns NOT_SERVING, no new streams are accepted, open streams get
    `config.shutdown_grace_s` seconds, then everything stops and 0 is returned.
    Returns 1 when a port cannot be bound, 2 when a TLS or tokens file is unusable.
    With `port_file`, once both ports listen their numbers are written there as JSON,
    `{"grpc": PORT, "http": PORT}`, by an atomic rename (so a reader never sees a partial file): how a
    caller that asked for port 0 learns the ports the system chose; a file that cannot be written stops the
    server and returns 2.
    """
    logs.configure(log_format, log_level)  # ValueError naming a bad format or level
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            app = ServerApp(config)
        except ValueError as exc:  # TLS files, the tokens file or an unusable storage.data_dir
            log.error("%s", exc)
            return 2
        if alert_listener is not None:
            app.add_alert_listener(alert_listener)
        try:
            app.start()
        except OSError as exc:
            log.error("%s", exc)
            return 1
        sinks = ", ".join(worker.name for worker in app.notifier.workers) or "none"
        log.info(
            "gradwatch server %s: gRPC on %s:%d, HTTP on %s://%s:%d (/ overview, /metrics, /api/v1); alerts to: %s; "
            "TLS: %s; tokens: %s; state in %s; %s",
            __version__, config.grpc.host, app.grpc_port, app.http_scheme, config.http.host, app.http_port, sinks,
            _tls_summary(config), config.auth.tokens_file or "off", app.database.path,
            f"relay of {', '.join(config.relay.upstream)}" if config.relay.upstream
            else f"aggregator for up to {config.relay.max_relays} relays",
        )  # fmt: skip
        if port_file is not None:
            try:
                _write_port_file(port_file, app.grpc_port, app.http_port)
            except OSError as exc:
                log.error("cannot write the port file: %s", exc)
                app.stop(grace=0)
                return 2
        while not stop.wait(1.0):
            pass
        log.info(
            "%s received: stopping (open streams get %gs to finish)",
            received[0] if received else "signal",
            config.shutdown_grace_s,
        )
        app.stop(grace=config.shutdown_grace_s)
        log.info("gradwatch server stopped; state saved in %s", app.database.path)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_port_file(path: Path, grpc_port: int, http_port: int) -> None:
    """`{"grpc": ..., "http": ...}` written to a temporary name beside `path`, then renamed into place."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"grpc": grpc_port, "http": http_port}) + "\n")
    partial.replace(path)
