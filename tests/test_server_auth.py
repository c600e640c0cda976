"""Bearer tokens on a real ServerApp: right status and reason for missing, unknown and misdirected tokens,
counted in /metrics; the run/job binding; reloading the file; the HTTP API's guard."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gradwatch.server.app import ServerApp
from gradwatch.server.auth import AUTH_REASONS, RELOAD_CHECK_INTERVAL_S, TokenSource, load_token_book
from gradwatch.server.grpc_service import REASON_METADATA_KEY
from gradwatch.v1 import gradwatch_pb2 as pb
from security_support import flush_once, https_get, secure_config, stream_once, write_tokens
from server_support import AgentStream, acks, hello, hello_frame, metric, report_frame, sample, start_app
from wait_support import wait_until

LLAMA = "llama-token-0123456789abcdef"
MISTRAL = "mistral-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
GRANTS = [
    {"name": "llama", "token": LLAMA, "jobs": ["llama-*"], "runs": ["llama-*"]},
    {"name": "mistral", "sha256": hashlib.sha256(MISTRAL.encode()).hexdigest(), "jobs": ["mistral"]},
    {"name": "oncall", "token": READER, "api": True},
]
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("auth") / "tokens.json", GRANTS)


@pytest.fixture(scope="module")
def app(tokens_file: Path) -> Iterator[ServerApp]:
    app = start_app(secure_config(tokens_file=tokens_file, protect_metrics=False))
    yield app
    app.stop(grace=0)


def _scrape(app: ServerApp) -> str:
    status, _, body = https_get(app.http_url + "/metrics", None)
    assert status == 200
    return body.decode()


def _frames(run: str, job: str) -> list:
    return [hello_frame(run=run, job_name=job), report_frame(1), report_frame(2)]


def _channel(app: ServerApp) -> grpc.Channel:
    return grpc.insecure_channel(app.grpc_target)


def test_auth_accepts_the_right_token_for_its_job_and_run(app: ServerApp) -> None:
    assert acks(stream_once(_channel(app), _frames("llama-7b-1", "llama-7b"), LLAMA))[-1] == 2
    assert acks(stream_once(_channel(app), _frames("any-run", "mistral"), MISTRAL))[-1] == 2  # sha256 grant
    runs = {run["run"]: run["job_name"] for run in app.runs()}
    assert runs["llama-7b-1"] == "llama-7b" and runs["any-run"] == "mistral"


CASES = {
    "no_token": (None, "llama-x", "llama-x", UNAUTHENTICATED, "missing_token", "requires `authorization: Bearer"),
    "unknown_token": ("x" * 20, "llama-x", "llama-x", UNAUTHENTICATED, "invalid_token", "not known"),
    "other_jobs_token": (MISTRAL, "llama-y", "llama-y", DENIED, "job_not_allowed", "'mistral' may not write job_name"),
    "run_outside_patterns": (LLAMA, "mistral-run", "llama-y", DENIED, "run_not_allowed", "may not write run"),
    "api_only_token": (READER, "llama-z", "llama-z", DENIED, "job_not_allowed", "'oncall' may not write"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_auth_rejects_with_status_reason_and_counter(app: ServerApp, case: str) -> None:
    token, run, job, code, reason, text = CASES[case]
    before = metric(_scrape(app), "gradwatch_ingest_errors_total", reason=reason)
    for call in ("stream", "flush"):
        with pytest.raises(grpc.RpcError) as info:
            if call == "stream":
                stream_once(_channel(app), _frames(run, job), token)
            else:
                flush_once(_channel(app), hello(run=run, job_name=job), [report_frame(1)], token)
        assert info.value.code() == code, call
        assert text in info.value.details(), call
        assert (REASON_METADATA_KEY, reason) in tuple(info.value.trailing_metadata() or ())
    assert sample(_scrape(app), "gradwatch_ingest_errors_total", reason=reason) == before + 2
    assert run not in [r["run"] for r in app.runs()]


def test_auth_token_is_never_in_an_error_message(app: ServerApp) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stream_once(_channel(app), _frames("llama-q", "mistral"), LLAMA)
    assert LLAMA not in info.value.details()
    assert "'llama'" in info.value.details()  # the grant's name stands for it


def test_auth_no_token_can_write_into_another_jobs_run(app: ServerApp) -> None:
    # The mistral job registers a run whose name matches the llama token's run patterns; the llama token
    # still may not write it: the run belongs to the job of its first Hello.
    assert acks(stream_once(_channel(app), _frames("llama-shared", "mistral"), MISTRAL))[-1] == 2
    with pytest.raises(grpc.RpcError) as info:
        stream_once(_channel(app), _frames("llama-shared", "llama-7b"), LLAMA)
    assert info.value.code() == DENIED
    assert (REASON_METADATA_KEY, "run_bound_to_other_job") in tuple(info.value.trailing_metadata() or ())
    assert {r["run"]: r["job_name"] for r in app.runs()}["llama-shared"] == "mistral"


def test_auth_a_stream_cannot_switch_runs_after_its_hello(app: ServerApp) -> None:
    frames = [hello_frame(run="llama-a", job_name="llama-7b"), report_frame(1), hello_frame(run="llama-b")]
    with pytest.raises(grpc.RpcError) as info:
        stream_once(_channel(app), frames, LLAMA)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "llama-b" not in [r["run"] for r in app.runs()]


def test_auth_error_counters_exist_at_zero(tmp_path: Path) -> None:
    app = start_app(secure_config(tokens_file=write_tokens(tmp_path / "t.json", GRANTS)))
    try:
        text = _scrape_with(app, READER)
        for reason in AUTH_REASONS:
            assert sample(text, "gradwatch_ingest_errors_total", reason=reason) == 0.0
        assert metric(text, "gradwatch_auth_grants") == 3
    finally:
        app.stop(grace=0)


def _scrape_with(app: ServerApp, token: str | None) -> str:
    status, _, body = https_get(app.http_url + "/metrics", None, token)
    assert status == 200
    return body.decode()


# ---------------------------------------------------------------------- reloading


def _replace(path: Path, grants: list[dict]) -> None:
    """Swap the file the way the kubelet updates a mounted Secret: write aside, rename over."""
    aside = path.with_suffix(".new")
    write_tokens(aside, grants)
    os.replace(aside, path)


def test_auth_reloads_the_file_and_ends_streams_of_a_revoked_token(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens.json", GRANTS)
    app = start_app(secure_config(tokens_file=path))
    assert app.tokens is not None
    try:
        stream = AgentStream(app.grpc_target, metadata=(("authorization", f"Bearer {LLAMA}"),))
        stream.send(hello_frame(run="llama-live", job_name="llama-7b"))
        assert stream.recv().WhichOneof("body") == "welcome"
        stream.send(report_frame(1))
        stream.recv_ack(1)

        generation = app.tokens.generation
        new_token = "llama-rotated-0123456789abcdef"
        _replace(path, [{**GRANTS[0], "token": new_token}, *GRANTS[1:]])
        # The live stream notices by itself: it keeps reporting until the server ends it.
        seqs = itertools.count(2)

        def report() -> list[object]:
            """Sends one more report: [the stream's end] once it ended, [] while the server still acks."""
            stream.send(report_frame(next(seqs)))
            reply = stream.recv()
            return [] if isinstance(reply, pb.ServerFrame) else [reply]

        (ended,) = wait_until(report, 10, what="the server to end the stream of the rotated token",
                              interval=RELOAD_CHECK_INTERVAL_S / 4,
                              detail=lambda: f"token generation {app.tokens.generation}, was {generation}")  # fmt: skip
        assert isinstance(ended, grpc.RpcError) and ended.code() == UNAUTHENTICATED, ended
        assert app.tokens.generation == generation + 1
        stream.close()
        assert acks(stream_once(_channel(app), _frames("llama-live2", "llama-7b"), new_token))[-1] == 2

        # A broken file keeps the grants in force, and is counted.
        generation = app.tokens.generation
        path.write_text("tokens: [{name: x}]")

        def reload_failed() -> bool:
            app.tokens.book()  # checks the file at most once a second
            return app.tokens.reloads["error"] > 0

        wait_until(reload_failed, 10, what="the broken file counted as a reload error",
                   interval=RELOAD_CHECK_INTERVAL_S / 4, detail=lambda: repr(app.tokens.reloads))  # fmt: skip
        assert app.tokens.generation == generation
        assert acks(stream_once(_channel(app), _frames("llama-live3", "llama-7b"), new_token))[-1] == 2
        assert metric(_scrape_with(app, READER), "gradwatch_auth_reloads_total", result="error") >= 1
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- the file


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[]", "one key `tokens`"),
        ("tokens: [{token: 0123456789abcdef0}]", "tokens[0].name: a non-empty name is required"),
        ("tokens: [{name: a, token: short}]", "tokens[0] (a).token: must be a string of at least 16"),
        ("tokens: [{name: a}]", "exactly one of `token` and `sha256`"),
        ("tokens: [{name: a, sha256: abc}]", "tokens[0] (a).sha256: must be the 64 hex digits"),
        ("tokens: [{name: a, token: 0123456789abcdef0, job: [x]}]", "tokens[0].job: unknown key"),
        ("tokens: [{name: a, token: 0123456789abcdef0, jobs: 3}]", "jobs: must be a list of non-empty glob"),
        (
            "tokens: [{name: a, token: 0123456789abcdef0}, {name: a, token: 0123456789abcdef1}]",
            "names must be unique",
        ),
        ("tokens: [{name: a, token: 0123456789abcdef0}, {name: b, token: 0123456789abcdef0}]", "share one token"),
        ("tokens: [", "not YAML or JSON"),
    ],
)
def test_auth_tokens_file_problems_are_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        load_token_book(text)
    assert problem in str(info.value)
    assert "0123456789abcdef0" not in str(info.value) or "tokens: [" in text


