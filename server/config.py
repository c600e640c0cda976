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
      max_runs: 1000                  # runs tracked; beyond, new runs are refused (see at_max_runs)
      at_max_runs: refuse             # or evict_idle: drop the least recently active run without a firing alert
      max_ranks_per_run: 16384
      max_ranks_total: 65536          # ranks over all runs
      max_repeated: 4096              # entries of any other list or map in a frame (drop reasons, attributes...)
      stream_bytes_per_s: 4194304     # per-stream byte budget (bursts of 2 × max_message_bytes)
      hello_timeout_s: 10.0           # a stream without a Hello by then ends
      idle_stream_timeout_s: 600.0    # a stream silent this long ends
      max_streams: 20000              # streams open at once
      max_layers_per_schema: 65536
      ring_length: 1024               # reports of history kept per rank
      max_layer_series_per_run: 256   # per-layer Prometheus series per run and statistic
      max_layer_series: 100000        # per-layer series per scrape, all runs (paging runs first)
      max_sessions_per_rank: 4        # agent sessions remembered for deduplication
      max_run_id_chars: 256
      alert_history: 1000             # resolved alerts kept for /api/v1/alerts
      max_job_name_chars: 256
      max_layer_name_chars: 1024      # per layer or module name in a Hello's schemas
    tls:                              # docs/security.md
      cert_file: ""                   # PEM certificate chain; with key_file: TLS on the gRPC and HTTP ports
      key_file: ""
      client_ca_file: ""              # PEM CA bundle: gRPC clients must present a certificate it signed (mTLS)
    auth:                             # docs/security.md
      tokens_file: ""                 # YAML/JSON bearer tokens; empty: no token checks
      protect_api: true               # with a tokens file: /api/v1/* needs a token with `api: true`
      protect_metrics: false          # with a tokens file: /metrics needs one too
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
    storage:
      data_dir: ""                    # SQLite in <data_dir>/gradwatch.db; "" = in memory (`serve`: ./gradwatch-data)
      incident_retention_s: 2592000.0 # 30 days
      max_incidents: 1000
      max_incident_bytes: 1073741824  # 1 GiB of stored incident windows
      run_retention_s: 2592000.0      # runs not seen for this long leave the registry
      max_runs: 10000                 # runs kept in the registry
    recorder:
      enabled: true
      window_reports: 64              # reports kept per rank before an incident
      after_reports: 16               # reports recorded after the alert fired
      after_timeout_s: 120.0          # close the incident then even if fewer arrived
      max_ranks: 16                   # ranks recorded per incident (the firing rank first)
      max_layers: 256                 # layers recorded per rank
      max_bytes: 536870912            # recorded per-layer columns, all runs together
      histogram_reports: 4            # reports before the alert whose gradient histograms are kept
    relay:                            # two tiers (docs/deployment.md): relay settings and the aggregator's limit
      upstream: []                    # aggregator replicas (host:port, dns:///name:port); set: this server is a relay
      relay_id: ""                    # this relay's name upstream; "" = <hostname>:<gRPC port>
      buffer_entries: 100000          # records kept while upstream is unreachable; the oldest are dropped beyond
      token_file: ""                  # bearer token sent upstream (an aggregator with auth.tokens_file)
      ca_file: ""                     # PEM CA of the aggregator's certificate: TLS upstream ("" = plaintext)
      cert_file: ""                   # with key_file: client certificate (aggregator with mutual TLS)
      key_file: ""
      max_relays: 1024                # aggregator: relay streams served at once; more are refused
      link_timeout_s: 10.0            # aggregator: a relay stream silent this long ends (relays beat every 1 s)
      handover_after_s: 60.0          # aggregator: a run all of whose relayed ranks left this long ago moved away
    cluster:                          # one view over all replicas (docs/deployment.md)
      peers: []                       # every replica's HTTP address (dns:///headless:9400 or host:port entries)
      token_file: ""                  # bearer token for the peers' API (replicas with auth.tokens_file)
      silence_sync_s: 15.0            # seconds between two resyncs of the silences with the peers
    detectors:
      non_finite: {enabled: true, resolve_after: 20}
      exploding_gradient: {enabled: true, window: 100, min_reports: 20, factor: 10.0,
                           mad_k: 20.0, consecutive: 2, growth_window: 16,
                           growth_rise_fraction: 0.8, growth_factor: 100.0, resolve_after: 20,
                           min_norm: 1.0e-6, log_k: 3.0, start_fraction: 0.1}
      loss_divergence: {enabled: true, window: 200, min_reports: 30, factor: 3.0, mad_k: 10.0, min_rise: 0.2,
                        duration: 10, trend_window: 80, trend_factor: 2.0, resolve_after: 20}
      loss_spike: {enabled: true, window: 200, min_reports: 30, level_window: 10, factor: 1.5, mad_k: 12.0,
                   min_rise: 0.25, resolve_after: 10}
      loss_not_decreasing: {enabled: true, window: 200, smooth: 100, start_reports: 10, min_improvement: 0.05,
                            settled: 0.7, consecutive: 10, resolve_after: 10}
      vanishing_gradient: {enabled: true, depth_ratio: 0.001, min_relative_grad: 1.0e-7, min_layers: 4,
                           min_reports: 1, consecutive: 3, resolve_after: 3, solved_fraction: 0.01,
                           start_losses: 10}
      update_ratio: {enabled: true, high: 0.3, low: 1.0e-8, window: 5, first_reports: 3, min_reports: 5,
                     zero_start_reports: 16, jump_factor: 10.0, jump_floor: 0.05, jump_reports: 2,
                     baseline_reports: 4, resolve_after: 3, solved_fraction: 0.01, start_losses: 10}
      frozen_parameters: {enabled: true, reports: 5, ignore: []}
      dead_relu: {enabled: true, dead_fraction: 0.5, min_rise: 0.3, all_dead_fraction: 0.9, window: 10,
                  clear_fraction: 0.4, consecutive: 3, min_reports: 3, resolve_after: 5,
                  module_types: [ReLU, ReLU6]}
      saturated_activation: {enabled: true, saturated_fraction: 0.5, clear_fraction: 0.4, consecutive: 3,
                             min_reports: 1, resolve_after: 5}
      activation_not_centered: {enabled: true, max_mean_to_std: 1.5, clear_mean_to_std: 1.2, consecutive: 5,
                                min_reports: 3, resolve_after: 5}
      input_not_normalized: {enabled: true, max_abs_mean: 0.5, max_mean_to_std: 1.0, max_rms: 10.0,
                             min_rms: 0.001, clear_factor: 0.8, consecutive: 3, resolve_after: 5}
      poor_weight_init: {enabled: true, start_reports: 5, consecutive: 2, max_std_ratio: 100.0,
                         max_symmetry: 0.001, resolve_after: 5}
      output_collapse: {enabled: true, min_relative_spread: 0.01, clear_relative_spread: 0.02,
                        consecutive: 3, min_reports: 1, resolve_after: 5}
      class_imbalance: {enabled: true, min_ratio: 0.1, clear_ratio: 0.15, min_samples: 500,
                        min_per_class: 20.0, max_classes: 1024}
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
import json
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
    "ENV_AUTH_TOKENS_FILE",
    "ENV_CONFIG",
    "ENV_DATA_DIR",
    "ENV_EXTERNAL_URL",
    "ENV_GRPC_HOST",
    "ENV_GRPC_PORT",
    "ENV_HTTP_HOST",
    "ENV_HTTP_PORT",
    "ENV_TLS_CERT_FILE",
    "ENV_TLS_CLIENT_CA_FILE",
    "ENV_TLS_KEY_FILE",
    "ENV_WEBHOOK_URLS",
    "AlertingConfig",
    "AuthConfig",
    "ClusterConfig",
    "GrpcConfig",
    "HttpConfig",
    "LimitsConfig",
    "RecorderConfig",
    "RelayConfig",
    "ServerConfig",
    "StorageConfig",
    "TlsConfig",
    "config_from_args",
    "load_config",
    "run_detector_configs",
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
ENV_TLS_CERT_FILE = "GRADWATCH_TLS_CERT_FILE"
ENV_TLS_KEY_FILE = "GRADWATCH_TLS_KEY_FILE"
ENV_TLS_CLIENT_CA_FILE = "GRADWATCH_TLS_CLIENT_CA_FILE"
ENV_AUTH_TOKENS_FILE = "GRADWATCH_AUTH_TOKENS_FILE"
ENV_DATA_DIR = "GRADWATCH_DATA_DIR"
ENV_UPSTREAM = "GRADWATCH_UPSTREAM"  # comma-separated aggregator replicas: run as a relay
ENV_PEERS = "GRADWATCH_PEERS"  # comma-separated replicas' HTTP addresses: one view over all of them
#: Where `gradwatch serve` keeps its database when neither the file, the environment nor --data-dir says.
DEFAULT_DATA_DIR = "gradwatch-data"

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
    max_connections: int = setting(
        512, doc="Open HTTP connections at most; a connection beyond gets 503 and is closed.", ge=1, le=65536
    )
    request_timeout_s: float = setting(
        10.0,
        doc="Seconds a connection gets to send a complete request (from connecting or its previous response); "
        "then it is closed, so a half-sent or idle request holds no resources.",
        gt=0.0,
        le=3600.0,
    )


