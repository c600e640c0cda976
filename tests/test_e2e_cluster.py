"""Cross-rank faults in real multi-process DDP jobs (torch.multiprocessing.spawn + gloo on CPU) streaming to a real
embedded server: each fault raises its detector's alert naming the faulty rank and host; a healthy job raises none.

The jobs are short and wait on conditions, never on precise timing: the detectors run with test thresholds
(`cluster_config`) small enough for seconds-long jobs and far from what a loaded machine's jitter can reach.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from cluster_support import cluster_config  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from paging_support import released_port  # noqa: E402
from wait_support import wait_until  # noqa: E402

HANG_LIMIT_S = 120.0  # the hung rank waits for the test's release at most this long
BASE_SLEEP_S = 0.05  # every step's "data loading": steady step times that jitter cannot double


def _worker(rank: int, world_size: int, master_port: int, target: str, scenario: str, steps: int,
            release: str) -> None:  # fmt: skip
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        server = target.split(",")[rank % len(target.split(","))]  # a list: ranks spread over relays
        with gradwatch.attach(model, optimizer, run=scenario, server=server, full_stats_interval=2) as monitor:
            for step in range(1, steps + 1):
                delay = BASE_SLEEP_S
                if scenario == "faults" and rank == 0:
                    delay += 0.25  # a slow input pipeline on one host: a straggler
                if scenario == "throughput" and step > steps // 2:
                    delay += 0.5  # the whole job slows down
                time.sleep(delay)
                generator = torch.Generator().manual_seed(1000 * step + rank)
                x = torch.randn(16, 8, generator=generator)
                y = x.sum(dim=1, keepdim=True).sin()
                if scenario == "faults" and rank == 2:
                    y = y + 10.0  # a corrupted shard on one rank: labels from somewhere else
                loss = nn.functional.mse_loss(model(x), y)
                if scenario == "nan" and rank == 1 and step == 8:
                    loss = loss * float("nan")  # one rank's loss goes NaN; DDP spreads its gradients to all
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if scenario == "faults" and rank == 1 and step == 4:
                    # Silent data corruption: one flipped mantissa bit (a ~1 % change of one weight). A flip of the
                    # lowest bits can be rounded away by the next updates before a checksum sees it.
                    with torch.no_grad():
                        model.module[2].weight.view(-1).view(torch.int32)[3] ^= 1 << 16
                if scenario == "hang" and rank == 1 and step == 6:
                    deadline = time.monotonic() + HANG_LIMIT_S  # bounded: the test releases it once alerted
                    while not os.path.exists(release) and time.monotonic() < deadline:
                        time.sleep(0.05)
                monitor.step(loss)
            assert monitor.close(timeout=10)
    finally:
        dist.destroy_process_group()


Alerts = list[dict[str, Any]]


def run_job(scenario: str, world_size: int, steps: int, tmp_path: Path, release_on: str | None = None,
            settled: Callable[[Alerts], bool] | None = None) -> tuple[ServerApp, Alerts]:  # fmt: skip
    """Run the job to the end against a fresh server; returns the (stopped) app and every alert of the run.

    `release_on`: the detector whose first alert releases the hung rank (the job cannot end before).
    `settled`: a condition on the run's alerts to wait for (the server's tick) before the server stops."""
    app = ServerApp(cluster_config())
    release = tmp_path / "release"
    if release_on is not None:
        app.add_alert_listener(lambda alert: release.touch() if alert.detector == release_on else None)
    app.start()
    try:
        args = (world_size, released_port(), app.grpc_target, scenario, steps, str(release))
        mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        (run,) = app.runs()
        assert run["run"] == scenario and run["state"] == "finished", run
        if settled is not None:
            wait_until(lambda: settled(app.alerts(run=scenario)), 30.0, what=f"the {scenario} run's alerts to settle",
                       interval=0.1, detail=lambda: repr(app.alerts(run=scenario)))  # fmt: skip
        return app, app.alerts(run=scenario)
    finally:
        app.stop()


def _by_detector(alerts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {a["detector"]: a for a in alerts}
    assert len(out) == len(alerts), alerts  # one alert per detector
    return out


HOST = socket.gethostname()


@pytest.mark.timeout(300)
def test_cluster_corrupted_data_flipped_bit_and_slow_rank_each_name_their_rank(tmp_path: Path) -> None:
    # One 3-rank job, three faults on three ranks: each detector must pick its own rank and no other.
    _, alerts = run_job("faults", 3, 20, tmp_path)
    by_detector = _by_detector(alerts)
    assert set(by_detector) == {"rank_divergence", "replica_mismatch", "straggler"}, alerts

    divergence = by_detector["rank_divergence"]
    assert divergence["ranks"] == [2] and divergence["severity"] == "warning"
    assert f"rank 2 ({HOST})" in divergence["summary"]

    mismatch = by_detector["replica_mismatch"]
    assert mismatch["ranks"] == [1] and mismatch["severity"] == "critical"
    assert mismatch["step"] == 6  # the first full-statistics step after the flip (steps 2 and 4 agreed)
    assert f"rank 1 ({HOST})" in mismatch["summary"] and "replica group of 3 ranks led by rank 0" in mismatch["summary"]

    straggler = by_detector["straggler"]
    assert straggler["ranks"] == [0] and straggler["value"] < 0.75
    assert f"rank 0 ({HOST}) is a straggler" in straggler["summary"]


@pytest.mark.timeout(300)
def test_cluster_hung_rank_is_stalled_while_nothing_arrives(tmp_path: Path) -> None:
    _, alerts = run_job("hang", 2, 8, tmp_path, release_on="stalled",
                        settled=lambda alerts: all(a["state"] == "resolved" for a in alerts))  # fmt: skip
    assert set(_by_detector(alerts)) == {"stalled"}, alerts
    stalled = _by_detector(alerts)["stalled"]
    assert stalled["ranks"] == [1] and stalled["step"] == 5 and stalled["severity"] == "critical"
    assert f"rank 1 ({HOST}) stuck at step 5" in stalled["summary"]
    assert stalled["state"] == "resolved"  # it moved on once released, and the run finished


@pytest.mark.timeout(300)
def test_cluster_whole_run_slowing_down_is_a_throughput_drop(tmp_path: Path) -> None:
    _, alerts = run_job("throughput", 2, 30, tmp_path)
    assert set(_by_detector(alerts)) == {"throughput_drop"}, alerts
    drop = _by_detector(alerts)["throughput_drop"]
    assert drop["ranks"] == [0, 1] and drop["value"] < 0.4
    assert drop["step"] > 15  # after the slowdown began
    assert f"rank 0 ({HOST}), rank 1 ({HOST})" in drop["summary"]


@pytest.mark.timeout(300)
def test_cluster_healthy_job_raises_nothing(tmp_path: Path) -> None:
    app, alerts = run_job("healthy", 3, 24, tmp_path)
    assert alerts == []
    run = app.store.get("healthy")
    assert run is not None
    table = run.table
    assert table.replica_group_size.tolist() == [3, 3, 3]  # DDP: one replica group of every rank
    assert (table.pre_forward_time() >= BASE_SLEEP_S * 0.9).all()  # the pre-forward time reached the server

