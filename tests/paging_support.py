"""Real Prometheus and Alertmanager processes on loopback, and a real webhook receiver, for the paging tests.

Each binary runs with its own temporary directory and is stopped by the context manager. `gradwatch serve`
binds port 0 and reports its ports (`--port-file`); the Debian binaries cannot, so they are started on a
port found free and started again on another when that bind fails (`_on_free_port`). A missing binary fails
the test with the install command (CI installs them with scripts/install-dev.sh; they are never skipped).
bench/alert_latency.py uses the same helpers.
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

from wait_support import wait_until

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


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port on which connections are refused while the block runs: bound here and never listening,
    so no other process can take it meanwhile (an address where "nothing listens")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def released_port() -> int:
    """A port the system chose for a socket bound here and then closed. Bind, release, reuse is a race (another
    process may take the port in between), so this is only for addresses that must be known before anything
    binds them: a server started (or restarted) later on an address an agent or relay already holds (the
    accepted exception: the port was just ours), torch.distributed's rendezvous (MASTER_PORT must be known to
    every rank before rank 0 binds it), and a cluster's peer list (each replica is configured with every
    replica's address). Our own servers otherwise bind port 0 and report their ports (ServerApp.grpc_port and
    http_port, `gradwatch serve --port-file`); the Debian binaries, which cannot report theirs, go through
    `_on_free_port`, which retries when the bind fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
    def ready() -> bool:
        if proc.poll() is not None:  # RuntimeError: _on_free_port retries a bind that failed
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until(ready, READY_TIMEOUT_S, what=url, interval=0.05, detail=lambda: log.read_text()[-3000:])


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
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


BIND_ATTEMPTS = 5


@contextlib.contextmanager
def _on_free_port(
    make_args: Callable[[int], list[str]], ready_path: str, workdir: pathlib.Path, name: str
) -> Iterator[str]:
    """Run a binary that cannot report the port it bound (Debian's prometheus, alertmanager) on a released_port();
    when that port was taken in between, the binary exits naming "address already in use" and is started again
    on another (up to BIND_ATTEMPTS times). Yields its URL once `ready_path` answers."""
    for attempt in range(1, BIND_ATTEMPTS + 1):
        port = released_port()
        url = f"http://127.0.0.1:{port}"
        running = False
        try:
            with _process(make_args(port), url + ready_path, workdir, name):
                running = True
                yield url
                return
        except RuntimeError:
            retry = not running and attempt < BIND_ATTEMPTS
            if not retry or "address already in use" not in (workdir / f"{name}.log").read_text():
                raise


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
    """A running `gradwatch serve`: its gRPC target, HTTP base URL, process id, the ports it bound, its process."""

    target: str
    http_url: str
    pid: int
    grpc_port: int
    http_port: int
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def gradwatch_process(
    workdir: pathlib.Path, *args: str, grpc_port: int = 0, http_port: int = 0, log_name: str = "gradwatch"
) -> Iterator[ServerProcess]:
    """gradwatch_serve, yielding its ServerProcess. Port 0 (the default) lets the server bind any free port and
    report it (`--port-file`); fixed ports are for a restart on the address a first server reported. The output
    is appended to workdir/`log_name`.log (a restart adds to its predecessor's log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / f"{log_name}.ports.json"
    port_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "gradwatch", "serve", "--host", "127.0.0.1", "--grpc-port", str(grpc_port),
               "--http-port", str(http_port), "--port-file", str(port_file), *args]  # fmt: skip
    env = {**os.environ, "GRADWATCH_CONFIG": ""}
    log = workdir / f"{log_name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    try:

        def written() -> bool:
            if proc.poll() is not None and not port_file.exists():
                raise RuntimeError(f"gradwatch serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            return port_file.exists()

        wait_until(written, READY_TIMEOUT_S, what="gradwatch serve's port file", interval=0.05,
                   detail=lambda: log.read_text()[-3000:])  # fmt: skip
        ports = json.loads(port_file.read_text())
        http_url = f"http://127.0.0.1:{ports['http']}"
        _wait_ready(f"{http_url}/healthz", proc, "gradwatch serve", log)
        yield ServerProcess(f"127.0.0.1:{ports['grpc']}", http_url, proc.pid, ports["grpc"], ports["http"], proc)
    finally:
        _stop(proc)


@contextlib.contextmanager
def alertmanager(config: dict[str, Any], workdir: pathlib.Path) -> Iterator[str]:
    """Run Debian's prometheus-alertmanager (single node, no clustering) with `config`; yields its URL."""
    binary = find_binary("prometheus-alertmanager", "alertmanager")
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "alertmanager.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def args(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config_file}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    with _on_free_port(args, "/-/ready", workdir, "alertmanager") as url:
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

    def args(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]

    with _on_free_port(args, "/-/ready", workdir, "prometheus") as url:
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
