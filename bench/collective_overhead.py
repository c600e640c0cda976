#!/usr/bin/env python3
"""Cost of collective tracking on a DDP job: step time with `track_collectives` on and off, side by side.

A 2-rank DDP job (torch.multiprocessing.spawn + gloo, CPU, one thread per rank) trains four DDP replicas of the
same bench model (bench/overhead/models.py) in the same processes: `none` (no agent), `untracked` (gradwatch with
track_collectives=False), `tracked` (gradwatch defaults: collective progress on every report and a 2 s heartbeat,
read on the sender thread from the flight recorder) and `timed` (also the opt-in DDP communication hook,
ddp_comm_hook=True, timing the work between collectives). Every round runs one block of steps of each, in rotating
order, so the machine's noise hits them alike; both ranks run the same block at the same time (a collective couples
them anyway). Rank 0 prints, per variant, the median over rounds of wall time, the training thread's CPU time
(`time.thread_time`: the DDP hook runs there) and the process's CPU time (every thread: the sender threads
included) per step, and tracked and timed vs untracked: the cost of the tracking alone, and with the hook. On an
oversubscribed machine wall time is noise; the CPU times hold.
The monitors stream to a real `gradwatch serve` in its own process.

    python bench/collective_overhead.py [--model mlp] [--rounds 7] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))  # shared process helpers
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # bench/overhead/
from overhead.models import MODELS

from paging_support import gradwatch_serve, released_port

VARIANTS = ("none", "untracked", "tracked", "timed")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(rank: int, world: int, port: int, target: str, model_key: str, rounds: int, steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    spec = MODELS[model_key]
    batch = spec.batch()
    labels = torch.randint(0, 10, (batch.shape[0],), generator=torch.Generator().manual_seed(rank))
    jobs = {}
    for key in VARIANTS:
        torch.manual_seed(0)
        model = DistributedDataParallel(spec.build())
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        monitor = None
        if key != "none":
            monitor = gradwatch.attach(model, optimizer, run=f"collective-overhead-{key}", server=target,
                                       track_collectives=key in ("tracked", "timed"),
                                       ddp_comm_hook=key == "timed")  # fmt: skip
        jobs[key] = (model, optimizer, monitor)

    def block(key: str, n: int) -> None:
        model, optimizer, monitor = jobs[key]
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(model(batch), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if monitor is not None:
                monitor.step(loss)

    for key in VARIANTS:
        block(key, steps)  # warm-up: DDP's first iterations rebuild buckets; the agent's budget settles
    wall: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    thread: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for index in range(rounds):
        order = VARIANTS[index % len(VARIANTS) :] + VARIANTS[: index % len(VARIANTS)]
        for key in order:
            dist.barrier()
            started, cpu_started, thread_started = time.perf_counter(), _cpu_s(), time.thread_time()
            block(key, steps)
            wall[key].append((time.perf_counter() - started) / steps)
            cpu[key].append((_cpu_s() - cpu_started) / steps)
            thread[key].append((time.thread_time() - thread_started) / steps)
    for _, _, monitor in jobs.values():
        if monitor is not None:
            monitor.close(timeout=5)
    hooked = jobs["timed"][2]._collectives.hooked  # type: ignore[union-attr]
    if rank == 0:
        print(f"model {model_key}, 2 ranks (gloo, CPU), {rounds} rounds x {steps} steps; DDP hook (timed): {hooked}")
        base = statistics.median(wall["none"])
        for key in VARIANTS:
            w, c, t = statistics.median(wall[key]), statistics.median(cpu[key]), statistics.median(thread[key])
            print(f"  {key:<10} wall {w * 1e3:7.2f} ms/step ({w / base:.3f}x none)  training thread CPU "
                  f"{t * 1e3:7.2f} ms/step  process CPU {c * 1e3:7.2f} ms/step")  # fmt: skip
        base_thread = statistics.median(thread["none"])
        for key, label in (("tracked", "tracking (defaults)"), ("timed", "tracking + DDP hook")):
            extra_wall = statistics.median(wall[key]) - statistics.median(wall["untracked"])
            extra_cpu = statistics.median(cpu[key]) - statistics.median(cpu["untracked"])
            extra_thread = statistics.median(thread[key]) - statistics.median(thread["untracked"])
            print(f"  {label} - untracked: wall {extra_wall * 1e6:+.0f} us/step, training thread CPU "
                  f"{extra_thread * 1e6:+.0f} us/step ({extra_thread / base_thread * 100:+.2f} % of its CPU per step "
                  f"without an agent), process CPU {extra_cpu * 1e6:+.0f} us/step")  # fmt: skip
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, gradwatch_serve(pathlib.Path(tmp)) as target:
        mp.spawn(_worker, args=(2, released_port(), target, args.model, args.rounds, args.steps), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
