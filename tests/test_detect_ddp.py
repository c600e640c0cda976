"""Cross-rank provenance on real 2-rank DDP jobs (torch.multiprocessing.spawn + gloo on CPU) at default server
settings: a NaN is placed on the rank it started on, a flipped weight bit is found on a fast job whatever the
overhead budget does, and a rank whose data went bad is named even with two ranks (no majority)."""

from __future__ import annotations

import os
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from paging_support import released_port  # noqa: E402


def _worker(rank: int, world_size: int, port: int, target: str, fault: str, steps: int, onset: int) -> None:
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    import gradwatch

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(7)) * 1.5
        # Default agent settings (the overhead budget included): the job is shaped like a user's, not a test's.
        with gradwatch.attach(model, optimizer, run=fault, server=target) as monitor:
            for step in range(1, steps + 1):
                y = torch.randint(0, 4, (32,), generator=gen)
                x = centres[y] + 0.5 * torch.randn(32, 16, generator=gen)
                if fault == "nan_input" and rank == 0 and step == onset:
                    x[0, 0] = float("nan")
                bad_rank = rank == world_size - 1 or (fault == "corrupt_half" and rank >= world_size // 2)
                if fault.startswith("corrupt") and bad_rank and step >= onset:
                    x, y = x * 25.0 + 40.0, torch.randint(0, 4, (32,), generator=gen)
                loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if fault == "bitflip" and rank == 1 and step == onset:
                    with torch.no_grad():  # one mantissa bit of one weight: silent data corruption
                        model.module[2].weight.view(-1).view(torch.int32)[5] ^= 1 << 18
                monitor.step(loss)
            assert monitor.close(timeout=30)
    finally:
        dist.destroy_process_group()


def run_job(fault: str, world_size: int, steps: int, onset: int) -> list[dict[str, Any]]:
    app = ServerApp(ServerConfig.local())
    app.start()
    try:
        mp.spawn(_worker, args=(world_size, released_port(), app.grpc_target, fault, steps, onset), nprocs=world_size)
        return app.alerts(run=fault)
    finally:
        app.stop()


@pytest.mark.timeout(300)
def test_nan_in_one_ranks_input_is_placed_on_that_rank_not_on_the_one_that_received_it() -> None:
    alerts = run_job("nan_input", 2, 40, 20)
    (alert,) = [a for a in alerts if a["detector"] == "non_finite"]
    assert alert["step"] == 20 and alert["ranks"] == [0, 1], alerts
    # The alert opens with the rank it started on and says which rank only received it through the all-reduce.
    assert "on rank 0 at step 20" in alert["summary"] and "input batch" in alert["summary"], alert
    assert "rank(s) 1 only received it through the gradient collective" in alert["summary"], alert


@pytest.mark.timeout(300)
def test_flipped_weight_bit_on_a_millisecond_step_job_is_found_within_50_steps_at_default_settings() -> None:
    """The overhead budget stretches full statistics far past the run on this job; the checksum keeps its own
    cadence."""
    alerts = run_job("bitflip", 2, 240, 100)
    (alert,) = [a for a in alerts if a["detector"] == "replica_mismatch"]
    assert 100 <= alert["step"] <= 150, alerts


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("fault", "world_size", "bad"), [("corrupt", 2, [1]), ("corrupt_half", 4, [2, 3])])
def test_the_rank_whose_data_went_bad_is_named_without_a_majority(fault: str, world_size: int, bad: list[int]) -> None:
    """Inputs ×25 + 40 and random labels on `bad` from step 60: with two ranks, or two bad ranks of four, a
    cross-rank z-score has no majority; each bad rank's loss rose away from the others' while its own rose."""
    alerts = run_job(fault, world_size, 120, 60)
    (alert,) = [a for a in alerts if a["detector"] == "rank_divergence"]
    assert alert["ranks"] == bad and 60 <= alert["step"] <= 70, alerts
    assert "rose away from the other ranks'" in alert["summary"], alert
