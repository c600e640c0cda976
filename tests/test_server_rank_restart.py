"""A rank that restarts (a new agent session whose steps begin again, under the same run id) is judged afresh.

Jobs are restarted under the same run id all the time: from a checkpoint after a crash or preemption, from
scratch after a fix, a second `fit()` in one process. The agent counts steps from 1 in every session, so the
server sees the rank's step go back and its loss jump to where a new model starts. Judged against the old
life's baselines that is a spike, a divergence and an exploding gradient: false criticals. Every per-rank
detector therefore forgets a rank that restarts (`Detector.forget`), and what it had fired for the rank is
resolved.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_detector_needs import _report

from gradwatch.server.detectors import REGISTRY
from gradwatch.server.report import RankReport
from gradwatch.settings import SettingError

PER_RANK = [spec for spec in REGISTRY if spec.scope == "rank"]
_SHORT = {"consecutive": 1, "reports": 1, "resolve_after": 2, "min_reports": 0, "window": 8}


def _config(spec: Any) -> Any:
    """The detector's settings with its streaks and warm-up as short as it allows: random reports fire and clear."""
    names = {field.name for field in dataclasses.fields(spec.config_type)}
    chosen: dict[str, Any] = {}
    for key, value in _SHORT.items():
        if key in names:
            try:
                spec.config_type(**chosen, **{key: value})
            except SettingError:
                continue
            chosen[key] = value
    return spec.config_type(**chosen)


@st.composite
def _life(draw: st.DrawFn, ranks: tuple[int, ...], first: int = 1) -> list[RankReport]:
    steps = draw(st.integers(1, 30))
    return [draw(_report(rank, step)) for step in range(first, first + steps) for rank in ranks]


def _verdicts(detector: Any, reports: list[RankReport], rank: int) -> list[str]:
    return [repr(detector.observe(r)) for r in reports if r.rank == rank]  # repr: a NaN value compares equal


@pytest.mark.parametrize("spec", PER_RANK, ids=lambda spec: spec.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_forgotten_rank_is_judged_as_a_new_one_and_the_others_as_before(spec: Any, data: st.DataObject) -> None:
    before = data.draw(_life((0, 1)), label="before")
    last = max(r.step for r in before)
    again = data.draw(_life((0,)), label="rank 0 from step 1")
    onward = data.draw(_life((1,), first=last + 1), label="rank 1 going on")
    fresh, used, untouched = (spec.create(_config(spec)) for _ in range(3))
    for report in before:
        used.observe(report)
        untouched.observe(report)
    used.forget(0)
    # Rank 0 after forget: exactly what a detector that never saw it says.
    assert _verdicts(used, again, 0) == _verdicts(fresh, again, 0)
    # Rank 1 (its reports interleaved with rank 0's new life or not): as if nothing had happened.
    assert _verdicts(used, onward, 1) == _verdicts(untouched, onward, 1)


def _alerts(http_url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{http_url}/api/v1/alerts?run=restarted") as response:
        return json.load(response)["alerts"]  # type: ignore[no-any-return]


def _metric(http_url: str, name: str) -> float:
    with urllib.request.urlopen(f"{http_url}/metrics") as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + '{run="restarted"}'):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


_LIFE = """
import sys, time
import torch
from torch import nn
import gradwatch

target, steps, spike_at, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "hold"
torch.manual_seed(0)  # the same fresh model every life: a restart from scratch
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
monitor = gradwatch.attach(model, optimizer, server=target, run="restarted")
generator = torch.Generator().manual_seed(1)
w = torch.randn(16, 1, generator=generator)
for step in range(1, steps + 1):
    x = torch.randn(32, 16, generator=generator)
    loss = nn.functional.mse_loss(model(x), x @ w)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    monitor.step(loss * 1000 if step == spike_at else loss)  # a bad batch's loss, as the loop sees it
if hold:
    time.sleep(600)  # until killed: a crash, no goodbye
assert monitor.close(timeout=20)  # every report acknowledged: applied, judged
"""


def test_a_job_restarted_from_scratch_under_its_run_id_raises_nothing_and_still_pages(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("torch")
    from paging_support import gradwatch_process
    from wait_support import wait_until

    script = tmp_path / "life.py"
    script.write_text(_LIFE)

    def life(target: str, steps: int, spike_at: int = 0, hold: bool = False) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, str(script), target, str(steps), str(spike_at),
                                 "hold" if hold else "close"])  # fmt: skip

    with gradwatch_process(tmp_path / "server") as server:
        crashed = life(server.target, 150, spike_at=150, hold=True)  # ends with a loss spike firing for rank 0
        try:
            wait_until(lambda: [a["detector"] for a in _alerts(server.http_url) if a["state"] == "firing"]
                       == ["loss_spike"], timeout=120)  # fmt: skip
        finally:
            crashed.kill()  # the process dies without a goodbye: its alert stays firing
            crashed.wait()
        # Restarted from scratch: the loss starts again at a new model's level, the step at 1.
        assert life(server.target, 150).wait(timeout=300) == 0
        alerts = _alerts(server.http_url)
        assert [(a["detector"], a["state"]) for a in alerts if a["detector"] != "stalled"] == [
            ("loss_spike", "resolved")
        ], alerts  # resolved when the rank restarted; no spike, divergence or explosion from the new start
        assert all(a["state"] == "resolved" for a in alerts), alerts  # a `stalled` while it was down, if any
        assert _metric(server.http_url, "gradwatch_rank_restarts_total") == 1
        # The restarted rank is watched afresh, not muted: a spike in a third life pages again.
        assert life(server.target, 150, spike_at=120).wait(timeout=300) == 0
        spikes = [a for a in _alerts(server.http_url) if a["detector"] == "loss_spike"]
        assert len(spikes) == 2 and spikes[0]["step"] == 120, spikes
        assert _metric(server.http_url, "gradwatch_rank_restarts_total") == 2
