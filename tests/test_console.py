"""What the operator reads: the server's console (timestamps, levels, JSON), bind errors, CLI pipes, bench flags."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
from typing import Any

from gradwatch.server.app import ServerApp
from gradwatch.server.config import ServerConfig
from gradwatch.v1 import gradwatch_pb2 as pb
from server_support import hello_frame, http_get, report_frame, run_stream, sample
from wait_support import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[1]
WAIT_S = 30.0
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def serve(tmp_path: pathlib.Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1", "--data-dir", str(tmp_path / "d"),
               *args]  # fmt: skip
    env = {**os.environ, "GRADWATCH_CONFIG": ""}
    return subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)


def reported_ports(port_file: pathlib.Path, proc: subprocess.Popen[str]) -> dict[str, int]:
    """The ports `gradwatch serve --port-file` wrote, once it has written them."""

    def written() -> bool:
        assert port_file.exists() or proc.poll() is None, proc.communicate()[1]
        return port_file.exists()

    wait_until(written, WAIT_S, what="the port file", interval=0.05)
    return dict(json.loads(port_file.read_text()))


def wait_healthy(port: int, proc: subprocess.Popen[str]) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            return http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        except OSError:
            return False

    wait_until(healthy, WAIT_S, what="the server's /healthz", interval=0.05)


def test_serve_logs_json_lines_a_fire_and_its_resolution_once_and_the_shutdown(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "gradwatch.yaml"
    # Re-sends every 0.2 s (none of them may be logged again); a finished run expires, resolving its alert, after 1 s.
    config.write_text("alerting: {resend_interval_s: 0.2, log: true}\nfinished_run_retention_s: 1\n")
    port_file = tmp_path / "ports.json"
    proc = serve(tmp_path, "--grpc-port", "0", "--http-port", "0", "--port-file", str(port_file), "--config",
                 str(config), "--log-format", "json")  # fmt: skip
    try:
        ports = reported_ports(port_file, proc)
        grpc_port, http_port = ports["grpc"], ports["http"]
        assert sorted(ports) == ["grpc", "http"] and 0 not in ports.values(), ports
        wait_healthy(http_port, proc)
        target = f"127.0.0.1:{grpc_port}"
        run_stream(target, [hello_frame(run="loud"), report_frame(1, loss=math.nan)])
        # The log sink delivers the fire and then re-sends every 0.2 s: wait for three re-sends (not a sleep).
        wait_until(lambda: sent_to_log(http_port) >= 4, WAIT_S, what="three re-sends", interval=0.05)
        run_stream(target, [hello_frame(run="loud"), pb.AgentFrame(seq=0, goodbye=pb.Goodbye(final_step=1))])
        wait_until(lambda: [a["state"] for a in get_alerts(http_port)["alerts"]] == ["resolved"], WAIT_S,
                   what="the alert to resolve", interval=0.05)  # fmt: skip
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    for entry in lines:
        assert ISO_UTC.match(entry["time"]) and entry["level"] in ("INFO", "WARNING", "ERROR"), entry
        assert {"logger", "message"} <= entry.keys()
    alerts = [e for e in lines if e["logger"] == "gradwatch.alerts" and "run=loud" in e["message"]]
    assert [(e["level"], e["message"].split()[1]) for e in alerts] == [("WARNING", "firing"), ("INFO", "resolved")]
    # The first line names the ports the system chose, the same the port file reported.
    assert f"gRPC on 127.0.0.1:{grpc_port}, HTTP on http://127.0.0.1:{http_port} " in lines[0]["message"]
    assert lines[-2]["message"].startswith("SIGTERM received: stopping")
    assert lines[-1]["message"].startswith("gradwatch server stopped")


def sent_to_log(port: int) -> float:
    text = http_get(f"http://127.0.0.1:{port}/metrics")[2].decode()
    return sample(text, "gradwatch_alert_notifications_total", sink="log", outcome="sent") or 0.0


def get_alerts(port: int) -> Any:
    return json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/alerts")[2])


def test_serve_bind_errors_name_the_port_in_one_line_without_grpc_core_output(tmp_path: pathlib.Path) -> None:
    app = ServerApp(ServerConfig.local()).start()
    try:
        for clash in (["--grpc-port", str(app.grpc_port), "--http-port", "0"],
                      ["--grpc-port", "0", "--http-port", str(app.http_port)]):  # fmt: skip
            proc = serve(tmp_path, *clash)
            _, err = proc.communicate(timeout=WAIT_S)
            assert proc.returncode == 1, err
            (line,) = err.splitlines()  # one line: no gRPC core lines, no traceback
            what = "gRPC" if clash[1] != "0" else "HTTP"
            port = clash[1] if what == "gRPC" else clash[3]
            assert re.search(rf" ERROR +gradwatch\.server\.app: cannot bind {what} to 127\.0\.0\.1:{port}: ", line), (
                line
            )
    finally:
        app.stop()


def test_cli_into_a_closed_pipe_ends_quietly() -> None:
    app = ServerApp(ServerConfig.local()).start()
    try:
        for i in range(60):  # enough JSON to overflow a pipe buffer
            run_stream(app.grpc_target, [hello_frame(run=f"run-{i:03d}", session=f"s{i}")])
        for command in (["runs", "--json"], ["runs"], ["alerts"], ["incidents"]):
            proc = subprocess.Popen([sys.executable, "-m", "gradwatch", *command, "--server", app.http_url],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
            assert proc.stdout is not None and proc.stderr is not None
            proc.stdout.readline()
            proc.stdout.close()  # as `head -1` does
            err = proc.stderr.read().decode()
            assert proc.wait(timeout=WAIT_S) in (0, 141), err
            assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    finally:
        app.stop()


def test_detection_quality_refuses_an_unknown_scenario_name() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "detection_quality.py"), "--only", "nan", "nosuch"],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 2 and "unknown scenario(s) nosuch; known: nan," in result.stderr, result.stderr


def test_serve_with_an_unwritable_port_file_stops_with_one_line_naming_it(tmp_path: pathlib.Path) -> None:
    port_file = tmp_path / "missing-dir" / "ports.json"
    proc = serve(tmp_path, "--grpc-port", "0", "--http-port", "0", "--port-file", str(port_file))
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2, err
    (line,) = [entry for entry in err.splitlines() if " ERROR " in entry]
    assert "cannot write the port file" in line and str(port_file) in line, line
    assert not port_file.parent.exists()