def test_auth_unreadable_tokens_file_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"auth\.tokens_file: cannot read"):
        ServerApp(secure_config(tokens_file=tmp_path / "absent.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokens: [{name: a, token: short}]")
    with pytest.raises(ValueError, match=r"auth.tokens_file .*bad.yaml.*at least 16"):
        ServerApp(secure_config(tokens_file=bad))


# ---------------------------------------------------------------------- HTTP


def test_auth_http_api_needs_an_api_token_healthz_never(app: ServerApp) -> None:
    url = app.http_url
    status, headers, _ = https_get(url + "/api/v1/runs", None)
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert https_get(url + "/api/v1/runs", None, "y" * 20)[0] == 401
    assert https_get(url + "/api/v1/alerts", None, LLAMA)[0] == 403  # an agent token is not an API token
    assert https_get(url + "/api/v1/runs", None, READER)[0] == 200
    assert https_get(url + "/healthz", None)[0] == 200
    assert https_get(url + "/metrics", None)[0] == 200  # protect_metrics is off in this app
    text = _scrape(app)
    assert metric(text, "gradwatch_http_auth_failures_total", reason="missing_token") >= 1
    assert metric(text, "gradwatch_http_auth_failures_total", reason="api_not_allowed") >= 1


def test_auth_http_metrics_can_be_protected(tmp_path: Path) -> None:
    app = start_app(secure_config(tokens_file=write_tokens(tmp_path / "t.json", GRANTS), protect_metrics=True))
    try:
        assert https_get(app.http_url + "/metrics", None)[0] == 401
        assert https_get(app.http_url + "/metrics", None, READER)[0] == 200
        assert https_get(app.http_url + "/healthz", None)[0] == 200
    finally:
        app.stop(grace=0)


def test_auth_a_broken_or_missing_file_is_counted_once_per_change(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens.json", GRANTS)
    now = [0.0]
    source = TokenSource(str(path), clock=lambda: now[0])

    def tick() -> None:
        now[0] += RELOAD_CHECK_INTERVAL_S
        source.book()

    path.write_text("tokens: [{name: x}]")
    for _ in range(3):
        tick()
    assert source.reloads == {"ok": 0, "error": 1} and source.generation == 1
    path.unlink()
    for _ in range(3):
        tick()
    assert source.reloads == {"ok": 0, "error": 2}
    assert source.book().find(LLAMA) is not None  # the grants in force are kept throughout
    _replace(path, GRANTS[:1])
    tick()
    assert source.reloads == {"ok": 1, "error": 2} and source.generation == 2
    assert source.book().find(MISTRAL) is None
