"""TLS material of the server, read and checked once at start-up (see docs/security.md).

`load_server_tls(config.tls)` reads the PEM files named in the config and returns the gRPC server
credentials and the ssl context of the HTTP port, or None when TLS is off. Every problem (an unreadable
file, a file that is not PEM, a key that does not match its certificate, a CA bundle without certificates)
is a ValueError naming the config key, raised before any port is bound.

Mutual TLS (`client_ca_file`) applies to the gRPC port, where agents connect. The HTTP port serves
/metrics, /healthz and the API over TLS without asking for client certificates: Kubernetes HTTPS probes
cannot present one, and the API is protected by bearer tokens instead (server/auth.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from gradwatch.server.config import TlsConfig

__all__ = ["ServerTls", "load_server_tls"]

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


@dataclass(frozen=True)
class ServerTls:
    """What the two listeners need: gRPC credentials and the HTTP ssl context."""

    grpc_credentials: grpc.ServerCredentials
    http_context: ssl.SSLContext
    mutual: bool


def _read(key: str, path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls.{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"tls.{key}: {path!r} is not a PEM file")
    return data


def load_server_tls(config: TlsConfig) -> ServerTls | None:
    """Read and check the files of `config`; None when TLS is off. ValueError naming the key otherwise."""
    if not config.enabled:
        return None
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
    ca: bytes | None = None
    if config.client_ca_file:
        ca = _read("client_ca_file", config.client_ca_file)
        try:
            ssl.create_default_context(cadata=ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"tls.client_ca_file: {config.client_ca_file!r} holds no usable CA: {exc}") from None
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
    return ServerTls(grpc_credentials=credentials, http_context=context, mutual=ca is not None)
