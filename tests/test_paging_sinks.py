"""Sinks and their delivery workers, against real receivers: Alertmanager's API v2 (the real binary), a
JSON webhook, the log; retries with backoff, giving up, coalescing, bounded queues, prompt stop."""

from __future__ import annotations

import json
import logging
import pathlib
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gradwatch.server.sinks import (
    AlertmanagerSink,
    DeliveryError,
    DeliveryPolicy,
    InMemorySink,
    LogSink,
    Notification,
    SinkWorker,
    WebhookSink,
)
from gradwatch.server.sinks.base import rfc3339
from paging_support import MissingBinary, WebhookReceiver, alertmanager, refused_port, routing_config
from wait_support import wait_until

WAIT_S = 10.0
FAST = DeliveryPolicy(timeout_s=2.0, initial_backoff_s=0.01, max_backoff_s=0.05, deadline_s=5.0)


def notification(fp: str = "f1", status: str = "firing", run: str = "r", ends_in_s: float = 240.0) -> Notification:
    now = time.time()
    return Notification(
        fingerprint=fp,
        status=status,
        labels={"alertname": "GradwatchNonFinite", "run": run, "detector": "non_finite", "severity": "critical"},
        annotations={"summary": f"[{run}] NaN", "description": "d", "runbook_url": "http://rb/non_finite.md"},
        starts_at=now - 1.0,
        ends_at=now + ends_in_s,
        generator_url="http://gradwatch.test:9400/api/v1/alerts?run=r",
    )


class StatusServer:
    """A real HTTP receiver answering the scripted statuses in turn (then 200), counting requests."""

    def __init__(self, statuses: Sequence[int] = ()) -> None:
        self.statuses = list(statuses)
        self.bodies: list[Any] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status = server.statuses.pop(0) if server.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/hook"

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


class GatedSink(InMemorySink):
    """Records batches, but each delivery first waits until `gate` is set (a slow receiver); `entered` is
    set once a delivery is under way."""

    def __init__(self) -> None:
        super().__init__("gated")
        self.gate = threading.Event()
        self.entered = threading.Event()

    def deliver(self, batch: Sequence[Notification], timeout_s: float) -> None:
        self.entered.set()
        self.gate.wait(WAIT_S)
        super().deliver(batch, timeout_s)


@pytest.fixture
def status_server() -> Iterator[StatusServer]:
    server = StatusServer()
    yield server
    server.close()


def _worker(sink: Any, policy: DeliveryPolicy = FAST) -> SinkWorker:
    worker = SinkWorker(sink, policy)
    worker.start()
    return worker


def test_alertmanager_sink_pushes_to_real_alertmanager_and_resolves(tmp_path: pathlib.Path) -> None:
    try:
        with WebhookReceiver() as receiver, alertmanager(routing_config(receiver.url), tmp_path) as am_url:
            worker = _worker(AlertmanagerSink(am_url + "/"))
            worker.submit([notification()])
            fired = receiver.wait_alert(lambda d, a: a["status"] == "firing", WAIT_S)
            assert fired is not None and fired[0].path == "/pager"
            assert fired[1]["labels"]["alertname"] == "GradwatchNonFinite"
            assert fired[1]["annotations"]["runbook_url"] == "http://rb/non_finite.md"
            assert fired[1]["generatorURL"] == "http://gradwatch.test:9400/api/v1/alerts?run=r"
            with urllib.request.urlopen(am_url + "/api/v2/alerts", timeout=WAIT_S) as response:
                [active] = json.loads(response.read())
            assert active["labels"]["run"] == "r" and active["status"]["state"] == "active"

            worker.submit([notification(status="resolved", ends_in_s=-0.5)])
            resolved = receiver.wait_alert(lambda d, a: a["status"] == "resolved", WAIT_S)
            assert resolved is not None and resolved[1]["startsAt"] == fired[1]["startsAt"]
            worker.stop()
            assert worker.snapshot().outcomes == {"sent": 2, "retried": 0, "failed": 0, "dropped": 0}
    except MissingBinary as exc:
        pytest.fail(str(exc))


def test_alertmanager_sink_posts_api_v2_alert_list_without_status_fields(status_server: StatusServer) -> None:
    sink = AlertmanagerSink(status_server.url.removesuffix("/hook"))
    assert sink.name == f"alertmanager:127.0.0.1:{status_server.http.server_address[1]}"
    n = notification()
    sink.deliver([n], 2.0)
    [alert] = status_server.bodies[-1]
    assert alert == {
        "labels": dict(n.labels),
        "annotations": dict(n.annotations),
        "startsAt": rfc3339(n.starts_at),
        "endsAt": rfc3339(n.ends_at),
        "generatorURL": n.generator_url,
    }


def test_sink_http_errors_are_classified_retryable_or_not(status_server: StatusServer) -> None:
    sink = WebhookSink(status_server.url)
    for status, retryable in ((500, True), (503, True), (408, True), (429, True), (400, False), (404, False)):
        status_server.statuses = [status]
        with pytest.raises(DeliveryError) as info:
            sink.deliver([notification()], 2.0)
        assert info.value.retryable is retryable, status
        assert str(status) in str(info.value)