#: limits.at_max_runs values: what a Hello for a new run meets when limits.max_runs runs are tracked.
RUN_LIMIT_POLICIES = ("refuse", "evict_idle")


@dataclass(frozen=True)
class LimitsConfig(Settings):
    """Every bound on what agents can make the server hold or do (docs/security.md lists them)."""

    max_message_bytes: int = setting(
        4 * MiB,
        doc="Largest frame (or Flush request) accepted; larger ones get RESOURCE_EXHAUSTED.",
        ge=1024,
        le=256 * MiB,
    )
    max_runs: int = setting(
        1000, doc="Runs tracked (finished runs past their retention are dropped first).", ge=1, le=1_000_000
    )
    at_max_runs: str = setting(
        "refuse",
        doc="With max_runs runs tracked, a new run is refused (RESOURCE_EXHAUSTED `run_limit_reached`), or with "
        "`evict_idle` the least recently active run without a firing alert or an open stream is dropped from "
        "memory (its registry row, job binding and settings stay in the database) and refused only when none is.",
    )
    max_ranks_per_run: int = setting(16384, doc="Largest world_size accepted in a Hello.", ge=1, le=1 << 20)
    max_ranks_total: int = setting(
        65536,
        doc="Ranks held over all runs; a Hello for one more rank is refused (`rank_limit_reached`).",
        ge=1,
        le=1 << 24,
    )
    max_layers_per_schema: int = setting(65536, doc="Most layers accepted in a Hello's schema.", ge=1, le=1 << 20)
    ring_length: int = setting(1024, doc="Reports of history kept per rank (fixed memory).", ge=16, le=1 << 16)
    max_layer_series_per_run: int = setting(
        256, doc="Layers exported per run and statistic (first in schema order).", ge=0, le=1 << 16
    )
    max_layer_series: int = setting(
        100_000,
        doc="Per-layer series in one /metrics scrape, over all runs and per-layer families: runs with a firing "
        "alert first (critical, then warning, then info), then the rest, oldest run first; a run that does not "
        "fit whole keeps its first layers in schema order; the rest are left out, counted in "
        'gradwatch_layer_series_omitted{reason="max_layer_series"}.',
        ge=0,
        le=1 << 24,
    )
    max_sessions_per_rank: int = setting(4, doc="Agent sessions per rank remembered for dedup.", ge=1, le=1024)
    max_run_id_chars: int = setting(256, doc="Longest run id accepted.", ge=1, le=4096)
    alert_history: int = setting(1000, doc="Resolved alerts kept for the API.", ge=0, le=1_000_000)
    max_job_name_chars: int = setting(256, doc="Longest job name accepted.", ge=1, le=4096)
    max_layer_name_chars: int = setting(1024, doc="Longest layer or module name accepted in a schema.", ge=1, le=65536)
    max_repeated: int = setting(
        4096,
        doc="Entries of any list or map a frame may carry besides the layer schemas (heartbeat drop reasons, "
        "event attributes, learning rates, input and label columns); more: INVALID_ARGUMENT `too_many_entries`.",
        ge=16,
        le=1 << 20,
    )
    stream_bytes_per_s: int = setting(
        4 * MiB,
        doc="Bytes per second one stream's frames may average; a stream over budget is paused (its reads wait), "
        "so one sender cannot starve the others. Bursts up to 2 × max_message_bytes pass at once.",
        ge=64 * 1024,
        le=1 << 34,
    )
    hello_timeout_s: float = setting(
        10.0,
        doc="A stream that has not sent its Hello after this long ends (DEADLINE_EXCEEDED `hello_timeout`).",
        gt=0.0,
        le=3600.0,
    )
    idle_stream_timeout_s: float = setting(
        600.0,
        doc="A stream that sent no frame for this long ends (`idle_timeout`); agents heartbeat every 5 s.",
        gt=0.0,
        le=86400.0,
    )
    max_streams: int = setting(
        20000,
        doc="Streams open at once; one more is refused (RESOURCE_EXHAUSTED `stream_limit_reached`).",
        ge=1,
        le=1_000_000,
    )

    def _check(self) -> None:
        if self.at_max_runs not in RUN_LIMIT_POLICIES:
            allowed = ", ".join(RUN_LIMIT_POLICIES)
            raise SettingError("at_max_runs", f"must be one of {allowed}, got {self.at_max_runs!r}")

    @property
    def grpc_receive_bytes(self) -> int:
        """gRPC's own receive limit: above ours, so oversized frames up to it reach our (counted) check; core
        refuses longer ones from their length prefix, unbuffered (docs/security.md, "Frames above gRPC's
        ceiling": lifting it would let any stream make the server buffer up to 4 GiB)."""
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
    runbook_base_url: str = setting(DEFAULT_RUNBOOK_BASE_URL, doc="Alerts' runbook_url is this + '<detector>.md'.")
    resend_interval_s: float = setting(
        60.0, doc="Firing alerts are re-sent this often; endsAt is 4 × this ahead.", gt=0.0
    )
    timeout_s: float = setting(5.0, doc="Timeout of one delivery request.", gt=0.0)
    retry_deadline_s: float = setting(
        60.0, doc="Seconds a failing delivery is retried (with backoff) before it counts as failed.", ge=0.0
    )
    max_pending: int = setting(
        10000, doc="Notifications waiting per sink; beyond, new ones are dropped.", ge=1, le=1_000_000
    )

    def _check(self) -> None:
        for key in ("alertmanager_urls", "webhook_urls"):
            urls: tuple[str, ...] = getattr(self, key)
            for url in urls:
                _check_url(key, url)
            if len(set(urls)) != len(urls):
                raise SettingError(key, f"lists a URL twice: {list(urls)!r}")
        if self.external_url:
            _check_url("external_url", self.external_url)


