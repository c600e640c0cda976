"""TLS and mutual TLS on a real ServerApp with certificates made in the test: who gets in, who does not,
and loud start-up errors for unusable files."""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gradwatch.server.app import ServerApp
from gradwatch.server.config import TlsConfig, config_from_args
from security_support import Pki, https_get, secure_channel, secure_config, stream_once, write_tokens
from server_support import WAIT_S, acks, hello_frame, metric, report_frame, server_config, start_app
from wait_support import wait_until

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_app(pki: Pki) -> Iterator[ServerApp]:
    app = start_app(secure_config(pki))
    yield app
    app.stop(grace=0)


@pytest.fixture(scope="module")
def mtls_app(pki: Pki) -> Iterator[ServerApp]:
    app = start_app(secure_config(pki, mutual=True))
    yield app
    app.stop(grace=0)


def _frames(run: str) -> list:
    return [hello_frame(run=run), report_frame(1), report_frame(2)]


def test_tls_accepts_a_client_that_trusts_the_servers_ca(tls_app: ServerApp, pki: Pki) -> None:
    responses = stream_once(secure_channel(tls_app.grpc_target, pki.ca_file), _frames("tls-ok"))
    assert responses[0].WhichOneof("body") == "welcome"
    assert acks(responses)[-1] == 2
    assert [run["run"] for run in tls_app.runs()] == ["tls-ok"]


def test_tls_rejects_a_plaintext_client(tls_app: ServerApp) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream_once(grpc.insecure_channel(tls_app.grpc_target), _frames("plain"), timeout=5)
    assert info.value.code() == UNAVAILABLE
    assert "plain" not in [run["run"] for run in tls_app.runs()]


def test_tls_rejects_a_client_that_trusts_another_ca(tls_app: ServerApp, pki: Pki) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream_once(secure_channel(tls_app.grpc_target, pki.other_ca_file), _frames("wrong-ca"), timeout=5)
    assert info.value.code() == UNAVAILABLE
    assert "wrong-ca" not in [run["run"] for run in tls_app.runs()]


def test_mtls_accepts_a_client_certificate_signed_by_the_client_ca(mtls_app: ServerApp, pki: Pki) -> None:
    channel = secure_channel(mtls_app.grpc_target, pki.ca_file, pki.client)
    assert acks(stream_once(channel, _frames("mtls-ok")))[-1] == 2


def test_mtls_rejects_a_client_without_a_certificate(mtls_app: ServerApp, pki: Pki) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream_once(secure_channel(mtls_app.grpc_target, pki.ca_file), _frames("no-cert"), timeout=5)
    assert info.value.code() == UNAVAILABLE
    assert "no-cert" not in [run["run"] for run in mtls_app.runs()]


def test_mtls_rejects_a_client_certificate_from_another_ca(mtls_app: ServerApp, pki: Pki) -> None:
    channel = secure_channel(mtls_app.grpc_target, pki.ca_file, pki.other_client)
    with pytest.raises(grpc.RpcError) as info:
        stream_once(channel, _frames("other-cert"), timeout=5)
    assert info.value.code() == UNAVAILABLE
    assert "other-cert" not in [run["run"] for run in mtls_app.runs()]


def test_tls_http_serves_metrics_and_api_over_https_only(tls_app: ServerApp, pki: Pki) -> None:
    assert tls_app.http_url.startswith("https://")
    status, _, body = https_get(tls_app.http_url + "/metrics", pki.ca_file)
    assert status == 200
    assert metric(body.decode(), "gradwatch_ingest_active_streams") >= 0
    assert https_get(tls_app.http_url + "/healthz", pki.ca_file)[0] == 200
    assert https_get(tls_app.http_url + "/api/v1/runs", pki.ca_file)[0] == 200

    plain = tls_app.http_url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(plain + "/metrics", timeout=WAIT_S)
    with pytest.raises(urllib.error.URLError) as info:
        https_get(tls_app.http_url + "/metrics", pki.other_ca_file)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
    # The server keeps serving after refused handshakes.
    assert https_get(tls_app.http_url + "/healthz", pki.ca_file)[0] == 200


