"""Server configuration: one frozen schema with documented defaults, one YAML file, env vars.

Precedence, lowest first: the defaults below < the YAML file (`--config FILE` or
$GRADWATCH_CONFIG) < environment variables < explicit arguments (the CLI flags).
Every mistake (unknown key, wrong type, out of range, unreadable file, bad env
value) raises ValueError at start-up naming the key; nothing is checked later.

YAML shape (every key optional; these are the defaults)::

    grpc: {host: 0.0.0.0, port: 50051}
    http: {host: 0.0.0.0, port: 9400}
    shutdown_grace_s: 5.0
    finished_run_retention_s: 300.0
    full_stats_on_alert_steps: 50
    limits:
      max_message_bytes: 4194304      # 4 MiB, per frame (and per Flush request)
      max_runs: 1000                  # least-recently-active run evicted beyond this
      max_ranks_per_run: 16384
      max_layers_per_schema: 65536
      ring_length: 1024               # reports of history kept per rank
      max_layer_series_per_run: 256   # per-layer Prometheus series per run and statistic
      max_sessions_per_rank: 4        # agent sessions remembered for deduplication
      max_run_id_chars: 256
      alert_history: 1000             # resolved alerts kept for /api/v1/alerts
    alerting:
      alertmanager_urls: []           # POST /api/v2/alerts to each (Alertmanager replicas)
      webhook_urls: []                # generic JSON webhooks
      log: true                       # log every notification (logger gradwatch.alerts)
      external_url: ""                # this server as users reach it; "" = http://<hostname>:<http port>
      runbook_base_url: https://github.com/gradwatch/gradwatch/blob/main/docs/runbooks/
      resend_interval_s: 60.0
      timeout_s: 5.0
      retry_deadline_s: 60.0
      max_pending: 10000
    detectors:
      non_finite: {enabled: true, resolve_after: 20}
      exploding_gradient: {enabled: true, window: 100, min_reports: 20, factor: 10.0,
                           mad_k: 20.0, consecutive: 2, growth_window: 16,
                           growth_rise_fraction: 0.8, growth_factor: 100.0, resolve_after: 20}
      rank_divergence: {enabled: true, z_threshold: 6.0, rel_floor: 0.1, abs_floor: 1.0e-6,
                        consecutive: 5, resolve_after: 20, min_ranks: 3}
      replica_mismatch: {enabled: true, resolve_after: 1}
      straggler: {enabled: true, threshold: 0.75, min_reports: 8, consecutive: 10, resolve_after: 10}
      stalled: {enabled: true, floor_s: 300.0, factor: 20.0, silent_after_s: 30.0}
      throughput_drop: {enabled: true, ratio: 0.5, window: 200, min_steps: 30, recent: 5,
                        consecutive: 10, sustain_s: 60.0, resolve_after: 10}
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from gradwatch.server.detectors import REGISTRY, DetectorConfig
from gradwatch.server.settings import SettingError, Settings, load_settings, setting

__all__ = [
    "DEFAULT_RUNBOOK_BASE_URL",
    "ENV_ALERTMANAGER_URLS",
    "ENV_CONFIG",
    "ENV_EXTERNAL_URL",
    "ENV_GRPC_HOST",
    "ENV_GRPC_PORT",
    "ENV_HTTP_HOST",
    "ENV_HTTP_PORT",
    "ENV_WEBHOOK_URLS",
    "AlertingConfig",
    "GrpcConfig",
    "HttpConfig",
    "LimitsConfig",
    "ServerConfig",
    "config_from_args",
    "load_config",
]

# The server's environment variables, all of them (the agent declares its own).
ENV_CONFIG = "GRADWATCH_CONFIG"  # path of the YAML file
ENV_GRPC_HOST = "GRADWATCH_GRPC_HOST"
ENV_GRPC_PORT = "GRADWATCH_GRPC_PORT"
ENV_HTTP_HOST = "GRADWATCH_HTTP_HOST"
ENV_HTTP_PORT = "GRADWATCH_HTTP_PORT"
ENV_ALERTMANAGER_URLS = "GRADWATCH_ALERTMANAGER_URLS"  # comma-separated
ENV_WEBHOOK_URLS = "GRADWATCH_WEBHOOK_URLS"  # comma-separated
ENV_EXTERNAL_URL = "GRADWATCH_EXTERNAL_URL"

#: Where alerts' runbook_url points by default (+ "<detector>.md"): the runbooks in this repository.
#: Teams that host their own copy set alerting.runbook_base_url (and regenerate deploy/ with
#: scripts/gen_deploy.py --runbook-base-url).
DEFAULT_RUNBOOK_BASE_URL = "https://github.com/gradwatch/gradwatch/blob/main/docs/runbooks/"

MiB = 1 << 20


@dataclass(frozen=True)
class GrpcConfig(Settings):
    host: str = setting("0.0.0.0", doc="Interface the gRPC ingest server binds.")
    port: int = setting(50051, doc="gRPC port; 0 picks a free one.", ge=0, le=65535)


@dataclass(frozen=True)
class HttpConfig(Settings):
    host: str = setting("0.0.0.0", doc="Interface the HTTP server (/metrics, /api/v1) binds.")
    port: int = setting(9400, doc="HTTP port; 0 picks a free one.", ge=0, le=65535)


@dataclass(frozen=True)
class LimitsConfig(Settings):
    max_message_bytes: int = setting(
        4 * MiB, doc="Largest frame (or Flush request) accepted; larger ones get RESOURCE_EXHAUSTED.", ge=1024
    )
    max_runs: int = setting(1000, doc="Runs tracked; the least recently active is evicted beyond.", ge=1)
    max_ranks_per_run: int = setting(16384, doc="Largest world_size accepted in a Hello.", ge=1)
    max_layers_per_schema: int = setting(65536, doc="Most layers accepted in a Hello's schema.", ge=1)
    ring_length: int = setting(1024, doc="Reports of history kept per rank (fixed memory).", ge=16)
    max_layer_series_per_run: int = setting(
        256, doc="Layers exported per run and statistic (first in schema order).", ge=0
    )
    max_sessions_per_rank: int = setting(4, doc="Agent sessions per rank remembered for dedup.", ge=1)
    max_run_id_chars: int = setting(256, doc="Longest run id accepted.", ge=1)
    alert_history: int = setting(1000, doc="Resolved alerts kept for the API.", ge=0)

    @property
    def grpc_receive_bytes(self) -> int:
        """gRPC's own receive limit: above ours, so oversized frames reach our (counted) check."""
        return 2 * self.max_message_bytes + MiB


