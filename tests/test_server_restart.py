"""A real `gradwatch serve` restarted after SIGTERM and after SIGKILL answers every API route as before.

Three runs: one that finished cleanly after a NaN (its alert resolved when the run expired), one whose loss has
been NaN since a step and whose agent process was killed (its alert firing), and one of 70 ranks (more than a run's
view lists; its ranks and series are paged through). The server is restarted on a gRPC port
the agent does not know, so nothing new arrives and every answer must match the one before the restart.
Compared too: each run's `/series` (every rank's recent reports) and every gauge of /metrics that describes a run.
Not compared: /metrics counters (a restarted process starts them at 0, which Prometheus' rate() expects) and
`gradwatch_run_ranks_connected` (no agent is connected to the new process, like a rank's `connected`).
"""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import urllib.parse
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_recorder import saved_step, serve_process, train, wait_until  # noqa: E402
from test_server_restart_state import feed, run_gauges, saved  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.agent.config import RetryPolicy  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from server_support import get_json, http_get  # noqa: E402

#: The NaN job: trains 40 steps with a NaN injected at step 30 (the loss stays NaN), says so, then waits.
SICK_JOB = """
import sys, time
import gradwatch
from gradwatch.demo import DemoTraining
training = DemoTraining(seed=2)
monitor = gradwatch.attach(training.model, training.optimizer, run="sick", server=sys.argv[1])
for step in range(1, 41):
    monitor.step(training.step("nan" if step == 30 else "none"))
print("trained", flush=True)
time.sleep(600)
"""


#: Ranks of the wide run: more than a run's view lists (64).
WIDE = 70


def answers(url: str) -> dict[str, Any]:
    """Every API answer that describes state: the lists, each run (and its ranks), alert and incident."""
    got: dict[str, Any] = {}

    def fetch(path: str) -> Any:
        got[path] = get_json(f"{url}/api/v1/{path}")
        return got[path]

    for run in fetch("runs")["runs"]:
        name = urllib.parse.quote(run["run"], safe="")
        fetch(f"runs/{name}")
        fetch(f"runs/{name}/ranks")
        offset: int | None = 0
        while offset is not None:  # every page: a wide run has more ranks than one page holds
            offset = fetch(f"runs/{name}/series?offset={offset}")["next_offset"]
        got[f"/metrics gauges of {run['run']}"] = run_gauges(http_get(f"{url}/metrics")[2].decode(), run["run"])
    for state in ("", "?state=firing", "?state=resolved"):
        fetch(f"alerts{state}")
    for incident in fetch("incidents")["incidents"]:
        fetch(f"incidents/{incident['id']}")
    fetch("silences")
    return got


def normalised(got: dict[str, Any]) -> dict[str, Any]:
    """`restored` and a rank's `connected` are the only fields allowed to change: no agent is connected to the
    new process, and the run says its values are the saved ones."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("restored", "connected")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(got)


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two JSON values differ, as `path: old != new` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{where}.{k}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} != {new!r}"]


def test_restart_after_sigterm_and_sigkill_answers_every_route_as_before(tmp_path: pathlib.Path) -> None:
    data, log = tmp_path / "data", tmp_path / "serve.log"
    config = tmp_path / "gradwatch.yaml"
    # A finished run expires after 1 s (its alerts resolve then); incidents close 4 reports after their alert.
    config.write_text("finished_run_retention_s: 1\nrecorder: {after_reports: 4}\n")
    retry = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5)
    done_training = DemoTraining(seed=1)
    sick: subprocess.Popen[str] | None = None
    done = None
    try:
        with serve_process(data, log, "--config", str(config)) as first:
            server, url, http_port = first.target, first.http_url, first.http_port
            done = gradwatch.attach(done_training.model, done_training.optimizer, run="done", server=server,
                                    retry=retry)  # fmt: skip
            train(done, done_training, range(1, 41), {20: "nan"})
            assert done.close(timeout=20)
            # The NaN run trains in a process that is killed (a crashed job): its run stays active, and nothing
            # it sends can change the server's state between the answers compared.
            sick = subprocess.Popen([sys.executable, "-c", SICK_JOB, server], stdout=subprocess.PIPE, text=True)
            assert sick.stdout is not None and sick.stdout.readline().strip() == "trained"
            wait_until(lambda: saved_step(data, "sick") == 40, what="step 40 saved")
            sick.kill()
            sick.wait(timeout=10)
            wait_until(
                lambda: (
                    get_json(f"{url}/api/v1/alerts?state=resolved&run=done")["alerts"]
                    and not get_json(f"{url}/api/v1/runs/sick")["run"]["ranks"][0]["connected"]
                ),
                what="the finished run's alert resolved and the NaN run's rank gone",
            )
            wait_until(lambda: all(i["status"] == "complete" for i in get_json(f"{url}/api/v1/incidents")["incidents"]),
                       what="incidents complete")  # fmt: skip
            for command in (["runs"], ["top", "--once"], ["runs", "show", "sick"]):
                shown = subprocess.run(
                    [sys.executable, "-m", "gradwatch", *command, "--server", url],
                    capture_output=True, text=True, timeout=60, check=True,
                ).stdout  # fmt: skip
                assert "NaN (last finite" in shown and "at step 29)" in shown, (command, shown)
            # A run wider than a view's 64 ranks, flushed rank by rank (its reports carry layer columns).
            feed(server, "wide", range(WIDE), WIDE, range(1, 6))
            wait_until(lambda: saved(data, "wide") == (WIDE, WIDE * 5), what="the wide run saved")
            before = answers(url)
            first.proc.send_signal(signal.SIGTERM)
            assert first.proc.wait(timeout=20) == 0
        runs = {r["run"]: r for r in before["runs"]["runs"]}
        assert runs["done"]["state"] == "finished" and runs["done"]["finished_at"] is not None
        assert runs["sick"]["state"] == "active" and runs["sick"]["firing"] == ["non_finite"]
        # The NaN run shows its non-finite state, not its last finite loss.
        assert runs["sick"]["loss"] is None and runs["sick"]["loss_non_finite"] == "NaN"
        assert runs["sick"]["last_finite_loss_step"] == 29 and runs["sick"]["last_finite_loss"] is not None
        resolved = before["alerts?state=resolved"]["alerts"]
        assert ("done", "non_finite") in {(a["run"], a["detector"]) for a in resolved}
        assert {i["run"] for i in before["incidents"]["incidents"]} <= {"done", "sick", "wide"}
        assert {"done", "sick"} <= {i["run"] for i in before["incidents"]["incidents"]}
        assert runs["wide"]["ranks_total"] == WIDE and len(before["runs/wide/ranks"]["ranks"]) == WIDE
        assert before["runs/wide/series?offset=64"]["ranks"][-1]["rank"] == WIDE - 1

        for how in (signal.SIGTERM, signal.SIGKILL):
            # A gRPC port the agent does not know: nothing new arrives, so nothing may change.
            with serve_process(data, log, "--config", str(config), http_port=http_port) as again:
                after = answers(url)
                assert after.keys() == before.keys()
                for path in before:
                    old, new = normalised(before[path]), normalised(after[path])
                    assert new == old, (how.name, path, differences(old, new))
                restored = {r["run"]: r for r in after["runs"]["runs"]}
                assert restored["done"]["state"] == "finished" and restored["done"]["restored"]
                again.proc.send_signal(how)
                again.proc.wait(timeout=20)
    finally:
        if sick is not None and sick.poll() is None:
            sick.kill()
        if done is not None:
            done.close(timeout=1)
