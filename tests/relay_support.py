"""`gradwatch serve` processes for tests of the two tiers: an aggregator and relays on loopback, port 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Cross-rank thresholds for seconds-long jobs, as cluster_support.cluster_config (YAML for real processes).
CLUSTER_YAML = """
alerting: {log: false}
detectors:
  rank_divergence: {consecutive: 4}
  straggler: {consecutive: 3, min_reports: 6}
  stalled: {floor_s: 8.0, factor: 20.0}
  throughput_drop: {ratio: 0.4, min_steps: 8, recent: 5, consecutive: 6, sustain_s: 2.0}
"""
_LISTENING = re.compile(r"gRPC on [^:]+:(\d+), HTTP on (https?)://[^:]+:(\d+)")
START_TIMEOUT_S = 60.0


class Serve:
    """One `gradwatch serve` process; `grpc_target` and `http_url` once it listens."""

    def __init__(self, tmp: Path, name: str, *args: str, config: str = CLUSTER_YAML) -> None:
        home = tmp / name
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.yaml").write_text(config)
        self.log = home / "serve.log"
        command = [
            sys.executable,
            "-m",
            "gradwatch.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--config",
            str(home / "config.yaml"),
            "--data-dir",
            str(home / "data"),
            *args,
        ]
        env = {**os.environ, "GRADWATCH_LOG_LEVEL": "INFO"}
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(command, stderr=self._out, stdout=self._out, env=env, cwd=home)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = _LISTENING.search(self.log.read_text())
            if found:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gradwatch serve {name} did not start:\n{self.log.read_text()}")
            time.sleep(0.1)
        self.grpc_target = f"127.0.0.1:{found.group(1)}"
        self.http_url = f"{found.group(2)}://127.0.0.1:{found.group(3)}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode
