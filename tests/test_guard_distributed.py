"""The guard under 2-rank gloo DDP: a spike seen by one rank only is skipped by both (the verdict is
all-reduced), so the replicas' exact parameter checksums stay identical at every step, skipped ones included."""

from __future__ import annotations

import os
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from paging_support import released_port  # noqa: E402

STEPS = 50
SPIKES = (30, 41)  # steps where rank 1 alone gets a batch with wrong targets


def _worker(rank: int, world_size: int, master_port: int, target: str, judge_grad_norm: bool) -> None:
    import gradwatch
    from agent_support import batch, make_mlp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(make_mlp(seed=0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        # Only the loss is judged in one variant: each rank's loss is its own, so without the all-reduced
        # verdict rank 0 would apply the update rank 1 skips.
        guard = {"policy": "skip", "warmup": 10, "judge_grad_norm": judge_grad_norm}
        monitor = gradwatch.attach(model, optimizer, run=f"guard-ddp-{judge_grad_norm}", server=target,
                                   full_stats_interval=1, overhead_budget=0, guard=guard)  # fmt: skip
        for step in range(1, STEPS + 1):
            x, y = batch(100 * step + rank)
            if rank == 1 and step in SPIKES:
                y = y + 50.0
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            optimizer.step()
            monitor.step(loss)
        assert monitor.close(timeout=10)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("judge_grad_norm", [True, False])
def test_ddp_ranks_skip_together_and_replicas_stay_identical(judge_grad_norm: bool) -> None:
    with ScriptableServer() as server:
        mp.spawn(_worker, args=(2, released_port(), server.address, judge_grad_norm), nprocs=2, join=True)
        sessions = dict(server.servicer.sessions)
    by_rank: dict[int, dict[int, Any]] = {0: {}, 1: {}}
    for (_, rank, _), session in sessions.items():
        for frame in session.frames.values():
            if frame.HasField("report"):
                by_rank[rank][frame.report.step] = frame.report
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == list(range(1, STEPS + 1))
    skipped = {r: sorted(s for s, rep in by_rank[r].items() if rep.guard_skip_reasons) for r in (0, 1)}
    assert skipped[0] == skipped[1] == list(SPIKES)
    for step in range(1, STEPS + 1):
        a, b = by_rank[0][step], by_rank[1][step]
        assert a.HasField("param_checksum") and a.param_checksum == b.param_checksum, step
    # The skipped steps changed nothing: the checksum after a skip equals the one before it.
    for step in SPIKES:
        assert by_rank[0][step].param_checksum == by_rank[0][step - 1].param_checksum
        assert by_rank[0][step + 1].param_checksum != by_rank[0][step].param_checksum
