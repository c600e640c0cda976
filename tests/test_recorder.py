"""Flight recorder and persistence: incidents from real training runs, a server killed with SIGKILL and restarted."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import pathlib
import signal
import sqlite3
import urllib.parse
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from gradwatch.agent.config import RetryPolicy  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig, StorageConfig  # noqa: E402
from gradwatch.server.database import DB_FILE, Database  # noqa: E402
from paging_support import ServerProcess, gradwatch_process  # noqa: E402
from server_support import get_json, http_get, metric, scrape  # noqa: E402
from wait_support import wait_until  # noqa: E402

WAIT_S = 30.0


def train(monitor: Any, training: DemoTraining, steps: range, faults: dict[int, str]) -> None:
    for step in steps:
        monitor.step(training.step(faults.get(step, "none")))


def incidents(url: str, **query: str) -> list[dict[str, Any]]:
    return list(get_json(f"{url}/api/v1/incidents?{urllib.parse.urlencode(query)}")["incidents"])


def complete(url: str, **query: str) -> list[dict[str, Any]]:
    return [i for i in incidents(url, **query) if i["status"] == "complete"]


def window(url: str, incident: str) -> dict[str, np.ndarray]:
    status, content_type, body = http_get(f"{url}/api/v1/incidents/{incident}/window")
    assert status == 200 and content_type == "application/octet-stream"
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def test_recorder_incident_for_injected_nan_holds_the_window_before_and_after_it(tmp_path: pathlib.Path) -> None:
    config = ServerConfig.local()
    config = config.__class__(**{**config.__dict__, "storage": StorageConfig(data_dir=str(tmp_path))})
    app = ServerApp(config).start()
    try:
        training = DemoTraining(seed=1)
        with gradwatch.attach(
            training.model, training.optimizer, run="rec-nan", server=app.grpc_target, overhead_budget=0
        ) as m:
            train(m, training, range(1, 101), {80: "nan"})
            assert m.close(timeout=10)
        (summary,) = wait_until(lambda: complete(app.http_url, detector="non_finite"), what="a complete incident")
        assert (summary["run"], summary["detector"], summary["severity"], summary["step"]) == (
            "rec-nan",
            "non_finite",
            "critical",
            80,
        )
        # 64 reports before (steps 17..80, the firing one last) and the 16 after it: steps 17..96.
        assert summary["steps"] == [17, 96]
        incident = get_json(f"{app.http_url}/api/v1/incidents/{summary['id'][:6]}")["incident"]
        assert incident["id"] == summary["id"] and incident["alert"]["step"] == 80
        assert incident["ranks"][0]["rank"] == 0 and incident["ranks"][0]["layers"] == ["0", "2", "4"]
        assert (incident["ranks"][0]["reports_before"], incident["ranks"][0]["reports_after"]) == (64, 16)
        assert incident["runbook_url"].endswith("non_finite.md") and incident["description"]
        first = incident["provenance"][0]
        assert (first["step"], first["kind"], first["rank"]) == (80, "non_finite", 0), incident["provenance"]
        arrays = window(app.http_url, summary["id"])
        rows = arrays["r0_rows"]
        assert rows["step"].tolist() == list(range(17, 97))
        assert np.isfinite(rows["loss"][rows["step"] < 80]).all() and rows["flags"][rows["step"] == 80][0] != 0
        # Per-layer columns of the full-statistics steps before the fault (every 10th), and of steps after it
        # (the server asks a firing rank for full statistics; when the command arrives depends on timing).
        steps = arrays["r0_steps"]
        assert {20, 30, 40, 50, 60, 70, 80}.issubset(set(steps.tolist())) and steps.max() > 80
        grad = arrays["r0_g_grad_norm"]
        assert grad.shape == (len(steps), 3) and grad.dtype == np.float32
        assert np.isfinite(grad[steps < 80]).all() and not np.isfinite(grad[steps >= 80]).any()
        # Histograms (32 bins a layer) only for the last 4 full-statistics reports before the alert, and after it.
        hist_steps = arrays["r0_hist_steps"]
        assert hist_steps[hist_steps < 80].tolist() == [50, 60, 70] and hist_steps.max() == steps.max()
        assert arrays["r0_g_grad_log2_histogram"].shape == (len(hist_steps), 3, 32)
        text = scrape(app)
        # One incident per warning/critical alert of the run (the NaN input also trips input_not_normalized).
        assert metric(text, "gradwatch_incidents_recorded_total") == len(incidents(app.http_url)) >= 1
        assert metric(text, "gradwatch_storage_incident_bytes") > 0
    finally:
        app.stop()
    # The incident is on disk: a second server on the same data_dir serves it.
    db = Database(StorageConfig(data_dir=str(tmp_path)), alert_history=10)
    (stored,), total = db.incidents(run="rec-nan", detector="non_finite")
    assert total == 1 and stored["status"] == "complete"


def test_recorder_healthy_run_records_no_incident() -> None:
    app = ServerApp(ServerConfig.local()).start()
    try:
        training = DemoTraining(seed=3)
        with gradwatch.attach(training.model, training.optimizer, run="rec-ok", server=app.grpc_target) as m:
            train(m, training, range(1, 121), {})
            assert m.close(timeout=10)
        assert incidents(app.http_url) == [] and app.recorder.opened == 0
    finally:
        app.stop()


def test_database_prune_counts_what_retention_deleted(tmp_path: pathlib.Path) -> None:
    now = [1_000_000.0]
    storage = StorageConfig(
        data_dir=str(tmp_path),
        max_incidents=3,
        incident_retention_s=100.0,
        max_incident_bytes=1 << 20,
        run_retention_s=100.0,
        max_runs=2,
    )
    db = Database(storage, alert_history=10, clock=lambda: now[0])
    sizes = (10, 10, 600_000, 600_000, 10)  # the two big windows do not fit 1 MiB together
    for i, (opened, size) in enumerate(
        zip((now[0] - 500, now[0] - 40, now[0] - 30, now[0] - 20, now[0] - 10), sizes, strict=True)
    ):
        db.put_incident(
            {
                "id": f"inc{i}",
                "run": "r",
                "detector": "non_finite",
                "severity": "critical",
                "alert_id": "a",
                "step": i,
                "opened_at": opened,
                "status": "complete",
            },
            b"x" * size,
        )
    for i, seen in enumerate((now[0] - 500, now[0] - 30, now[0] - 20, now[0] - 10)):
        db.put_run(
            {
                "run_id": f"run{i}",
                "job_name": "",
                "world_size": 1,
                "first_seen": seen,
                "last_seen": seen,
                "finished_at": None,
                "protocol_version": 1,
                "summary": {},
            }
        )
    deleted = db.prune(keep_runs=frozenset({"run0"}))  # run0 is still tracked: never pruned
    assert deleted == {
        ("incidents", "age"): 1,
        ("incidents", "count"): 1,
        ("incidents", "size"): 1,
        ("runs", "count"): 1,
    }
    assert [i["id"] for i in db.incidents()[0]] == ["inc4", "inc3"]
    assert [r["run_id"] for r in db.runs(10)] == ["run0", "run2", "run3"]
    assert db.pruned == deleted and db.prune() == {("runs", "age"): 1}  # untracked now: run0 is too old


# ---------------------------------------------------------------------- SIGKILL and restart


@contextlib.contextmanager
def serve_process(
    data_dir: pathlib.Path, log: pathlib.Path, *args: str, grpc_port: int = 0, http_port: int = 0
) -> Iterator[ServerProcess]:
    """`gradwatch serve` with a data dir (and extra CLI `args`), its output appended to `log`; yields it once
    /healthz answers. Port 0 (the default) binds free ports, which it reports; a restarted server that must be
    found again is given the ports its predecessor reported (a rebind of a port that was just ours, the one
    accepted exception to binding port 0: paging_support.released_port)."""
    with gradwatch_process(log.parent, "--data-dir", str(data_dir), *args, grpc_port=grpc_port,
                           http_port=http_port, log_name=log.stem) as server:  # fmt: skip
        yield server


def saved_step(data_dir: pathlib.Path, run: str) -> int | None:
    """The step the server last saved for `run` in its database (read-only, beside the running server)."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir / DB_FILE}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT summary FROM runs WHERE run_id = ?", (run,)).fetchall()
    return json.loads(rows[0][0]).get("step") if rows else None


