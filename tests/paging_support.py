"""Real Prometheus and Alertmanager processes on loopback, and a real webhook receiver, for the paging tests.

Each binary runs on a free port with its own temporary directory and is stopped by
the context manager. A missing binary fails the test with the install command (CI
installs them with scripts/install-dev.sh; they are never skipped). bench/alert_latency.py
uses the same helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY_ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DEPLOY_RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
READY_TIMEOUT_S = 30.0


class MissingBinary(RuntimeError):
    pass


def find_binary(*names: str) -> str:
    """Path of the first of `names` on PATH; MissingBinary naming the Debian package otherwise."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise MissingBinary(
        f"none of {names} is installed: run scripts/install-dev.sh "
        "(apt-get install prometheus prometheus-alertmanager)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- webhook receiver


@dataclass(frozen=True)
class Delivery:
    """One POST: when it arrived (time.time()), its path and JSON payload (a webhook document, or the
    bare alert list of Alertmanager's own API when the receiver stands in for an Alertmanager)."""

    received_at: float
    path: str
    payload: Any

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return list(self.payload if isinstance(self.payload, list) else self.payload.get("alerts", []))


class WebhookReceiver:
    """An HTTP server on 127.0.0.1:0 that records every JSON POST (Alertmanager's webhook receiver, or a
    stand-in Alertmanager for the server's push)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.deliveries: list[Delivery] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                arrived = time.time()
                with receiver._cond:
                    receiver.deliveries.append(Delivery(arrived, self.path, json.loads(body)))
                    receiver._cond.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait_alert(
        self, predicate: Callable[[Delivery, dict[str, Any]], bool], timeout: float
    ) -> tuple[Delivery, dict[str, Any]] | None:
        """The first (delivery, alert) whose alert satisfies `predicate`, waiting up to `timeout` seconds."""

        def find() -> tuple[Delivery, dict[str, Any]] | None:
            for delivery in self.deliveries:
                for alert in delivery.alerts:
                    if predicate(delivery, alert):
                        return delivery, alert
            return None

        with self._cond:
            found: list[tuple[Delivery, dict[str, Any]] | None] = [None]

            def check() -> bool:
                found[0] = find()
                return found[0] is not None

            self._cond.wait_for(check, timeout)
            return found[0]


# ---------------------------------------------------------------------- processes


def _wait_ready(url: str, proc: subprocess.Popen[bytes], name: str, log: pathlib.Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {READY_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(
    args: list[str], ready_url: str, workdir: pathlib.Path, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    try:
        _wait_ready(ready_url, proc, name, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def gradwatch_serve(workdir: pathlib.Path, *args: str) -> Iterator[str]:
    """`gradwatch serve` on free loopback ports in a subprocess (extra CLI `args`, no config file from the
    environment); yields its gRPC target once /healthz answers. Its output goes to workdir/gradwatch.log."""
    with gradwatch_server(workdir, *args) as (target, _):
        yield target


@contextlib.contextmanager
def gradwatch_server(workdir: pathlib.Path, *args: str) -> Iterator[tuple[str, int]]:
    """gradwatch_serve, also yielding the server's process id (to read its CPU time)."""
    with gradwatch_process(workdir, *args) as server:
        yield server.target, server.pid


@dataclass(frozen=True)
class ServerProcess:
    """A running `gradwatch serve`: its gRPC target, HTTP base URL and process id."""

    target: str
    http_url: str
    pid: int


@contextlib.contextmanager
def gradwatch_process(workdir: pathlib.Path, *args: str) -> Iterator[ServerProcess]:
    """gradwatch_serve, yielding its ServerProcess."""
    grpc_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), *args]  # fmt: skip
    env = {**os.environ, "GRADWATCH_CONFIG": ""}
    http_url = f"http://127.0.0.1:{http_port}"
    with _process(command, f"{http_url}/healthz", workdir, "gradwatch", env) as proc:
        yield ServerProcess(f"127.0.0.1:{grpc_port}", http_url, proc.pid)


@contextlib.contextmanager
def alertmanager(config: dict[str, Any], workdir: pathlib.Path) -> Iterator[str]:
    """Run Debian's prometheus-alertmanager (single node, no clustering) with `config`; yields its URL."""
    binary = find_binary("prometheus-alertmanager", "alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    args = [
        binary,
        f"--config.file={config_file}",
        f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with _process(args, url + "/-/ready", workdir, "alertmanager"):
        yield url


@contextlib.contextmanager
def prometheus(config: dict[str, Any], rules: dict[str, Any], workdir: pathlib.Path) -> Iterator[str]:
    """Run Debian's prometheus with `config` (its rule_files set to `rules`); yields its URL."""
    binary = find_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    rules_file = workdir / "rules.yml"
    rules_file.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump({**config, "rule_files": [str(rules_file)]}, sort_keys=False))
    port = free_port()
    args = [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with _process(args, url + "/-/ready", workdir, "prometheus"):
        yield url


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    """Instant query; the result vector."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


# ---------------------------------------------------------------------- configurations


def routing_config(receiver_url: str, *, group_interval: str = "1s") -> dict[str, Any]:
    """deploy/alertmanager/alertmanager.yml with every receiver replaced by a webhook to
    `receiver_url`/<receiver name> and every group_interval shortened (so resolutions arrive in
    seconds). The routing tree, group_wait and the inhibit rules are the deployed ones."""
    config = yaml.safe_load(DEPLOY_ALERTMANAGER.read_text())
    config["receivers"] = [
        {"name": r["name"], "webhook_configs": [{"url": f"{receiver_url}/{r['name']}", "send_resolved": True}]}
        for r in config["receivers"]
    ]

    def shorten(route: dict[str, Any]) -> None:
        if "group_interval" in route or route is config["route"]:
            route["group_interval"] = group_interval
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return config