def test_webhook_sink_posts_versioned_document(status_server: StatusServer) -> None:
    WebhookSink(status_server.url).deliver([notification(), notification("f2", run="s")], 2.0)
    [body] = status_server.bodies
    assert body["version"] == "gradwatch/1" and body["source"] == "gradwatch"
    assert [a["fingerprint"] for a in body["alerts"]] == ["f1", "f2"]
    assert body["alerts"][0]["status"] == "firing" and body["alerts"][1]["labels"]["run"] == "s"


def test_log_sink_logs_firing_as_warning_and_resolved_as_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gradwatch.alerts")
    LogSink().deliver([notification(), notification(status="resolved")], 1.0)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gradwatch.alerts"]
    assert levels[0][0] == logging.WARNING and "alert firing" in levels[0][1] and "run=r" in levels[0][1]
    assert levels[1][0] == logging.INFO and "alert resolved" in levels[1][1]


def test_worker_retries_with_backoff_until_the_receiver_recovers(status_server: StatusServer) -> None:
    status_server.statuses = [503, 502, 429]
    worker = _worker(WebhookSink(status_server.url))
    worker.submit([notification()])
    assert worker.wait_idle(WAIT_S)
    worker.stop()
    assert worker.snapshot().outcomes == {"sent": 1, "retried": 3, "failed": 0, "dropped": 0}
    assert worker.snapshot().healthy and len(status_server.bodies) == 4


def test_worker_does_not_retry_a_rejected_payload(status_server: StatusServer) -> None:
    status_server.statuses = [400]
    worker = _worker(WebhookSink(status_server.url))
    worker.submit([notification()])
    assert worker.wait_idle(WAIT_S)
    worker.stop()
    assert worker.snapshot().outcomes == {"sent": 0, "retried": 0, "failed": 1, "dropped": 0}
    assert not worker.snapshot().healthy and len(status_server.bodies) == 1


@pytest.fixture
def unreachable() -> Iterator[str]:
    """The URL of an Alertmanager that refuses every connection (its port held, never listening)."""
    with refused_port() as port:
        yield f"http://127.0.0.1:{port}"


def test_worker_gives_up_after_the_deadline_when_unreachable(
    caplog: pytest.LogCaptureFixture, unreachable: str
) -> None:
    policy = DeliveryPolicy(timeout_s=0.5, initial_backoff_s=0.01, max_backoff_s=0.02, deadline_s=0.3)
    worker = _worker(AlertmanagerSink(unreachable), policy)
    worker.submit([notification(), notification("f2")])
    assert worker.wait_idle(WAIT_S)
    worker.stop()
    outcomes = worker.snapshot().outcomes
    assert outcomes["failed"] == 2 and outcomes["retried"] >= 2 and outcomes["sent"] == 0
    assert sum("failing" in r.getMessage() for r in caplog.records) == 1  # logged once per streak, not per try


def test_worker_coalesces_by_fingerprint_so_a_resolve_overtakes_a_queued_fire() -> None:
    sink = GatedSink()
    worker = _worker(sink)
    worker.submit([notification("busy")])  # occupies the thread until the gate opens
    assert sink.entered.wait(WAIT_S)
    worker.submit([notification("f1")])
    worker.submit([notification("f1", status="resolved", ends_in_s=-1)])
    assert worker.snapshot().pending == 1
    sink.gate.set()
    assert worker.wait_idle(WAIT_S)
    worker.stop()
    batches = [[(n.fingerprint, n.status) for n in b] for b in sink.batches]
    assert batches == [[("busy", "firing")], [("f1", "resolved")]]


def test_worker_bounds_pending_and_counts_drops() -> None:
    sink = GatedSink()
    worker = _worker(sink, DeliveryPolicy(max_pending=2))
    worker.submit([notification("busy")])
    assert sink.entered.wait(WAIT_S)
    started = time.perf_counter()
    worker.submit([notification(f"n{i}") for i in range(5)])
    assert time.perf_counter() - started < 0.05  # never blocks the caller (the ingest thread)
    assert worker.snapshot().pending == 2 and worker.snapshot().outcomes["dropped"] == 3
    sink.gate.set()
    assert worker.wait_idle(WAIT_S)
    worker.stop()


def test_worker_stop_interrupts_backoff_promptly(unreachable: str) -> None:
    policy = DeliveryPolicy(timeout_s=0.5, initial_backoff_s=30.0, max_backoff_s=30.0, deadline_s=600.0)
    worker = _worker(AlertmanagerSink(unreachable), policy)
    worker.submit([notification()])
    # The first attempt failed; then the worker waits 30 s before the next.
    wait_until(lambda: worker.snapshot().outcomes["retried"] > 0, WAIT_S, what="a failed first attempt",
               interval=0.01, detail=lambda: repr(worker.snapshot()))  # fmt: skip
    started = time.monotonic()
    worker.stop(timeout_s=5)
    assert time.monotonic() - started < 2.0
    assert worker.snapshot().outcomes["failed"] == 1
