"""Monitor a Ray Train job: a real TorchTrainer with 2 workers, each reporting to gradwatch.

    gradwatch serve &
    python examples/ray_train.py --server localhost:50051

`gradwatch.integrations.ray.monitor` attaches inside `train_loop_per_worker`: rank, world size and local rank
come from the Ray Train context, the run id is the experiment name (shared by the workers), and the monitor is
flushed before Ray tears the worker down. `ray.train.torch.prepare_model` wraps the model in DDP, so the server
compares the workers as replicas (losses, parameter checksums, pace, progress). Runs on CPU; set `--gpu` on a
GPU cluster.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from gradwatch.integrations import ray as gradwatch_ray

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    with gradwatch_ray.monitor(model, optimizer, server=config["server"], job_name="ray-train-example") as monitor:
        for step in range(config["steps"]):
            generator = torch.Generator().manual_seed(10_000 * step + rank)  # each worker its own data
            x = torch.randn(32, 16, generator=generator).to(device)
            loss = nn.functional.mse_loss(model(x), x[:, :2].sum(dim=1, keepdim=True).sin())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("GRADWATCH_SERVER", "localhost:50051"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="gradwatch-ray-example", help="experiment name: the gradwatch run id")
    parser.add_argument("--storage", default=None, help="Ray Train storage path (default: a temporary folder)")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"server": args.server, "steps": args.steps},
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=args.name, storage_path=args.storage or tempfile.mkdtemp(prefix="ray-train-")),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    print(f"run {args.name}: {args.steps} steps on {args.workers} workers", flush=True)


if __name__ == "__main__":
    main()
