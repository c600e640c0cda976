"""Test support for TLS and tokens: certificates made in the test (trustme), files, secure clients.

No torch here. `Pki(tmp_path)` writes a CA, a server certificate for 127.0.0.1/localhost and a client
certificate, plus a second, unrelated CA for "wrong CA" cases; each is a PEM file path.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import trustme

from gradwatch.server.config import AuthConfig, ServerConfig, TlsConfig
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1 import gradwatch_pb2_grpc as pbg
from server_support import WAIT_S, server_config


@dataclasses.dataclass
class CertFiles:
    cert: Path
    key: Path


class Pki:
    """A CA, a server and a client certificate signed by it, and an unrelated CA with its own client."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.server = self._issue(self.ca, "server", "127.0.0.1", "localhost")
        self.client = self._issue(self.ca, "client", "agent.llama.example")
        self.other_ca = trustme.CA()
        self.other_ca_file = folder / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))
        self.other_client = self._issue(self.other_ca, "other-client", "agent.intruder.example")

    def _issue(self, ca: trustme.CA, name: str, *hosts: str) -> CertFiles:
        issued = ca.issue_cert(*hosts)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        return CertFiles(cert, key)

    def tls_config(self, *, mutual: bool = False) -> TlsConfig:
        return TlsConfig(
            cert_file=str(self.server.cert),
            key_file=str(self.server.key),
            client_ca_file=str(self.ca_file) if mutual else "",
        )


def secure_config(
    pki: Pki | None = None, *, mutual: bool = False, tokens_file: Path | None = None, **auth: Any
) -> ServerConfig:
    config = server_config()
    if pki is not None:
        config = dataclasses.replace(config, tls=pki.tls_config(mutual=mutual))
    if tokens_file is not None:
        config = dataclasses.replace(config, auth=AuthConfig(tokens_file=str(tokens_file), **auth))
    return config


def write_tokens(path: Path, grants: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"tokens": grants}))
    return path


def secure_channel(target: str, ca: Path, client: CertFiles | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(target, credentials)


def stream_once(
    channel: grpc.Channel, frames: list[pb.AgentFrame], token: str | None = None, timeout: float = WAIT_S
) -> list[pb.ServerFrame]:
    """Send `frames` on one Stream (with a bearer token when given); all server frames (raises RpcError)."""
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    with channel:
        return list(pbg.IngestStub(channel).Stream(iter(frames), timeout=timeout, metadata=metadata))


def flush_once(channel: grpc.Channel, hello: pb.Hello, frames: list[pb.AgentFrame], token: str | None) -> int:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    with channel:
        request = pb.FlushRequest(hello=hello, frames=frames)
        return int(pbg.IngestStub(channel).Flush(request, timeout=WAIT_S, metadata=metadata).acked_seq)


def https_get(url: str, ca: Path | None, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET, trusting `ca` (None: the system roots), also for error statuses."""
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S, context=context) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