def test_server_sigkilled_and_restarted_keeps_incident_alert_and_run_and_agents_resume(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gradwatch.agent")
    log = tmp_path / "serve.log"
    training = DemoTraining(seed=1)
    retry = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5)
    # The incident waits for 1000 reports after its alert: the server is killed while it is still recording.
    config = tmp_path / "gradwatch.yaml"
    config.write_text("recorder: {after_reports: 1000}\n")
    monitor = None
    try:
        with serve_process(tmp_path / "data", log, "--config", str(config)) as first:
            grpc_port, http_port = first.grpc_port, first.http_port
            url = first.http_url
            monitor = gradwatch.attach(training.model, training.optimizer, run="phoenix-rec", server=first.target,
                                       retry=retry)  # fmt: skip
            train(monitor, training, range(1, 61), {40: "nan"})
            (incident,) = wait_until(lambda: incidents(url, detector="non_finite"), what="a stored incident")
            assert incident["status"] == "recording" and incident["steps"][0] == 1
            (alert,) = get_json(f"{url}/api/v1/alerts?state=firing&detector=non_finite")["alerts"]
            runs_at_60 = lambda: [r for r in get_json(f"{url}/api/v1/runs")["runs"] if r["step"] == 60]  # noqa: E731
            (run,) = wait_until(runs_at_60, what="step 60")
            wait_until(lambda: saved_step(tmp_path / "data", "phoenix-rec") == 60, what="step 60 checkpointed")
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=10)
        train(monitor, training, range(61, 71), {})  # the agent keeps training while the server is down
        # Restarted first on a gRPC port the agent does not know, so that what was restored is seen before the
        # agent is back (it retries every 0.5 s at most); then on its own port, where the agent resumes.
        with serve_process(tmp_path / "data", log, "--config", str(config), http_port=http_port):
            assert [i["id"] for i in incidents(url, detector="non_finite")] == [incident["id"]]
            body = get_json(f"{url}/api/v1/incidents/{incident['id']}")["incident"]
            assert body["status"] == "interrupted" and body["step"] == 40
            rows = window(url, incident["id"])["r0_rows"]
            assert rows["step"][0] == 1 and 40 in rows["step"]  # the window before the alert survived
            (restored,) = get_json(f"{url}/api/v1/alerts?state=firing&detector=non_finite")["alerts"]
            for key in ("id", "run", "detector", "step", "started_at", "layer", "summary"):
                assert restored[key] == alert[key], key
            (again,) = get_json(f"{url}/api/v1/runs")["runs"]
            assert again["run"] == "phoenix-rec" and again["first_seen"] == run["first_seen"]
            assert again["restored"] and again["step"] == 60 and "non_finite" in again["firing"]
        with serve_process(tmp_path / "data", log, "--config", str(config), grpc_port=grpc_port, http_port=http_port):
            train(monitor, training, range(71, 81), {})
            # The agent's stream comes back (its next retry, 0.5 s at most) before it closes: closing first would
            # hand the queued reports to the final Flush instead, and the stream's resumption would go untested.
            wait_until(lambda: monitor.counters()["reconnects"] >= 1, what="the agent's reconnection")
            assert monitor.close(timeout=20)
            resumed = wait_until(
                lambda: [r for r in get_json(f"{url}/api/v1/runs/phoenix-rec/ranks")["ranks"] if r["step"] == 80],
                what="the agent's resumed stream",
            )
            # 1..60 saved before the kill, 61..80 queued during the outage and then live: the ring continues, and
            # what was applied before the kill is not applied twice (the rank's agent sessions were saved too).
            assert resumed[0]["reports"] == 80
            (series,) = get_json(f"{url}/api/v1/runs/phoenix-rec/series")["ranks"]
            assert series["step"] == list(range(1, 81))
            live = get_json(f"{url}/api/v1/runs/phoenix-rec")["run"]
            assert not live["restored"] and live["step"] == 80 and live["first_seen"] == run["first_seen"]
        # The agent said once that the server went away, and once that it was back.
        agent = [r.getMessage() for r in caplog.records if r.name == "gradwatch.agent" and r.levelno >= 20]
        assert sum("unavailable" in m for m in agent) == 1 and sum("reachable again" in m for m in agent) == 1, agent
    finally:
        if monitor is not None:
            monitor.close(timeout=1)