@dataclass(frozen=True)
class TlsConfig(Settings):
    """TLS on the gRPC and HTTP ports (see docs/security.md); the files are read at start-up."""

    cert_file: str = setting("", doc="PEM certificate chain of this server; with key_file, both ports speak TLS.")
    key_file: str = setting("", doc="PEM private key of cert_file.")
    client_ca_file: str = setting(
        "", doc="PEM CA bundle; gRPC clients must present a certificate signed by it (mutual TLS)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def _check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise SettingError(missing, "cert_file and key_file are set together")
        if self.client_ca_file and not self.cert_file:
            raise SettingError("client_ca_file", "mutual TLS needs cert_file and key_file too")


@dataclass(frozen=True)
class AuthConfig(Settings):
    """Bearer tokens for agents and the HTTP API (see docs/security.md for the file format)."""

    tokens_file: str = setting(
        "", doc="YAML or JSON file of bearer tokens, re-read when it changes; empty: no token checks."
    )
    protect_api: bool = setting(True, doc="With a tokens file: /api/v1/* needs a token with `api: true`.")
    protect_metrics: bool = setting(False, doc="With a tokens file: /metrics needs a token with `api: true`.")


@dataclass(frozen=True)
class StorageConfig(Settings):
    """The embedded database: run registry, firing alerts and incidents survive a restart (docs/incidents.md)."""

    data_dir: str = setting(
        "",
        doc="Directory of the SQLite database (gradwatch.db); empty: in memory, nothing survives a restart. "
        "`gradwatch serve` defaults it to ./gradwatch-data.",
    )
    incident_retention_s: float = setting(30 * 86400.0, doc="Incidents older than this are pruned.", gt=0.0)
    max_incidents: int = setting(1000, doc="Incidents kept; the oldest are pruned beyond.", ge=1, le=1_000_000)
    max_incident_bytes: int = setting(
        1 << 30,
        doc="Bytes of stored incident windows kept; the oldest incidents are pruned beyond.",
        ge=MiB,
        le=1 << 40,
    )
    run_retention_s: float = setting(
        30 * 86400.0, doc="Runs not seen for this long leave the registry (with their resolved alerts).", gt=0.0
    )
    max_runs: int = setting(
        10000, doc="Runs kept in the registry; the least recently seen are pruned beyond.", ge=1, le=10_000_000
    )


@dataclass(frozen=True)
class RecorderConfig(Settings):
    """The flight recorder: a bounded window of recent reports per rank, frozen into an incident on an alert."""

    enabled: bool = setting(True, doc="Record incidents when a warning or critical alert fires.")
    window_reports: int = setting(64, doc="Reports kept per rank (the window before an incident).", ge=1, le=4096)
    after_reports: int = setting(16, doc="Reports recorded after the alert fired.", ge=0, le=4096)
    after_timeout_s: float = setting(
        120.0, doc="Seconds after which an incident closes even if fewer reports arrived.", gt=0.0
    )
    max_ranks: int = setting(
        16, doc="Ranks recorded per incident: the firing rank first, then the lowest.", ge=1, le=1024
    )
    max_layers: int = setting(256, doc="Layers (and modules) recorded per rank, first in schema order.", ge=1, le=65536)
    max_bytes: int = setting(
        512 * MiB,
        doc="Memory for recorded per-layer columns, all runs together; with many ranks each keeps fewer "
        "full-statistics reports (at least its latest).",
        ge=MiB,
        le=1 << 36,
    )
    histogram_reports: int = setting(
        4, doc="Full-statistics reports before the alert whose gradient histograms are kept (all after it).", ge=0
    )


@dataclass(frozen=True)
class RelayConfig(Settings):
    """Two tiers (ARCHITECTURE.md): a relay runs the per-rank work and forwards compact records upstream; an
    aggregator runs the cross-rank work for every relay that connects."""

    upstream: tuple[str, ...] = setting(
        (),
        doc="Aggregator replicas (host:port entries or dns:///name:port); each run goes to the replica its id "
        "hashes to. Set: this server is a relay. Empty: it serves agents and relays itself.",
    )
    relay_id: str = setting("", doc="This relay's name at the aggregator; empty: <hostname>:<gRPC port>.")
    buffer_entries: int = setting(
        100_000,
        doc="Compact records and alert transitions kept while upstream is unreachable or slow; beyond, the oldest "
        "are dropped and counted (gradwatch_relay_dropped_entries_total{reason='buffer_full'}).",
        ge=16,
        le=10_000_000,
    )
    token_file: str = setting("", doc="File holding the bearer token sent upstream; empty: none.")
    ca_file: str = setting(
        "", doc="PEM CA bundle that signed the aggregator's certificate: TLS to upstream. Empty: plaintext."
    )
    cert_file: str = setting("", doc="With ca_file: this relay's client certificate (an aggregator with mutual TLS).")
    key_file: str = setting("", doc="The private key of cert_file.")
    max_relays: int = setting(
        1024, doc="Aggregator: relay streams served at once; more are refused (relay_limit_reached).", ge=1
    )
    link_timeout_s: float = setting(
        10.0,
        doc="Aggregator: a relay stream silent this long ends (relays send a batch or a heartbeat every second), "
        "so the ranks of a relay cut off without a TCP reset leave their runs.",
        gt=0.0,
    )
    handover_after_s: float = setting(
        60.0,
        doc="Aggregator: a run every rank of which left with its relay (the link ended) and none came back for "
        "this long moved to another replica: it expires here and its alerts end without a resolution paged.",
        ge=0.0,
    )

    def _check(self) -> None:
        if bool(self.cert_file) != bool(self.key_file) or (self.cert_file and not self.ca_file):
            raise SettingError("cert_file", "a client certificate needs key_file and ca_file too")
        for entry in self.upstream:
            host, _, port = entry.removeprefix("dns:///").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingError("upstream", f"entries are host:port or dns:///name:port, got {entry!r}")


@dataclass(frozen=True)
class ClusterConfig(Settings):
    """One view over all replicas: the read API answered for every replica (server/fanout.py)."""

    peers: tuple[str, ...] = setting(
        (),
        doc="Every replica's HTTP address: dns:///<headless Service>:<http port> (its ready pods) or host:port "
        "entries. Set: the read API (/api/v1/runs, /alerts, /incidents and their items) and the HTML pages "
        "answer for all of them.",
    )
    token_file: str = setting("", doc="File holding the bearer token for the peers' API; empty: none.")
    silence_sync_s: float = setting(
        15.0,
        doc="Seconds between two resyncs of this replica's silences with the peers' (at start-up, then at this "
        "interval): a replica that was down when a silence was made or ended catches up.",
        gt=0.0,
        le=3600.0,
    )

    def _check(self) -> None:
        for entry in self.peers:
            host, _, port = entry.removeprefix("dns:///").rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise SettingError("peers", f"entries are host:port or dns:///name:port, got {entry!r}")


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
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    recorder: RecorderConfig = field(default_factory=RecorderConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
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


def run_detector_configs(config: ServerConfig, settings: Mapping[str, str]) -> Mapping[str, DetectorConfig]:
    """Every detector's settings for one run: `config`'s, with an agent's per-run `settings` on top
    ("detector.setting" -> JSON value, Hello.detector_settings). Checked like the YAML file: SettingError names
    the dotted key (detectors.<name>.<setting>) of the first unknown detector or setting or bad value."""
    per_detector: dict[str, dict[str, Any]] = {}
    for key, text in sorted(settings.items()):
        detector, _, name = key.partition(".")
        if not detector or not name:
            raise SettingError(f"detectors.{key}", "expected a key of the form detector.setting")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise SettingError(f"detectors.{key}", f"value {text!r} is not JSON") from None
        per_detector.setdefault(detector, {})[name] = value
    known = {spec.name: spec for spec in REGISTRY}
    merged = dict(config.detectors)
    for detector, values in per_detector.items():
        spec = known.get(detector)
        if spec is None:
            raise SettingError(f"detectors.{detector}", f"unknown detector (known: {', '.join(known)})")
        base = config.detectors[detector]
        current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        merged[detector] = load_settings(spec.config_type, {**current, **values}, f"detectors.{detector}")
    return types.MappingProxyType(merged)


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
    data_dir: str | None = None,
    upstream: Sequence[str] | None = None,
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
    # The TLS files are overridden together: a cert from the environment needs its key from there too.
    tls_env = {name: env[var] for name, var in _TLS_ENV.items() if env.get(var)}
    try:
        tls = dataclasses.replace(config.tls, **tls_env)
    except SettingError as exc:
        raise ValueError(f"tls.{exc.key}: {exc.problem}") from None
    auth = _override(config.auth, "tokens_file", env.get(ENV_AUTH_TOKENS_FILE), ENV_AUTH_TOKENS_FILE)
    storage = config.storage
    if not storage.data_dir:
        storage = _override(storage, "data_dir", DEFAULT_DATA_DIR, "data_dir")
    storage = _override(storage, "data_dir", env.get(ENV_DATA_DIR), ENV_DATA_DIR)
    storage = _override(storage, "data_dir", data_dir, "data_dir")
    relay = _override(config.relay, "upstream", _env_list(env, ENV_UPSTREAM), ENV_UPSTREAM)
    relay = _override(relay, "upstream", _tuple(upstream), "upstream")
    cluster = _override(config.cluster, "peers", _env_list(env, ENV_PEERS), ENV_PEERS)
    return dataclasses.replace(config, grpc=grpc_cfg, http=http_cfg, alerting=alerting, tls=tls, auth=auth,
                               storage=storage, relay=relay, cluster=cluster)  # fmt: skip


_TLS_ENV = {"cert_file": ENV_TLS_CERT_FILE, "key_file": ENV_TLS_KEY_FILE, "client_ca_file": ENV_TLS_CLIENT_CA_FILE}


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
