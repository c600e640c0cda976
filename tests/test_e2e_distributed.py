"""Two real torch.distributed (gloo) processes stream to one server; one of them goes bad."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402

NAN_STEP = 25
STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, master_port: int, target: str, bad_rank: int) -> None:
    import gradwatch
    from gradwatch.demo import DemoTraining

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        training = DemoTraining(seed=rank)
        # Rank and world size come from torch.distributed, not from arguments.
        with gradwatch.attach(training.model, training.optimizer, run="ddp-job", server=target) as monitor:
            assert (monitor.rank, monitor.world_size) == (rank, world_size)
            for step in range(1, STEPS + 1):
                fault = "nan" if rank == bad_rank and step == NAN_STEP else "none"
                monitor.step(training.step(fault))
                dist.barrier()
            assert monitor.close(timeout=10)
    finally:
        dist.destroy_process_group()


def test_e2e_distributed_nan_on_one_rank_names_that_rank() -> None:
    app = ServerApp(ServerConfig.local())
    fired: list[dict[str, Any]] = []
    lock = threading.Lock()

    def listen(alert: dict[str, Any]) -> None:
        with lock:
            fired.append(dict(alert))

    app.add_alert_listener(listen)
    app.start()
    try:
        mp.spawn(_worker, args=(2, _free_port(), app.grpc_target, 1), nprocs=2, join=True)
        (run,) = app.runs()
        assert run["run"] == "ddp-job"
        assert run["world_size"] == 2
        alerts = app.alerts(run="ddp-job")
        assert [a["detector"] for a in alerts] == ["non_finite"], alerts
        assert alerts[0]["ranks"] == [1]
        assert alerts[0]["step"] == NAN_STEP
    finally:
        app.stop()
