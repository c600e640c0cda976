"""Monitor a DistributedDataParallel job launched with torchrun.

    gradwatch serve &                                   # or point --server at a running server
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/torchrun_ddp.py --server localhost:50051

Every rank attaches to its own DDP-wrapped model; torchrun gives all ranks the same run id
(TORCHELASTIC_RUN_ID), so the server sees one run of `--nproc_per_node` ranks and compares them: their losses
(rank_divergence), the parameter checksums of the replicas (replica_mismatch), their pace (straggler,
throughput_drop) and their progress (stalled). `--slow-rank R` makes rank R sleep before every step, as a rank
with a slow input pipeline would, to show the straggler alert. Runs on CPU with gloo; on GPUs use nccl.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradwatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("GRADWATCH_SERVER", "localhost:50051"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds every rank sleeps per step")
    parser.add_argument("--slow-rank", type=int, default=None, help="this rank sleeps --slow-sleep more per step")
    parser.add_argument("--slow-sleep", type=float, default=0.25)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # DDP broadcasts rank 0's weights anyway; the same seed keeps the example obvious
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        # Attach after wrapping: the agent then knows every rank holds a replica of the same weights.
        with gradwatch.attach(model, optimizer, server=args.server, job_name="torchrun-ddp-example") as monitor:
            for step in range(args.steps):
                delay = args.step_sleep + (args.slow_sleep if rank == args.slow_rank else 0.0)
                if delay:
                    time.sleep(delay)  # stands in for loading the next batch
                generator = torch.Generator().manual_seed(10_000 * step + rank)  # each rank its own data
                x = torch.randn(64, 32, generator=generator).to(device)
                y = x[:, :4].sum(dim=1, keepdim=True).tanh()
                loss = nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step(loss)
            if rank == 0:
                print(f"run {monitor.run_id}: {monitor.step_count} steps on {dist.get_world_size()} ranks", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
