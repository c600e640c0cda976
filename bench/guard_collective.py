#!/usr/bin/env python3
"""Wall time of the guard's one collective per optimizer step: a SUM all-reduce of 4 float32 values (this rank's
share of the squared global gradient norm, its two loss flags, the rollback flag), 2 gloo ranks on the CPU.

Each call starts after a barrier (so it measures the collective, not the ranks' skew); the first 100 calls warm
up. Prints rank 0's median, 10th and 90th percentile. On NCCL the same call is queued on the stream (no host
wait); this measures the CPU/gloo case only.

    python bench/guard_collective.py [--calls 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARM = 100


def worker(rank: int, port: int, calls: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        values = torch.zeros(4)
        times = []
        for _ in range(calls):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            times.append(time.perf_counter() - started)
        if rank == 0:
            kept = [t * 1e6 for t in sorted(times[WARM:])]
            p10, p90 = kept[len(kept) // 10], kept[9 * len(kept) // 10]
            print(f"4-float gloo all_reduce, 2 ranks: median {statistics.median(kept):.0f} µs, p10 {p10:.0f} µs, "
                  f"p90 {p90:.0f} µs")  # fmt: skip
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--port", type=int, default=29561)
    args = parser.parse_args()
    mp.spawn(worker, args=(args.port, args.calls), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
