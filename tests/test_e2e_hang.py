"""Hangs in real multi-process DDP jobs (spawn + gloo on CPU, 3 ranks) against a real embedded server at its default
detector settings: `collective_hang` names the rank that did not enter the collective (with its stuck line), the
rank that died, the rank that issued an extra collective; a whole job slowed beyond the hang floor and a long
checkpoint declared with `monitor.pause()` raise no hang. And a rank slow after `optimizer.step()` (where no
pre-forward clock sees it) is named a straggler from its between-collective time.

Every wait is on a condition (an alert, a file, a process exit) with generous deadlines: the machine is shared.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from gradwatch.server.detectors.straggler import StragglerConfig  # noqa: E402
from paging_support import released_port  # noqa: E402
from wait_support import wait_until  # noqa: E402

HOST = socket.gethostname()
WORLD = 3
FAULT_STEP = 6
LIMIT_S = 150.0  # nothing in a job waits longer than this for the test
BASE_SLEEP_S = 0.05
SLOW_STEP_S = 18.0  # the slowed job's steps: longer than collective_hang's 15 s floor
CHECKPOINT_S = 25.0
HOST_WORK_S = 0.03


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + LIMIT_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)  # WAIT


def _worker(rank: int, world_size: int, port: int, target: str, scenario: str, steps: int, release: str) -> None:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    run, _, _ = scenario.partition("#")  # "scenario#tag": a run id of its own (the bench runs a scenario often)
    run, scenario = scenario, run
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    metrics = dist.new_group()  # a second group, as a job logging metrics on its own group would have
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
        # The straggler job opts in to the DDP timing hook (off by default: docs/configuration.md).
        timed = scenario == "straggler"
        with gradwatch.attach(model, optimizer, run=run, server=target, ddp_comm_hook=timed) as monitor:
            for step in range(1, steps + 1):
                time.sleep(BASE_SLEEP_S if scenario != "straggler" else HOST_WORK_S / 2)
                if scenario == "slow" and step in (FAULT_STEP, FAULT_STEP + 1):
                    time.sleep(SLOW_STEP_S)  # every rank: the whole job is slow, nobody is stuck
                if scenario == "checkpoint" and step == FAULT_STEP:
                    if rank == 0:
                        with monitor.pause("checkpoint"):
                            torch.save(model.state_dict(), f"{release}.pt")
                            time.sleep(CHECKPOINT_S)  # a long save: the other ranks wait in the barrier
                    dist.barrier()
                x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1000 * step + rank))
                loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
                optimizer.zero_grad()
                if step == FAULT_STEP and rank == 1:
                    if scenario == "blocked":
                        Path(f"{release}.at").write_text(repr(time.time()))  # when it hung (bench/hang_latency.py)
                        _wait_for(release)  # BLOCKED: a rank stuck in Python before its backward
                    elif scenario == "killed":
                        os.kill(os.getpid(), signal.SIGKILL)
                    elif scenario == "extra":
                        dist.all_reduce(loss.detach().clone(), group=metrics)  # only this rank: a mismatch
                loss.backward()
                optimizer.step()
                if scenario == "straggler" and rank == 1:
                    until = time.perf_counter() + HOST_WORK_S  # host work after optimizer.step(): busy, not asleep
                    while time.perf_counter() < until:
                        pass
                monitor.step(loss)
            assert monitor.close(timeout=10)
    finally:
        dist.destroy_process_group()


def _line_of(marker: str) -> int:
    return next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if marker in line)


BLOCKED_LINE = _line_of("# BLOCKED:")
WAIT_LINE = _line_of("time.sleep(0.05)  # WAIT")

Alerts = list[dict[str, Any]]


def _config(**detectors: Any) -> ServerConfig:
    base = ServerConfig.local()
    merged = dict(base.detectors)
    merged.update(detectors)
    return dataclasses.replace(base, detectors=types.MappingProxyType(merged))


def run_job(scenario: str, steps: int, tmp_path: Path, *, until: Callable[[Alerts], bool] | None = None,
            release_on: str | None = None, kill_after_alert: bool = False, world: int = WORLD,
            config: ServerConfig | None = None) -> tuple[Alerts, list[int | None]]:  # fmt: skip
    """Run the job against a fresh server at default settings; returns every alert of the run and the ranks'
    exit codes. `until`: wait (bounded) for this condition on the alerts before stopping the server.
    `release_on`: the detector whose first alert releases the blocked rank. `kill_after_alert`: stop the
    (unreleasable) job once `until` holds."""
    app = ServerApp(config or _config())
    release = tmp_path / "release"
    if release_on is not None:
        app.add_alert_listener(lambda alert: release.touch() if alert.detector == release_on else None)
    app.start()
    try:
        args = (world, released_port(), app.grpc_target, scenario, steps, str(release))
        context = mp.spawn(_worker, args=args, nprocs=world, join=False)

        def ended() -> bool:
            if kill_after_alert and until is not None and until(app.alerts(run=scenario)):
                return True
            return all(not p.is_alive() for p in context.processes)

        def state() -> str:
            return f"exit codes {[p.exitcode for p in context.processes]}, alerts {app.alerts(run=scenario)}"

        try:
            wait_until(ended, LIMIT_S + 60, what=f"the {scenario} job to end", interval=0.2, detail=state)
        finally:
            for process in context.processes:
                if process.is_alive() and kill_after_alert:
                    process.kill()
                process.join(30)
        if until is not None:
            wait_until(lambda: until(app.alerts(run=scenario)), 30, what=f"the {scenario} run's alerts to settle",
                       interval=0.1, detail=state)  # fmt: skip
        return app.alerts(run=scenario), [p.exitcode for p in context.processes]
    finally:
        app.stop()


def _hang(alerts: Alerts) -> dict[str, Any]:
    (hang,) = [a for a in alerts if a["detector"] == "collective_hang"]
    return hang


def _has_hang(alerts: Alerts) -> bool:
    return any(a["detector"] == "collective_hang" for a in alerts)


@pytest.mark.timeout(400)
def test_rank_blocked_in_python_before_backward_is_named_with_its_line(tmp_path: Path) -> None:
    alerts, codes = run_job("blocked", FAULT_STEP + 4, tmp_path, release_on="collective_hang",
                            until=lambda a: _has_hang(a) and _hang(a)["state"] == "resolved")  # fmt: skip
    assert codes == [0] * WORLD
    hang = _hang(alerts)
    assert hang["ranks"] == [1] and hang["severity"] == "critical" and hang["step"] == FAULT_STEP - 1, hang
    summary = hang["summary"]
    assert summary.startswith("stuck before the collective"), summary
    assert f"rank 1 ({HOST}) never entered all_reduce (group '0'" in summary, summary
    assert f"rank 0 ({HOST}), rank 2 ({HOST}) wait in" in summary, summary
    # The stuck lines of user code, innermost first.
    assert f"{Path(__file__).name}:{WAIT_LINE} in _wait_for ← {__file__}:{BLOCKED_LINE} in _worker" in summary
    assert hang["state"] == "resolved"  # released, the job went on and finished


@pytest.mark.timeout(400)
def test_rank_killed_mid_step_is_named_dead(tmp_path: Path) -> None:
    alerts, codes = run_job("killed", FAULT_STEP + 4, tmp_path, until=_has_hang)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0 and codes[2] != 0  # gloo: the peers fail in the collective
    hang = _hang(alerts)
    assert hang["ranks"] == [1], hang
    # "step N", or "none received" when the killed process still held all its (batched) reports.
    assert hang["summary"].startswith(f"dead rank: rank 1 ({HOST}) died (last report: "), hang["summary"]
    assert hang["step"] < FAULT_STEP  # reports still batched in the killed process are lost with it (all, at worst)
    # The peers' side depends on when the first tick after the death ran: still waiting, or failed already (gloo).
    rest = hang["summary"].split(";", 1)[1]
    assert f"rank 0 ({HOST})" in rest and f"rank 2 ({HOST})" in rest, hang["summary"]
    assert "wait for it" in rest or "stopped with 'exception'" in rest, hang["summary"]


@pytest.mark.timeout(400)
def test_rank_issuing_an_extra_all_reduce_is_named_as_the_mismatch(tmp_path: Path) -> None:
    alerts, _ = run_job("extra", FAULT_STEP + 4, tmp_path, until=_has_hang, kill_after_alert=True)
    hang = _hang(alerts)
    assert hang["ranks"] == [1], hang
    summary = hang["summary"]
    assert summary.startswith("mismatched collectives"), summary
    assert "rank 1 waits in all_reduce (group '1', seq 1, 1 elements)" in summary, summary
    assert f"which rank 0 ({HOST}), rank 2 ({HOST}) never entered: they wait in all_reduce (group '0'" in summary
    assert f"rank 1 at {__file__}:{_line_of('group=metrics)  # only this rank')} in _worker (innermost " in summary


@pytest.mark.timeout(400)
def test_whole_job_slowed_beyond_the_floor_is_not_a_hang(tmp_path: Path) -> None:
    alerts, codes = run_job("slow", FAULT_STEP + 4, tmp_path)
    assert codes == [0] * WORLD
    assert not _has_hang(alerts), alerts


@pytest.mark.timeout(400)
def test_long_checkpoint_declared_with_pause_is_not_a_hang(tmp_path: Path) -> None:
    alerts, codes = run_job("checkpoint", FAULT_STEP + 4, tmp_path)
    assert codes == [0] * WORLD
    assert not _has_hang(alerts), alerts


@pytest.mark.timeout(400)
def test_rank_doing_host_work_after_the_optimizer_step_is_a_straggler(tmp_path: Path) -> None:
    # 2-rank DDP; rank 1 spends 30 ms after optimizer.step(), before monitor.step(): its pre-forward time is the
    # same as rank 0's, its time between collectives is not.
    config = _config(straggler=StragglerConfig(consecutive=3, min_reports=6))
    alerts, codes = run_job("straggler", 120, tmp_path, world=2, config=config,
                            until=lambda a: any(x["detector"] == "straggler" for x in a))  # fmt: skip
    assert codes == [0, 0]
    (straggler,) = [a for a in alerts if a["detector"] == "straggler"]
    assert straggler["ranks"] == [1] and straggler["value"] < 0.75, straggler
    assert f"rank 1 ({HOST}) is a straggler" in straggler["summary"]
    assert {a["detector"] for a in alerts} == {"straggler"}, alerts
