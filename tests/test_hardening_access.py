"""Who may mute pages, what survives a restart, what the CLI sends and prints, and what the agent says when
the server stops answering (issue: hardening, items 4 and 9). Real servers, a real agent, the real CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from gradwatch.cli import main as cli_main
from gradwatch.server.config import StorageConfig
from hardening_support import NAN, flush_outcome
from security_support import secure_config, write_tokens
from server_support import hello, hello_frame, metric, report_frame, run_stream, scrape, server_config, start_app

READER, WRITER, AGENT = "r" * 24, "w" * 24, "a" * 24


def _call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens.json", [
        {"name": "dashboards", "token": READER, "api": True},
        {"name": "oncall", "token": WRITER, "api": True, "silences": True},
        {"name": "agents", "token": AGENT, "jobs": ["*"]},
    ])  # fmt: skip


def test_a_read_only_api_token_cannot_write_silences(tokens: Path) -> None:
    """`api: true` is documented as read-only; muting a run's pages for 7 days needs `silences: true`."""
    app = start_app(secure_config(tokens_file=tokens))
    url = app.http_url + "/api/v1/silences"
    week = {"run": "victim", "duration_s": 7 * 86400}
    try:
        status, body = _call(url, "POST", week, READER)
        assert status == 403 and "silences: true" in body["error"]
        assert _call(url, token=READER)[0] == 200  # reading is what api: true is for
        assert _call(url, "POST", week)[0] == 401
        status, body = _call(url, "POST", week, WRITER)
        assert status == 201
        silence = body["silence"]["id"]
        assert _call(f"{url}/{silence}", "DELETE", token=READER)[0] == 403
        assert _call(f"{url}/{silence}", "DELETE", token=WRITER)[0] == 200
        text = scrape_with(app, READER)
        assert metric(text, "gradwatch_http_auth_failures_total", reason="silences_not_allowed") == 2
    finally:
        app.stop(grace=0)


def test_silence_writes_need_the_grant_even_when_reads_are_open(tokens: Path) -> None:
    app = start_app(secure_config(tokens_file=tokens, protect_api=False))
    try:
        url = app.http_url + "/api/v1/silences"
        assert _call(url)[0] == 200
        assert _call(url, "POST", {"run": "r", "duration_s": 60})[0] == 401
        assert _call(url, "POST", {"run": "r", "duration_s": 60}, READER)[0] == 403
        assert _call(url, "POST", {"run": "r", "duration_s": 60}, WRITER)[0] == 201
    finally:
        app.stop(grace=0)


