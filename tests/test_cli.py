"""The `gradwatch` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from wait_support import wait_until


def _gradwatch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cli_version_prints_the_package_version() -> None:
    import gradwatch

    result = _gradwatch("version")
    assert result.returncode == 0
    assert result.stdout.strip() == gradwatch.__version__


@pytest.mark.parametrize(
    ("fault", "detector"), [("nan", "non_finite"), ("explode", "exploding_gradient")]
)
def test_cli_demo_reports_the_injected_fault(fault: str, detector: str) -> None:
    pytest.importorskip("torch")
    result = _gradwatch("demo", "--fault", fault, "--steps", "160", "--fault-step", "100")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"] {detector} — rank 0, step " in out
    assert "fault injected at step 100; detected at step" in out


def test_cli_demo_healthy_run_prints_no_alert() -> None:
    pytest.importorskip("torch")
    result = _gradwatch("demo", "--fault", "none", "--steps", "200")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts raised: 0" in result.stdout
    assert "healthy run: no alerts" in result.stdout


def test_cli_demo_lists_every_fault_scenario() -> None:
    pytest.importorskip("torch")
    from gradwatch.scenarios.catalogue import faults

    result = _gradwatch("demo", "--list")
    assert result.returncode == 0, result.stderr
    for sc in faults():
        assert f"{sc.name} " in result.stdout and f"→ {sc.expect}:" in result.stdout
    assert result.stdout.startswith("none ")


def test_cli_demo_runs_a_catalogue_fault_with_its_own_defaults() -> None:
    pytest.importorskip("torch")
    result = _gradwatch("demo", "--fault", "spike")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "] loss_spike — rank 0, step 100" in result.stdout
    assert "fault injected at step 100; detected at step 100 (0 steps" in result.stdout


def test_cli_demo_rejects_unknown_faults_and_steps_for_built_in_ones() -> None:
    pytest.importorskip("torch")
    result = _gradwatch("demo", "--fault", "gremlins")
    assert result.returncode == 2
    assert "unknown fault 'gremlins'" in result.stderr and "lr_zero" in result.stderr
    result = _gradwatch("demo", "--fault", "deep_sigmoid", "--fault-step", "20")
    assert result.returncode == 2 and "built into the set-up" in result.stderr


def test_demo_catches_every_catalogue_fault() -> None:
    """Every fault scenario with a CPU recipe runs under the demo and raises its detector (exit code 0)."""
    pytest.importorskip("torch")
    import io

    from gradwatch.demo import run_demo
    from gradwatch.scenarios.catalogue import faults

    failures = {}
    for sc in faults():
        out, err = io.StringIO(), io.StringIO()
        code = run_demo(fault=sc.name, out=out, err=err)
        if code != 0 or f"] {sc.expect} — rank 0" not in out.getvalue():
            failures[sc.name] = out.getvalue()[-600:] + err.getvalue()
    assert not failures, failures


def test_cli_demo_rejects_fault_step_beyond_steps() -> None:
    result = _gradwatch("demo", "--steps", "10", "--fault-step", "11")
    assert result.returncode == 2
    assert "beyond --steps" in result.stderr


def test_cli_serve_rejects_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("detectors:\n  no_such_detector: {}\n")
    result = _gradwatch("serve", "--config", str(config), "--grpc-port", "0", "--http-port", "0", timeout=30)
    assert result.returncode == 2
    assert "no_such_detector" in result.stderr


def test_cli_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port_file = tmp_path / "ports.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1", "--grpc-port", "0",
         "--http-port", "0", "--port-file", str(port_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,  # its ./gradwatch-data
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:

        def runs() -> bytes | None:
            try:
                http_port = json.loads(port_file.read_text())["http"]
                return urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/runs", timeout=1).read()
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                return None

        body = wait_until(runs, 30, what="the server to come up", interval=0.1)
        assert json.loads(body) is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