def test_mtls_http_needs_no_client_certificate(mtls_app: ServerApp, pki: Pki) -> None:
    # Probes and Prometheus reach /healthz and /metrics with server-authenticated TLS only (docs/security.md).
    assert https_get(mtls_app.http_url + "/healthz", pki.ca_file)[0] == 200
    assert https_get(mtls_app.http_url + "/metrics", pki.ca_file)[0] == 200


# ---------------------------------------------------------------------- start-up errors


def _start_error(tls: TlsConfig) -> str:
    with pytest.raises(ValueError) as info:
        ServerApp(dataclasses.replace(server_config(), tls=tls))
    return str(info.value)


def test_tls_missing_cert_file_names_the_key_and_path(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    message = _start_error(TlsConfig(cert_file=missing, key_file=str(pki.server.key)))
    assert message.startswith("tls.cert_file: cannot read") and missing in message


def test_tls_missing_key_file_names_the_key(pki: Pki, tmp_path: Path) -> None:
    message = _start_error(TlsConfig(cert_file=str(pki.server.cert), key_file=str(tmp_path / "nope.key")))
    assert message.startswith("tls.key_file: cannot read")


def test_tls_key_of_another_certificate_is_a_mismatch(pki: Pki) -> None:
    message = _start_error(TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.client.key)))
    assert message.startswith("tls.key_file:") and "is not the private key of tls.cert_file" in message


def test_tls_non_pem_files_are_refused(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "is not a PEM file" in _start_error(TlsConfig(cert_file=str(junk), key_file=str(pki.server.key)))
    message = _start_error(
        TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key), client_ca_file=str(junk))
    )
    assert message.startswith("tls.client_ca_file:")


def test_tls_cert_without_key_is_a_config_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"'key_file'.*set together"):
        TlsConfig(cert_file=str(pki.server.cert))
    with pytest.raises(ValueError, match=r"'client_ca_file'.*mutual TLS needs"):
        TlsConfig(client_ca_file=str(pki.ca_file))


def test_tls_files_come_from_the_environment(pki: Pki) -> None:
    env = {
        "GRADWATCH_TLS_CERT_FILE": str(pki.server.cert),
        "GRADWATCH_TLS_KEY_FILE": str(pki.server.key),
        "GRADWATCH_TLS_CLIENT_CA_FILE": str(pki.ca_file),
    }
    config = config_from_args(environ=env)
    assert config.tls == pki.tls_config(mutual=True)
    with pytest.raises(ValueError, match=r"tls\.key_file"):
        config_from_args(environ={"GRADWATCH_TLS_CERT_FILE": str(pki.server.cert)})


def test_serve_exits_2_with_the_key_named_for_a_bad_cert_path(tmp_path: Path) -> None:
    env = {**os.environ, "GRADWATCH_TLS_CERT_FILE": str(tmp_path / "a.pem"), "GRADWATCH_TLS_KEY_FILE": "/nope"}
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch.cli", "serve", "--grpc-port", "0", "--http-port", "0", "--host", "127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "tls.cert_file: cannot read" in result.stderr


def test_tls_and_auth_keys_load_from_yaml(pki: Pki, tmp_path: Path) -> None:
    from gradwatch.server.config import load_config

    data = {
        "tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), "client_ca_file": str(pki.ca_file)},
        "auth": {"tokens_file": str(tmp_path / "tokens.yaml"), "protect_metrics": True},
    }
    config = load_config(data)
    assert config.tls == pki.tls_config(mutual=True)
    assert config.auth.tokens_file.endswith("tokens.yaml") and config.auth.protect_api and config.auth.protect_metrics
    with pytest.raises(ValueError, match=r"'tls\.certfile': unknown setting"):
        load_config({"tls": {"certfile": "x"}})
    with pytest.raises(ValueError, match=r"'tls\.key_file': cert_file and key_file are set together"):
        load_config({"tls": {"cert_file": "x"}})
    config = config_from_args(environ={"GRADWATCH_AUTH_TOKENS_FILE": "/etc/gradwatch/tokens.yaml"})
    assert config.auth.tokens_file == "/etc/gradwatch/tokens.yaml"


