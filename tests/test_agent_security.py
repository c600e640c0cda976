"""The real agent (`gradwatch.attach`, real training) against a real server with TLS, mutual TLS and tokens:
the right agent gets in, the wrong ones are refused with the right status, and bad files fail at attach()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from agent_support import make_mlp, train, wait_until  # noqa: E402
from gradwatch.agent.config import RetryPolicy  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from security_support import Pki, secure_config, write_tokens  # noqa: E402
from server_support import metric, start_app  # noqa: E402

TOKEN = "llama-token-0123456789abcdef"
OTHER = "mistral-token-0123456789abcdef"
GRANTS = [
    {"name": "llama", "token": TOKEN, "jobs": ["llama-7b"]},
    {"name": "mistral", "token": OTHER, "jobs": ["mistral"]},
    {"name": "reader", "token": "reader-token-0123456789abcdef", "api": True},
]
FAST_RETRY = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, rejected_backoff_s=0.2)
STEPS = 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("auth") / "tokens.yaml", GRANTS)


@pytest.fixture(scope="module")
def secure_app(pki: Pki, tokens_file: Path) -> Iterator[ServerApp]:
    """Mutual TLS and tokens together: the full production set-up."""
    app = start_app(secure_config(pki, mutual=True, tokens_file=tokens_file, protect_metrics=False))
    yield app
    app.stop(grace=0)


def _train(app: ServerApp, run: str, **options: Any) -> tuple[bool, dict[str, Any]]:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, optimizer, run=run, server=app.grpc_target, retry=FAST_RETRY, **options)
    train(model, optimizer, monitor, STEPS)
    return monitor.close(timeout=10.0), monitor.counters()


def _run(app: ServerApp, run: str) -> dict[str, Any] | None:
    return next((r for r in app.runs() if r["run"] == run), None)


def _mtls(pki: Pki) -> dict[str, str]:
    return {
        "tls_ca_file": str(pki.ca_file),
        "tls_client_cert_file": str(pki.client.cert),
        "tls_client_key_file": str(pki.client.key),
    }


def test_agent_with_ca_client_cert_and_token_reports_over_mtls(secure_app: ServerApp, pki: Pki) -> None:
    closed, counters = _train(secure_app, "llama-run-1", job_name="llama-7b", token=TOKEN, **_mtls(pki))
    assert closed, counters
    run = _run(secure_app, "llama-run-1")
    assert run is not None and run["step"] == STEPS and run["job_name"] == "llama-7b"
    assert counters["acked"] == STEPS and counters["rejections"] == 0


def test_agent_token_and_tls_files_from_the_environment(
    secure_app: ServerApp, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("GRADWATCH_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("GRADWATCH_TLS_CA_FILE", str(pki.ca_file))
    monkeypatch.setenv("GRADWATCH_TLS_CLIENT_CERT_FILE", str(pki.client.cert))
    monkeypatch.setenv("GRADWATCH_TLS_CLIENT_KEY_FILE", str(pki.client.key))
    monkeypatch.setenv("GRADWATCH_JOB_NAME", "llama-7b")
    closed, counters = _train(secure_app, "llama-run-env")
    assert closed, counters
    assert _run(secure_app, "llama-run-env") is not None


def _refused(app: ServerApp, run: str, reason: str, **options: Any) -> dict[str, Any]:
    before = metric(_scrape(app), "gradwatch_ingest_errors_total", reason=reason)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(model, optimizer, run=run, server=app.grpc_target, retry=FAST_RETRY, **options)
    train(model, optimizer, monitor, STEPS)
    assert wait_until(lambda: monitor.counters()["rejections"] >= 1)
    assert not monitor.close(timeout=1.0)
    assert _run(app, run) is None
    assert metric(_scrape(app), "gradwatch_ingest_errors_total", reason=reason) > before
    return monitor.counters()


def _scrape(app: ServerApp) -> str:
    from security_support import https_get

    status, _, body = https_get(app.http_url + "/metrics", _ca(app))
    assert status == 200
    return body.decode()


def _ca(app: ServerApp) -> Path:
    return Path(app.config.tls.client_ca_file)  # the tests' one CA signs the server too


def test_agent_without_token_is_unauthenticated(secure_app: ServerApp, pki: Pki) -> None:
    _refused(secure_app, "llama-run-2", "missing_token", job_name="llama-7b", **_mtls(pki))


def test_agent_with_a_wrong_token_is_unauthenticated(secure_app: ServerApp, pki: Pki) -> None:
    _refused(secure_app, "llama-run-3", "invalid_token", job_name="llama-7b", token="z" * 24, **_mtls(pki))


def test_agent_with_another_jobs_token_is_denied(secure_app: ServerApp, pki: Pki) -> None:
    _refused(secure_app, "llama-run-4", "job_not_allowed", job_name="llama-7b", token=OTHER, **_mtls(pki))


def test_agent_cannot_write_into_another_jobs_run(secure_app: ServerApp, pki: Pki) -> None:
    closed, _ = _train(secure_app, "shared-run", job_name="llama-7b", token=TOKEN, **_mtls(pki))
    assert closed
    before = metric(_scrape(secure_app), "gradwatch_ingest_errors_total", reason="run_bound_to_other_job")
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(
        model, optimizer, run="shared-run", server=secure_app.grpc_target, retry=FAST_RETRY,
        job_name="mistral", token=OTHER, **_mtls(pki),
    )  # fmt: skip
    train(model, optimizer, monitor, STEPS)
    assert wait_until(lambda: monitor.counters()["rejections"] >= 1)
    assert not monitor.close(timeout=1.0)
    run = _run(secure_app, "shared-run")
    assert run is not None and run["job_name"] == "llama-7b" and run["step"] == STEPS
    assert metric(_scrape(secure_app), "gradwatch_ingest_errors_total", reason="run_bound_to_other_job") > before


def test_agent_without_client_certificate_cannot_connect_to_mtls(secure_app: ServerApp, pki: Pki) -> None:
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = gradwatch.attach(
        model, optimizer, run="llama-run-5", server=secure_app.grpc_target, retry=FAST_RETRY,
        job_name="llama-7b", token=TOKEN, tls_ca_file=str(pki.ca_file),
    )  # fmt: skip
    train(model, optimizer, monitor, STEPS)
    assert wait_until(lambda: monitor.counters()["stream_failures"] >= 2)
    assert not monitor.close(timeout=1.0)
    assert monitor.counters()["acked"] == 0
    assert _run(secure_app, "llama-run-5") is None


def test_agent_that_does_not_trust_the_servers_ca_never_connects(tmp_path: Path, pki: Pki) -> None:
    app = start_app(secure_config(pki))
    try:
        model = make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        monitor = gradwatch.attach(
            model, optimizer, run="wrong-ca", server=app.grpc_target, retry=FAST_RETRY,
            tls_ca_file=str(pki.other_ca_file),
        )  # fmt: skip
        train(model, optimizer, monitor, STEPS)
        assert wait_until(lambda: monitor.counters()["stream_failures"] >= 2)
        assert not monitor.close(timeout=1.0)
        assert app.runs() == []
        # A plaintext agent does not get in either; the one that trusts the CA does.
        closed, _ = _train(app, "plain")
        assert not closed and app.runs() == []
        closed, _ = _train(app, "right-ca", tls_ca_file=str(pki.ca_file))
        assert closed and [r["run"] for r in app.runs()] == ["right-ca"]
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- loud at attach()


def _attach_error(**options: Any) -> str:
    with pytest.raises(ValueError) as info:
        gradwatch.attach(make_mlp(), run="x", **options)
    return str(info.value)


def test_agent_attach_names_a_missing_tls_file(tmp_path: Path, pki: Pki) -> None:
    missing = str(tmp_path / "nope.pem")
    assert "tls_ca_file (GRADWATCH_TLS_CA_FILE)" in _attach_error(tls_ca_file=missing)
    message = _attach_error(
        tls_ca_file=str(pki.ca_file), tls_client_cert_file=missing, tls_client_key_file=str(pki.client.key)
    )
    assert "tls_client_cert_file (GRADWATCH_TLS_CLIENT_CERT_FILE)" in message
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    assert "not a PEM file" in _attach_error(tls_ca_file=str(junk))


def test_agent_attach_rejects_contradictions_without_echoing_the_token(tmp_path: Path, pki: Pki) -> None:
    assert "set together" in _attach_error(tls_client_cert_file=str(pki.client.cert))
    assert "not both" in _attach_error(token=TOKEN, token_file=str(tmp_path / "t"))
    assert "not both" in _attach_error(server="a:1", servers="b:1,c:1")
    assert "contradicts" in _attach_error(tls=False, tls_ca_file=str(pki.ca_file))
    message = _attach_error(token="has space")
    assert "has space" not in message and "token" in message
    assert "token_file (GRADWATCH_TOKEN_FILE)" in _attach_error(token_file=str(tmp_path / "absent"))


def test_agent_config_repr_hides_the_token() -> None:
    from gradwatch.agent.config import resolve_config

    config = resolve_config({"run": "r", "token": TOKEN}, env={})
    assert config.token == TOKEN and TOKEN not in repr(config)