@dataclass(frozen=True)
class AlertingConfig(Settings):
    """Where alert notifications go and how they are delivered (see docs/alerting.md)."""

    alertmanager_urls: tuple[str, ...] = setting(
        (), doc="Alertmanager base URLs; alerts are POSTed to <url>/api/v2/alerts on every one."
    )
    webhook_urls: tuple[str, ...] = setting((), doc="Generic JSON webhooks that get every notification.")
    log: bool = setting(True, doc="Log every notification on the 'gradwatch.alerts' logger.")
    external_url: str = setting(
        "", doc="This server's URL as users reach it (alert links); empty: http://<hostname>:<http port>."
    )
    runbook_base_url: str = setting(
        DEFAULT_RUNBOOK_BASE_URL, doc="Alerts' runbook_url is this + '<detector>.md'."
    )
    resend_interval_s: float = setting(
        60.0, doc="Firing alerts are re-sent this often; endsAt is 4 × this ahead.", gt=0.0
    )
    timeout_s: float = setting(5.0, doc="Timeout of one delivery request.", gt=0.0)
    retry_deadline_s: float = setting(
        60.0, doc="Seconds a failing delivery is retried (with backoff) before it counts as failed.", ge=0.0
    )
    max_pending: int = setting(10000, doc="Notifications waiting per sink; beyond, new ones are dropped.", ge=1)

    def _check(self) -> None:
        for key in ("alertmanager_urls", "webhook_urls"):
            urls: tuple[str, ...] = getattr(self, key)
            for url in urls:
                _check_url(key, url)
            if len(set(urls)) != len(urls):
                raise SettingError(key, f"lists a URL twice: {list(urls)!r}")
        if self.external_url:
            _check_url("external_url", self.external_url)


