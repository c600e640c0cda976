"""The cluster examples, run as users run them: a torchrun DDP job and a Ray Train TorchTrainer, on CPU, against a
real embedded server with the cross-rank detectors on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_support import cluster_config
from gradwatch.server.app import ServerApp

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("GRADWATCH_RUN", None)
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                            cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.timeout(300)
def test_torchrun_ddp_example_streams_one_run_and_names_its_slow_rank() -> None:
    pytest.importorskip("torch")
    app = ServerApp(cluster_config()).start()
    try:
        result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(EXAMPLES / "torchrun_ddp.py"), "--server", app.grpc_target, "--steps", "20",
                       "--step-sleep", "0.05", "--slow-rank", "1"], timeout=240)  # fmt: skip
        assert "20 steps on 2 ranks" in result.stdout
        (run,) = app.runs()
        assert run["world_size"] == 2 and run["state"] == "finished" and run["job_name"] == "torchrun-ddp-example"
        assert sorted((r["rank"], r["step"]) for r in run["ranks"]) == [(0, 20), (1, 20)]
        table = app.store.get(run["run"]).table  # type: ignore[union-attr]
        assert table.replica_group_size.tolist() == [2, 2]  # DDP under torchrun: the two ranks are replicas
        alerts = app.alerts(run=run["run"])
        assert [(a["detector"], a["ranks"]) for a in alerts] == [("straggler", [1])], alerts
        assert f"rank 1 ({socket.gethostname()}) is a straggler" in alerts[0]["summary"]
    finally:
        app.stop()


@pytest.mark.timeout(300)
def test_ray_train_example_two_workers_are_compared_as_replicas(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("ray")
    app = ServerApp(cluster_config()).start()
    try:
        result = _run([str(EXAMPLES / "ray_train.py"), "--server", app.grpc_target, "--steps", "12",
                       "--name", "ray-example", "--storage", str(tmp_path)], timeout=240)  # fmt: skip
        assert "12 steps on 2 workers" in result.stdout
        (run,) = app.runs()
        assert run["run"] == "ray-example" and run["world_size"] == 2 and run["state"] == "finished"
        assert sorted((r["rank"], r["step"]) for r in run["ranks"]) == [(0, 12), (1, 12)]
        table = app.store.get("ray-example").table  # type: ignore[union-attr]
        assert table.replica_group_size.tolist() == [2, 2]  # prepare_model wraps DDP: the workers are replicas
        assert app.alerts(run="ray-example") == []  # identical checksums, no stall, no straggler
    finally:
        app.stop()
