"""Process-level checks: the server never imports torch; `serve` exits 0 promptly on SIGTERM."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def test_server_modules_never_import_torch() -> None:
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        import gradwatch.server
        names = [m.name for m in pkgutil.walk_packages(gradwatch.server.__path__, "gradwatch.server.")]
        for name in names:
            importlib.import_module(name)
        assert len(names) >= 10, names
        print("torch" in sys.modules, len(names))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    loaded, _count = result.stdout.split()
    assert loaded == "False", "a server module imported torch"


def test_serve_exits_zero_promptly_on_sigterm(tmp_path: pathlib.Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from gradwatch.server.app import serve
        from gradwatch.server.config import config_from_args
        sys.exit(serve(config_from_args(grpc_port=0, http_port=0, grpc_host="127.0.0.1",
                                        http_host="127.0.0.1", environ={})))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the one start-up line: the server is listening
        assert "gRPC on 127.0.0.1:" in line, line
        port = int(line.split("gRPC on 127.0.0.1:")[1].split(",")[0])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - sent < 8.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