def scrape_with(app, token: str) -> str:
    request = urllib.request.Request(app.http_url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.read().decode()


def test_silences_survive_a_restart_and_still_mute(tmp_path: Path) -> None:
    config = dataclasses.replace(server_config(), storage=StorageConfig(data_dir=str(tmp_path / "data")))
    app = start_app(config)
    try:
        status, body = _call(app.http_url + "/api/v1/silences", "POST", {"run": "muted", "duration_s": 3600,
                                                                         "comment": "maintenance"})  # fmt: skip
        assert status == 201
        kept = body["silence"]
        _call(app.http_url + "/api/v1/silences", "POST", {"run": "brief", "duration_s": 0.2})
    finally:
        app.stop(grace=0)
    time.sleep(0.3)  # the brief one ends while the server is down
    app = start_app(config)
    try:
        active = [s for s in _call(app.http_url + "/api/v1/silences")[1]["silences"] if s["state"] == "active"]
        assert [(s["id"], s["run"], s["comment"], s["ends_at"]) for s in active] == [
            (kept["id"], "muted", "maintenance", kept["ends_at"])
        ]
        assert app.silences.matching("muted", "non_finite") == [kept["id"]]
        run_stream(app.grpc_target, [hello_frame(run="muted"), report_frame(1, grad_norm=NAN)])
        assert app.alert_book.firing_alert("muted", "non_finite") is not None
        (note,) = [n for n in app.notifier.view() if n["run"] == "muted"]
        assert note["silenced_by"] == [kept["id"]] and not note["notified"]
        assert metric(scrape(app), "gradwatch_alerts_muted", reason="silenced") == 1
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- the CLI: token and terminal safety


def _cli(*argv: str, env: dict[str, str] | None = None, monkeypatch=None) -> tuple[int, str]:
    out = io.StringIO()
    if monkeypatch is not None:
        for key in ("GRADWATCH_API_TOKEN", "GRADWATCH_TOKEN", "GRADWATCH_HTTP"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "stdout", out)
    code = cli_main(list(argv))
    return code, out.getvalue()


def test_every_client_command_takes_a_token(tokens: Path, monkeypatch, capsys) -> None:
    app = start_app(secure_config(tokens_file=tokens))
    try:
        agent = (("authorization", f"Bearer {AGENT}"),)
        assert flush_outcome(app.grpc_target, hello(run="tok"), metadata=agent)[0] == grpc.StatusCode.OK
        for command in (["runs"], ["alerts"], ["incidents"], ["runs", "show", "tok"], ["top", "--once"]):
            code, out = _cli(*command, "--server", app.http_url, monkeypatch=monkeypatch)
            assert code == 1 and "401" in out + capsys.readouterr().err, command
            code, out = _cli(*command, "--server", app.http_url, "--token", READER, monkeypatch=monkeypatch)
            lists_runs = command[0] in ("runs", "top")
            assert code == 0 and ("tok" in out or not lists_runs), command
            code, out = _cli(*command, "--server", app.http_url, env={"GRADWATCH_API_TOKEN": READER},
                             monkeypatch=monkeypatch)  # fmt: skip
            assert code == 0 and ("tok" in out or not lists_runs), command
        code, _ = _cli("report", "nope", "--server", app.http_url, "--token", READER, monkeypatch=monkeypatch)
        assert code == 1 and "401" not in capsys.readouterr().err
    finally:
        app.stop(grace=0)


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[31mevil\x9b1m\u202ehost\r\nx"


def test_terminal_escapes_from_agents_never_reach_the_terminal(monkeypatch) -> None:
    app = start_app()
    try:
        frame = hello_frame(run="esc")
        frame.hello.host = HOSTILE
        frame.hello.agent_version = HOSTILE
        run_stream(app.grpc_target, [frame, report_frame(1)])
        for command in (["runs"], ["runs", "show", "esc"], ["top", "--once"]):
            code, out = _cli(*command, "--server", app.http_url, monkeypatch=monkeypatch)
            assert code == 0, command
            assert "evil" in out or command != ["runs", "show", "esc"]
            for bad in ("\x1b", "\x9b", "\x07", "\u202e", "\r"):
                assert bad not in out, (command, bad)
    finally:
        app.stop(grace=0)


# ---------------------------------------------------------------------- the agent: a stopped server


def test_agent_does_not_say_ready_while_the_server_is_stopped(tmp_path: Path) -> None:
    """SIGSTOP keeps the server's TCP connections open, so the stream never fails; the agent's stream_state
    turns "unresponsive" once its written reports wait over ACK_OVERDUE_S for an acknowledgement, and
    "ready" again after SIGCONT."""
    torch = pytest.importorskip("torch")
    import gradwatch
    from agent_support import batch, make_mlp
    from gradwatch.agent.sender import ACK_OVERDUE_S

    code = (
        "import sys\nfrom gradwatch.server.app import serve\nfrom gradwatch.server.config import config_from_args\n"
        "sys.exit(serve(config_from_args(grpc_port=0, http_port=0, grpc_host='127.0.0.1', http_host='127.0.0.1',"
        " environ={}, data_dir=sys.argv[1])))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], stderr=subprocess.PIPE, text=True)
    monitor = None
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        port = int(line.split("gRPC on 127.0.0.1:")[1].split(",")[0])
        model = make_mlp()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        monitor = gradwatch.attach(model, optimizer, run="sigstop", server=f"127.0.0.1:{port}")
        step = 0

        def train_until(state: str, timeout: float) -> float:
            nonlocal step
            started = time.monotonic()
            while time.monotonic() - started < timeout:
                step += 1
                x, y = batch(step)
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss)
                if monitor.counters()["stream_state"] == state:
                    return time.monotonic() - started
                time.sleep(0.02)
            raise AssertionError(f"no {state!r} after {timeout} s: {monitor.counters()}")

        train_until("ready", 20)
        proc.send_signal(signal.SIGSTOP)
        waited = train_until("unresponsive", ACK_OVERDUE_S + 10)
        assert waited > ACK_OVERDUE_S - 1
        proc.send_signal(signal.SIGCONT)
        train_until("ready", 15)
    finally:
        proc.send_signal(signal.SIGCONT)
        if monitor is not None:
            monitor.close()
        proc.terminate()
        proc.wait(15)
