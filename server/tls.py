"""TLS material of the server: read and checked at start-up, reloaded when the files change (docs/security.md).

`load_server_tls(config.tls)` reads the PEM files named in the config and returns a `ServerTls` holding
the gRPC server credentials and the ssl context of the HTTP port, or None when TLS is off. Every problem
(an unreadable file, a file that is not PEM, a key that does not match its certificate, a CA bundle without
certificates) is a ValueError naming the config key, raised before any port is bound.

Rotation: the files' inode, size and modification time are checked at most once per
RELOAD_CHECK_INTERVAL_S, when a connection arrives (gRPC asks before every handshake; the HTTP server
before wrapping each connection). Changed files are read and checked as at start-up; new connections then
use them, open ones keep theirs. A set that fails the checks (say, the certificate is written before its
key) is counted (`gradwatch_tls_reloads_total{result="error"}`), logged once, and the previous material
stays in force; the next change is tried again.

Mutual TLS (`client_ca_file`) applies to the gRPC port, where agents connect. The HTTP port serves
/metrics, /healthz and the API over TLS without asking for client certificates: Kubernetes HTTPS probes
cannot present one, and the API is protected by bearer tokens instead (server/auth.py).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.config import TlsConfig

__all__ = ["RELOAD_CHECK_INTERVAL_S", "ServerTls", "TlsCollector", "load_server_tls"]

log = logging.getLogger(__name__)

#: How often the certificate files are checked for a change (a stat, on a connection after this long).
RELOAD_CHECK_INTERVAL_S = 1.0
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class _Material:
    """One checked version of the files."""

    cert: bytes
    key: bytes
    ca: bytes | None
    http_context: ssl.SSLContext

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"tls.{key}: {path!r} is not a PEM file")
    return data


def _load(config: TlsConfig) -> _Material:
    cert = _read("cert_file", config.cert_file)
    key = _read("key_file", config.key_file)
    if _PEM_CERT not in cert:
        raise ValueError(f"tls.cert_file: {config.cert_file!r} holds no PEM certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ValueError(
                f"tls.key_file: {config.key_file!r} is not the private key of tls.cert_file {config.cert_file!r}"
            ) from None
        raise ValueError(
            f"tls.cert_file/tls.key_file: cannot load {config.cert_file!r} with {config.key_file!r}: {exc}"
        ) from None
    if (_read("cert_file", config.cert_file), _read("key_file", config.key_file)) != (cert, key):
        raise ValueError("tls.cert_file/tls.key_file: changed while being read")  # mid-rotation: retried
    ca: bytes | None = None
    if config.client_ca_file:
        ca = _read("client_ca_file", config.client_ca_file)
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"tls.client_ca_file: {config.client_ca_file!r} holds no usable CA: {exc}") from None
    return _Material(cert, key, ca, context)


class ServerTls:
    """The server's TLS material and its reloading (see the module docstring). Thread-safe."""

    def __init__(self, config: TlsConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._material = _load(config)  # loud at start-up
        self._served_generation = 1  # the generation gRPC was last handed
        self._checked_at = clock()
        self.generation = 1
        self.reloads = {"ok": 0, "error": 0}
        self.grpc_credentials = grpc.dynamic_ssl_server_credentials(
            self._material.grpc_configuration(),
            self._grpc_fetch,
            require_client_authentication=self.mutual,
        )

    @property
    def mutual(self) -> bool:
        return bool(self._config.client_ca_file)

    @property
    def http_context(self) -> ssl.SSLContext:
        """The context for the next HTTP connection (after a check for changed files)."""
        self._maybe_reload()
        return self._material.http_context

    def _paths(self) -> list[str]:
        return [p for p in (self._config.cert_file, self._config.key_file, self._config.client_ca_file) if p]

    def _stat(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, self._paths()))
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = self._clock()
        with self._lock:
            if now - self._checked_at < RELOAD_CHECK_INTERVAL_S:
                return
            self._checked_at = now
            signature = self._stat()
            if signature == self._signature:
                return
            self._signature = signature  # one attempt per change, counted once
            try:
                material = _load(self._config)
            except ValueError as exc:
                self.reloads["error"] += 1
                log.error("keeping the previous TLS certificate: %s", exc)
                return
            self._material = material
            self.generation += 1
            self.reloads["ok"] += 1
            log.info("TLS certificate files reloaded (%s)", ", ".join(self._paths()))

    def _grpc_fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's per-handshake callback: new configuration after a reload, else None (no change)."""
        try:
            self._maybe_reload()
            with self._lock:
                if self._served_generation == self.generation:
                    return None
                self._served_generation = self.generation
                return self._material.grpc_configuration()
        except Exception:  # a bug here must not break handshakes: keep the current certificate
            log.exception("TLS reload check failed")
            return None


def load_server_tls(config: TlsConfig, *, clock: Callable[[], float] = time.monotonic) -> ServerTls | None:
    """Read and check the files of `config`; None when TLS is off. ValueError naming the key otherwise."""
    return ServerTls(config, clock=clock) if config.enabled else None


class TlsCollector(Collector):
    """gradwatch_tls_reloads_total{result}: reloads of changed certificate files."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gradwatch_tls_reloads_total", "Reloads of changed TLS certificate files, by result.", labels=["result"]
        )
        for result, n in sorted(self._tls.reloads.items()):
            family.add_metric([result], n)
        yield family