def test_serve_with_tls_mtls_and_tokens_from_the_environment(pki: Pki, tmp_path: Path) -> None:
    """The variables a deployment sets, end to end through `gradwatch serve` in a subprocess."""
    token = "deploy-token-0123456789abcdef"
    tokens_file = write_tokens(tmp_path / "t.json", [{"name": "deploy", "token": token, "jobs": ["*"]}])
    env = {
        **os.environ,
        "GRADWATCH_CONFIG": "",
        "GRADWATCH_TLS_CERT_FILE": str(pki.server.cert),
        "GRADWATCH_TLS_KEY_FILE": str(pki.server.key),
        "GRADWATCH_TLS_CLIENT_CA_FILE": str(pki.ca_file),
        "GRADWATCH_AUTH_TOKENS_FILE": str(tokens_file),
    }
    command = [sys.executable, "-m", "gradwatch.cli", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
               "--http-port", "0"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+), HTTP on https://127\.0\.0\.1:(\d+)", line)
        assert match, line
        assert "TLS: mutual" in line and "tokens: " + env["GRADWATCH_AUTH_TOKENS_FILE"] in line
        target, https = f"127.0.0.1:{match[1]}", f"https://127.0.0.1:{match[2]}"
        channel = secure_channel(target, pki.ca_file, pki.client)
        assert acks(stream_once(channel, _frames("via-env"), token=token))[-1] == 2
        with pytest.raises(grpc.RpcError) as info:
            stream_once(secure_channel(target, pki.ca_file, pki.client), _frames("no-token"))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert https_get(https + "/healthz", pki.ca_file)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- rotation


def _swap(source: Path, target: Path) -> None:
    """Replace `target` atomically with a copy of `source` (as a Secret update or cert-manager does)."""
    aside = target.with_suffix(".new")
    aside.write_bytes(source.read_bytes())
    os.replace(aside, target)


def _connects(app: ServerApp, ca: Path, run: str) -> bool:
    try:
        return acks(stream_once(secure_channel(app.grpc_target, ca), _frames(run), timeout=5))[-1] == 2
    except grpc.RpcError:
        return False


def test_tls_rotated_certificate_files_apply_to_new_connections(tmp_path: Path) -> None:
    old, new = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    live = CertFilesCopy(tmp_path / "live", old)
    tls = TlsConfig(cert_file=str(live.cert), key_file=str(live.key))
    app = start_app(dataclasses.replace(server_config(), tls=tls))
    try:
        assert _connects(app, old.ca_file, "before")
        assert https_get(app.http_url + "/healthz", old.ca_file)[0] == 200

        # Half a rotation (the new certificate, still the old key) is refused and counted; the old pair stays.
        _swap(new.server.cert, live.cert)

        def errors() -> float:
            return metric(_scrape_tls(app, old.ca_file), "gradwatch_tls_reloads_total", result="error")

        wait_until(lambda: errors() == 1, 10.0, what="the half rotation counted as a reload error", interval=0.25,
                   detail=lambda: f"reload errors: {errors()}")  # fmt: skip
        assert _connects(app, old.ca_file, "during")

        _swap(new.server.key, live.key)
        wait_until(lambda: _connects(app, new.ca_file, "after"), 10.0, what="gRPC to serve the new certificate",
                   interval=0.25)  # fmt: skip
        assert not _connects(app, old.ca_file, "old-ca")
        wait_until(lambda: https_get(app.http_url + "/healthz", new.ca_file)[0] == 200, 10.0,
                   what="HTTPS to serve the new certificate", interval=0.25)  # fmt: skip
        assert metric(_scrape_tls(app, new.ca_file), "gradwatch_tls_reloads_total", result="ok") == 1
    finally:
        app.stop(grace=0)


class CertFilesCopy:
    """The files a server is configured with, first copied from `pki`'s server certificate."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        folder.mkdir(parents=True)
        self.cert, self.key = folder / "tls.crt", folder / "tls.key"
        self.cert.write_bytes(pki.server.cert.read_bytes())
        self.key.write_bytes(pki.server.key.read_bytes())


def _scrape_tls(app: ServerApp, ca: Path) -> str:
    status, _, body = https_get(app.http_url + "/metrics", ca)
    assert status == 200
    return body.decode()