def _check_url(key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(key, f"must be an http(s) URL with a host, got {url!r}")


def _default_detectors() -> Mapping[str, DetectorConfig]:
    return types.MappingProxyType({spec.name: spec.config_type() for spec in REGISTRY})


@dataclass(frozen=True)
class ServerConfig(Settings):
    """Everything the server needs to start. Frozen; build variants with `dataclasses.replace`."""

    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    alerting: AlertingConfig = field(default_factory=AlertingConfig)
    shutdown_grace_s: float = setting(5.0, doc="On SIGTERM, seconds open streams get to finish.", ge=0.0)
    finished_run_retention_s: float = setting(
        300.0,
        doc="After every rank said Goodbye, seconds the run stays in /metrics with its alerts firing "
        "(so scrapes see the final state and a crash-time alert still pages); then its alerts resolve.",
        ge=0.0,
    )
    full_stats_on_alert_steps: int = setting(
        50,
        doc="When a rank starts firing, ask its agent for full statistics for this many steps (0: never).",
        ge=0,
    )
    #: Detector name -> its config; every registered detector has an entry.
    detectors: Mapping[str, DetectorConfig] = field(default_factory=_default_detectors)

    def _check(self) -> None:
        missing = [spec.name for spec in REGISTRY if spec.name not in self.detectors]
        if missing:
            raise SettingError("detectors", f"no settings for {', '.join(missing)}")

    @classmethod
    def local(cls, *, grpc_port: int = 0, http_port: int = 0) -> ServerConfig:
        """Loopback only; port 0 picks a free one at start. For embedded servers (demo, tests), which
        watch alerts through listeners, so the log sink is off."""
        return cls(
            grpc=GrpcConfig(host="127.0.0.1", port=grpc_port),
            http=HttpConfig(host="127.0.0.1", port=http_port),
            alerting=AlertingConfig(log=False),
        )

    def detector(self, name: str) -> DetectorConfig:
        """The settings of the registered detector `name`."""
        return self.detectors[name]


def load_config(data: Any, *, source: str = "config") -> ServerConfig:
    """Build a ServerConfig from a parsed YAML document (a mapping, or None for defaults).

    Raises ValueError naming the dotted key of the first problem, prefixed by `source`.
    """
    try:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise SettingError("<top>", f"must be a mapping, got {type(data).__name__}")
        rest = dict(data)
        detectors = _load_detectors(rest.pop("detectors", None))
        base = load_settings(ServerConfig, rest, "")
        return dataclasses.replace(base, detectors=detectors)
    except SettingError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _load_detectors(data: Any) -> Mapping[str, DetectorConfig]:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SettingError("detectors", f"must be a mapping, got {type(data).__name__}")
    known = {spec.name: spec for spec in REGISTRY}
    for name in data:
        if name not in known:
            raise SettingError(f"detectors.{name}", f"unknown detector (known: {', '.join(known)})")
    return types.MappingProxyType(
        {name: load_settings(spec.config_type, data.get(name), f"detectors.{name}") for name, spec in known.items()}
    )


def load_config_file(path: str | os.PathLike[str]) -> ServerConfig:
    """Read and validate one YAML file; ValueError on unreadable files, bad YAML or bad settings."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    return load_config(data, source=str(path))


def config_from_args(
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    config_file: str | os.PathLike[str] | None = None,
    host: str | None = None,
    grpc_host: str | None = None,
    http_host: str | None = None,
    alertmanager_urls: Sequence[str] | None = None,
    webhook_urls: Sequence[str] | None = None,
    external_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """The ServerConfig for `gradwatch serve`: defaults < YAML file < env vars < arguments.

    `config_file` defaults to $GRADWATCH_CONFIG; `environ` to os.environ (injectable for tests).
    `host` binds both servers; `grpc_host` / `http_host` override it for one of them. URL lists
    given as arguments (or env vars, comma-separated) replace the file's lists; they do not extend them.
    """
    env = os.environ if environ is None else environ
    path = config_file if config_file is not None else env.get(ENV_CONFIG) or None
    config = load_config_file(path) if path is not None else ServerConfig()

    grpc_cfg, http_cfg = config.grpc, config.http
    grpc_cfg = _override(grpc_cfg, "host", env.get(ENV_GRPC_HOST), ENV_GRPC_HOST)
    grpc_cfg = _override(grpc_cfg, "port", _env_int(env, ENV_GRPC_PORT), ENV_GRPC_PORT)
    http_cfg = _override(http_cfg, "host", env.get(ENV_HTTP_HOST), ENV_HTTP_HOST)
    http_cfg = _override(http_cfg, "port", _env_int(env, ENV_HTTP_PORT), ENV_HTTP_PORT)
    grpc_cfg = _override(grpc_cfg, "host", host, "host")
    http_cfg = _override(http_cfg, "host", host, "host")
    grpc_cfg = _override(grpc_cfg, "host", grpc_host, "grpc_host")
    grpc_cfg = _override(grpc_cfg, "port", grpc_port, "grpc_port")
    http_cfg = _override(http_cfg, "host", http_host, "http_host")
    http_cfg = _override(http_cfg, "port", http_port, "http_port")
    alerting = config.alerting
    alerting = _override(alerting, "alertmanager_urls", _env_list(env, ENV_ALERTMANAGER_URLS), ENV_ALERTMANAGER_URLS)
    alerting = _override(alerting, "webhook_urls", _env_list(env, ENV_WEBHOOK_URLS), ENV_WEBHOOK_URLS)
    alerting = _override(alerting, "external_url", env.get(ENV_EXTERNAL_URL), ENV_EXTERNAL_URL)
    alerting = _override(alerting, "alertmanager_urls", _tuple(alertmanager_urls), "alertmanager_url")
    alerting = _override(alerting, "webhook_urls", _tuple(webhook_urls), "webhook_url")
    alerting = _override(alerting, "external_url", external_url, "external_url")
    return dataclasses.replace(config, grpc=grpc_cfg, http=http_cfg, alerting=alerting)


def _tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if not values else tuple(values)


def _env_list(env: Mapping[str, str], var: str) -> tuple[str, ...] | None:
    raw = env.get(var)
    if not raw:
        return None
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _override(section: Any, name: str, value: Any, source: str) -> Any:
    """`section` with `name` replaced by `value` (unless None); ValueError naming `source`."""
    if value is None or value == "":
        return section
    try:
        return dataclasses.replace(section, **{name: value})
    except SettingError as exc:
        raise ValueError(f"{source}: {exc.problem}") from None


def _env_int(env: Mapping[str, str], var: str) -> int | None:
    raw = env.get(var)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {var} must be an integer, got {raw!r}") from None