def test_recorder_memory_budget_shrinks_each_ranks_column_window_as_ranks_join() -> None:
    from gradwatch.server.config import RecorderConfig
    from server_support import columns, hello, report_frame, server_config

    layers, budget = 1024, 1 << 20
    config = dataclasses.replace(server_config(), recorder=RecorderConfig(max_bytes=budget))
    app = ServerApp(config)
    stats = columns(layers, grad_norm=1.0, grad_max_abs=1.0, weight_norm=1.0, update_ratio=0.1)
    for rank in range(8):
        session = app.ingestor.open(hello(rank=rank, world_size=8, layers=layers))
        for seq in range(1, 81):
            app.ingestor.apply(session, report_frame(seq, layers=stats), "report")
    windows = app.recorder._windows["run-a"]
    kept = [len(w.columns) for w in windows.values()]
    entry = 4 * 256 * 4  # what each entry holds: 4 columns × max_layers (256) float32, never all 1024 layers
    # Alone, rank 0 had room for the whole window (80 entries); as ranks joined, the budget was split: once the
    # total went over it, every rank was brought down to its share, budget // (8 ranks × entry) = 32 entries.
    assert kept == [budget // (8 * entry)] * 8 == [32] * 8
    assert sum(kept) * entry == app.recorder.kept_bytes() <= budget
    assert all(len(w.rows) == 80 for w in windows.values())  # scalar rows: the whole window, always


def test_recorder_incident_under_a_tight_budget_holds_full_statistics_from_before_its_alert(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A budget the every-step signals alone exceed (as the default 1 % on many CPU runs) stretches the
    full-statistics cadence far beyond the 64-report window: the incident still has per-layer columns from before
    the alert."""
    # Without the agent's time floor (10 s of steps: on a loaded machine that can be fewer than 64), so that the
    # cadence surely outgrows the window and what is tested is the recorder's reach back alone.
    monkeypatch.setattr("gradwatch.agent.budget.FLOOR_S", 1e9)
    app = ServerApp(ServerConfig.local()).start()
    try:
        training = DemoTraining(seed=3)
        # Full statistics every 4 steps until the budget decides (budget.WARMUP_REPORTS): two full reports (steps
        # 4 and 8) long before the alert, then none.
        with gradwatch.attach(training.model, training.optimizer, run="rec-budget", server=app.grpc_target,
                              overhead_budget=1e-6, full_stats_interval=4) as m:  # fmt: skip
            train(m, training, range(1, 321), {300: "nan"})
            assert m.close(timeout=10)
        (summary,) = wait_until(lambda: complete(app.http_url, detector="non_finite"), what="a complete incident")
        interval = get_json(f"{app.http_url}/api/v1/runs/rec-budget/ranks")["ranks"][0]["full_stats_interval_in_force"]
        assert interval > 64, "the budget did not stretch the cadence past the window: nothing is tested"
        arrays = window(app.http_url, summary["id"])
        assert arrays["r0_rows"]["step"].min() > 200  # the scalar window: the last 64 reports before the alert
        steps = arrays["r0_steps"]
        before = steps < 300
        # With a cadence over 64 steps the window holds at most one; the recorder reaches back for a second.
        assert before.sum() >= 2 and steps[before].min() < arrays["r0_rows"]["step"].min()
        assert np.isfinite(arrays["r0_g_grad_norm"][before]).all()
        report = get_json(f"{app.http_url}/api/v1/incidents/{summary['id']}")["incident"]
        assert report["status"] == "complete"
    finally:
        app.stop()
