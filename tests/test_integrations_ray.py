"""Ray Train: a real 2-worker TorchTrainer on CPU streams to a real server (one test: Ray starts slowly)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402

STEPS = 12


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from torch import nn

    from gradwatch.integrations import ray as gradwatch_ray

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rank = ray.train.get_context().get_world_rank()
    with gradwatch_ray.monitor(model, optimizer, server=config["server"]) as monitor:
        assert (monitor.rank, monitor.world_size) == (rank, 2)
        for step in range(STEPS):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 * step + rank))
            loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)


@pytest.mark.timeout(240)
def test_ray_train_two_workers_report_as_one_run(tmp_path: Path) -> None:
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/ modules
    app = ServerApp(ServerConfig.local()).start()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"server": app.grpc_target},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="gradwatch-ray-test", storage_path=str(tmp_path)),
        )
        trainer.fit()
        (run,) = app.runs()
        assert run["run"] == "gradwatch-ray-test"  # the experiment name, shared by both workers
        assert run["world_size"] == 2 and run["state"] == "finished"
        assert sorted((r["rank"], r["step"]) for r in run["ranks"]) == [(0, STEPS), (1, STEPS)]
        # DDP via prepare_model: replicated gradients, so the exact global norm equals each rank's norm.
        norms = [r["grad_norm"] for r in run["ranks"]]
        assert run["grad_norm_global"] == pytest.approx(norms[0], rel=1e-5) and math.isfinite(norms[1])
        assert run["grad_norm_global_step"] == STEPS
    finally:
        ray.shutdown()
        app.stop()
