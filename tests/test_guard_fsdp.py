"""The guard under FSDP2 (`fully_shard`, 2-rank gloo on the CPU): every rank judges the exact global gradient
norm (not its shard's), all ranks skip the same steps, and a skipped step leaves every rank's parameter shards
and sharded optimizer state (DTensors) bit for bit as a run that never saw the bad batches; HSDP replicas stay
identical. Each exactness mechanism (host copy, device-side restore, the fused kernels' found-inf flag), the
last also under a GradScaler."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from paging_support import released_port  # noqa: E402

STEPS = 40
WARMUP = 10
# step -> (rank that gets the bad batch, kind): the first step, NaN and spikes on one rank only.
BAD = {1: (0, "nan"), 17: (1, "nan"), 24: (0, "spike"), 33: (1, "spike")}
# (run name, optimizer, mechanism, mesh shape): FSDP2 over both ranks, and HSDP (2 replicas of 1 shard).
CASES = [
    ("fsdp-adamw-host", "adamw", "auto", (2,)),
    ("fsdp-adamw-restore", "adamw", "restore", (2,)),
    ("fsdp-adamw-fused", "adamw_fused", "auto", (2,)),
    ("fsdp-adam-fused", "adam_fused", "found_inf", (2,)),
    ("hsdp-adam-restore", "adam_foreach", "restore", (2, 1)),
    # Under torch.amp.GradScaler("cpu"): a NaN is the scaler's own skip, a spike the guard's.
    ("fsdp-adam-fused-scaler", "adam_fused", "found_inf", (2,)),
]


def _worker(rank: int, world_size: int, master_port: int, target: str) -> None:
    from torch import nn

    import gradwatch
    from fsdp_support import build, data, init_gloo, local, optimizer, true_norm

    init_gloo(rank, world_size, master_port)

    def run(case: tuple[str, str, str, tuple[int, ...]], skip: set[int] | None) -> tuple[nn.Module, Any, set[int]]:
        """Guarded (skip None), or the reference that never applies the steps in `skip`."""
        name, kind, mechanism, mesh_shape = case
        net = build(mesh_shape)
        opt = optimizer(kind, net)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if name.endswith("scaler") else None
        monitor = None
        if skip is None:
            guard = {"policy": "skip", "warmup": WARMUP, "mechanism": mechanism}
            monitor = gradwatch.attach(net, opt, run=name, server=target, guard=guard, grad_scaler=scaler)
        skipped: set[int] = set()
        for step in range(1, STEPS + 1):
            if skip is not None and step in skip:
                continue  # the reference: the skipped steps are simply not applied
            x, y = data(step, rank, BAD)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if monitor is not None:
                # A collective (test only), before the guard's; the fused optimizer sees the gradients still scaled.
                truth = true_norm(net) / (1.0 if scaler is None else scaler.get_scale())
                monitor.observe_loss(loss)
            scale = None if scaler is None else scaler.get_scale()
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            if monitor is not None:
                assert monitor.guard is not None
                got = float(monitor.guard.judged_grad_norm)
                assert (math.isfinite(got) == math.isfinite(truth)) and (
                    not math.isfinite(truth) or math.isclose(got, truth, rel_tol=1e-5)
                ), (name, step, got, truth)
                if float(monitor.guard.last_reasons) or (scaler is not None and scaler.get_scale() < scale):
                    skipped.add(step)  # the guard's skip, or the scaler's (it lowers its scale)
                monitor.step(loss)
        if monitor is not None:
            assert monitor.close(timeout=10)
        return net, opt, skipped

    try:
        for case in CASES:
            guarded_net, guarded_opt, skipped = run(case, None)
            # Every bad batch was skipped (a clean step the guard judged a spike, too, would be skipped by the
            # reference as well: this test is about exactness and agreement, test_guard.py about the verdicts).
            assert set(BAD) <= skipped, (case, sorted(skipped))
            everyone: list[Any] = [None] * world_size
            dist.all_gather_object(everyone, sorted(skipped))
            assert everyone[0] == everyone[1], (case, everyone)
            reference_net, reference_opt, _ = run(case, skipped)
            assert all(torch.isfinite(local(p)).all() for p in guarded_net.parameters()), case
            for p, q in zip(guarded_net.parameters(), reference_net.parameters(), strict=True):
                assert torch.equal(local(p), local(q)), case
                state, expected = guarded_opt.state[p], reference_opt.state[q]
                assert state.keys() == expected.keys(), case
                for key in state:
                    assert torch.equal(local(state[key]), local(expected[key])), (case, key)
            if len(case[3]) == 2:  # HSDP: both ranks are replicas of the same single shard
                mine = torch.cat([local(p).reshape(-1) for p in guarded_net.parameters()])
                replicas = [torch.empty_like(mine) for _ in range(world_size)]
                dist.all_gather(replicas, mine)
                assert torch.equal(replicas[0], replicas[1]), case
        # A GradScaler skips optimizer.step() on the ranks whose shard has Inf/NaN only: the guard's collective
        # in the step would wait for the others, so a non-fused optimizer is refused at attach.
        net = build((2,))
        with pytest.raises(ValueError, match="fused"):
            gradwatch.attach(net, optimizer("adamw", net), run="fsdp-scaler", server=target, guard="skip",
                             grad_scaler=torch.amp.GradScaler("cpu"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_fsdp2_ranks_skip_together_on_the_global_norm_and_shards_stay_exact() -> None:
    with ScriptableServer() as server:
        mp.spawn(_worker, args=(2, released_port(), server.address), nprocs=2, join=True)
        sessions = dict(server.servicer.sessions)
    skipped: dict[tuple[str, int], list[int]] = {}
    for (run, rank, _), session in sessions.items():
        for frame in session.frames.values():
            if frame.HasField("report") and (frame.report.guard_skip_reasons or frame.report.skipped_step):
                skipped.setdefault((run, rank), []).append(frame.report.step)
    for name, *_ in CASES:
        assert sorted(skipped.get((name, 0), [])) == sorted(skipped.get((name, 1), [])), name
        assert set(BAD) <= set(skipped.get((name, 0), [])), name
