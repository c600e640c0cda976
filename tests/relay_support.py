"""`gradwatch serve` processes for tests of the two tiers: an aggregator and relays on loopback, port 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from server_support import metric
from wait_support import wait_until

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
        self.config = config
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

        def listening() -> re.Match[str] | None:
            found = _LISTENING.search(self.log.read_text())
            if not found and self.proc.poll() is not None:
                raise RuntimeError(f"gradwatch serve {name} exited:\n{self.log.read_text()}")
            return found

        found = wait_until(listening, START_TIMEOUT_S, what=f"gradwatch serve {name} to listen", interval=0.1,
                           detail=self.log.read_text)  # fmt: skip
        self.grpc_target = f"127.0.0.1:{found.group(1)}"
        self.http_url = f"{found.group(2)}://127.0.0.1:{found.group(3)}"
        self.http_address = f"127.0.0.1:{found.group(3)}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=10) as response:
            return json.loads(response.read())

    def write(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """`method path` with a JSON body: (status, JSON answer), errors included."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ticks(self) -> int:
        """Completed passes of the server's cross-rank detectors (gradwatch_detector_ticks_total on /metrics)."""
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=10) as response:
            return int(metric(response.read().decode(), "gradwatch_detector_ticks_total"))

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


#: CLUSTER_YAML for replicas whose tests leave runs quiet (streams ended without a goodbye) and read their alerts
#: later: such a run is not called stalled within the test, whatever the load.
QUIET_YAML = CLUSTER_YAML.replace(
    "stalled: {floor_s: 8.0, factor: 20.0}", "stalled: {floor_s: 600.0, silent_after_s: 600.0}"
)


def serve_peers(tmp: Path, names: str, config: str = QUIET_YAML, cluster: str = "") -> list[Serve]:
    """One `gradwatch serve` per letter of `names`, each with `cluster.peers` naming every one of them (one view
    over all replicas, server/fanout.py) and the other `cluster` settings given (YAML flow entries, e.g.
    "silence_sync_s: 0.5"); `Serve.http_address` is the address the others know it by. A replica stopped can be
    started again as `Serve(tmp, name, "--http-port", port, config=started.config)` (same data directory)."""
    from paging_support import released_port  # the peer list must be known before any replica binds

    assert "stalled: {floor_s: 600.0" in QUIET_YAML
    ports = [released_port() for _ in names]
    listed = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    config += f"cluster: {{peers: [{listed}]{', ' + cluster if cluster else ''}}}\n"
    started: list[Serve] = []
    try:
        for name, port in zip(names, ports, strict=True):
            started.append(Serve(tmp, name, "--http-port", str(port), config=config))
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started
