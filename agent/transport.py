"""How the sender reaches its server: the replica (routing.py), channel credentials and the bearer token.

Contract
- Built once by the Monitor before the sender starts; it reads every file named in the config then
  (`tls_ca_file`, the client certificate and key, `token_file`), so a missing or unreadable file is a loud
  ValueError at `attach()` naming the option and its environment variable.
- After that it is used from the sender thread only and never raises for a file: `token_file` is re-read
  for every new connection (a rotated Kubernetes Secret takes effect at the next reconnect), keeping the
  last good token when the file cannot be read.
- `target()` is the address of the next connection attempt: `server`, or the run's replica among `servers`.
  `channel(target)` is a plaintext or TLS channel (with mutual TLS when a client certificate is given);
  for an address that came from a DNS expansion the certificate is checked against the DNS name.
  `metadata()` is what every call carries: `authorization: Bearer <token>` when a token is configured.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from gradwatch.agent.config import (
    ENV_TLS_CA_FILE,
    ENV_TLS_CLIENT_CERT_FILE,
    ENV_TLS_CLIENT_KEY_FILE,
    ENV_TOKEN_FILE,
    AgentConfig,
)
from gradwatch.agent.stream import CHANNEL_OPTIONS, insecure_channel
from gradwatch.routing import ReplicaRouter, Resolver

__all__ = ["Metadata", "Transport"]

logger = logging.getLogger("gradwatch.agent")

Metadata = tuple[tuple[str, str], ...]
#: Addresses remembered with their certificate name (DNS expansions); more are forgotten oldest first.
MAX_SERVER_NAMES = 256


def _read_file(option: str, env: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"gradwatch: {option} ({env})={path!r} is invalid: {exc.strerror or exc}") from None


def _read_token(path: str) -> str:
    token = _read_file("token_file", ENV_TOKEN_FILE, path).decode("utf-8", errors="replace").strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"gradwatch: token_file ({ENV_TOKEN_FILE})={path!r} is invalid: expected one token")
    return token


class Transport:
    """Target choice, channels and call metadata of one Monitor (see the module docstring)."""

    def __init__(self, config: AgentConfig, *, resolve: Resolver | None = None) -> None:
        self._server = config.server
        self._run_id = config.run_id
        self._router = None
        if config.servers:
            self._router = ReplicaRouter(config.servers, resolve=resolve) if resolve else ReplicaRouter(config.servers)
        self._credentials: grpc.ChannelCredentials | None = None
        if config.tls:
            ca = _read_file("tls_ca_file", ENV_TLS_CA_FILE, config.tls_ca_file) if config.tls_ca_file else None
            cert = key = None
            if config.tls_client_cert_file:
                cert = _read_file("tls_client_cert_file", ENV_TLS_CLIENT_CERT_FILE, config.tls_client_cert_file)
                key = _read_file("tls_client_key_file", ENV_TLS_CLIENT_KEY_FILE, config.tls_client_key_file)
            for option, env, data in (
                ("tls_ca_file", ENV_TLS_CA_FILE, ca),
                ("tls_client_cert_file", ENV_TLS_CLIENT_CERT_FILE, cert),
                ("tls_client_key_file", ENV_TLS_CLIENT_KEY_FILE, key),
            ):
                if data is not None and b"-----BEGIN " not in data:
                    raise ValueError(f"gradwatch: {option} ({env}) is invalid: not a PEM file")
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=ca, private_key=key, certificate_chain=cert
            )
        self._token_file = config.token_file
        self._token = _read_token(config.token_file) if config.token_file else config.token
        self._server_names: dict[str, str] = {}

    @property
    def secure(self) -> bool:
        return self._credentials is not None

    def target(self) -> str:
        """The address for the next connection attempt (may resolve DNS: sender thread only)."""
        if self._router is None:
            return self._server
        replica = self._router.pick(self._run_id)
        if replica.server_name:
            if len(self._server_names) >= MAX_SERVER_NAMES:
                self._server_names.pop(next(iter(self._server_names)))
            self._server_names[replica.address] = replica.server_name
        return replica.address

    def channel(self, target: str) -> grpc.Channel:
        """A fresh channel to `target`: plaintext, or TLS with the configured CAs and client certificate."""
        if self._credentials is None:
            return insecure_channel(target)
        name = self._server_names.get(target)
        options = [*CHANNEL_OPTIONS, *([("grpc.ssl_target_name_override", name)] if name else [])]
        return grpc.secure_channel(target, self._credentials, options=options)

    def metadata(self) -> Metadata:
        """Metadata for the next call: the bearer token, re-read from token_file if one is configured."""
        if self._token_file:
            try:
                self._token = _read_token(self._token_file)
            except ValueError as exc:
                logger.debug("keeping the previous token: %s", exc)
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()
