"""The guard's rollback and gradient accumulation under FSDP2 (`fully_shard`, 2-rank gloo on the CPU).

Rollback: three spiking batches (on alternating ranks) are skipped by both ranks; the third skip is read one
step late, and at that step every rank puts back its own parameter shards and sharded optimizer state (DTensors)
bit for bit as they were after the last known-good snapshot (the in-memory one, under each exactness mechanism,
or the user's callback loading a sharded checkpoint), at the same step, and training goes on with finite weights.
Accumulation: micro batches accumulate (gradient sync on the last one only), the guard judges each optimizer step
once on the global norm of the accumulated gradients, and the run ends bit for bit as a run that never applied
the bad optimizer steps, with both ranks reporting the same skips."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.multiprocessing as mp  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from paging_support import released_port  # noqa: E402

ROLLED_BACK = 16  # guard.REASONS: the step a rollback skipped

# Rollback: spikes at optimizer steps 20-22 (K = 3 skips in the window). Flags are read one step late on the
# CPU, so step 23 rolls back, to the snapshot of step 15 (the one of step 20 was a skipped step's).
STEPS = 28
SPIKES = {20: (0, "spike"), 21: (1, "spike"), 22: (0, "spike")}
ROLLBACK_STEP, RESTORED = 23, 15
SETTINGS = {"policy": "rollback", "warmup": 8, "rollback_after": 3, "rollback_window": 10, "snapshot_every": 5}
# (run name, optimizer, mechanism, source): each exactness mechanism with the snapshot, and the user's callback.
ROLLBACKS = [
    ("fsdp-rollback-host", "adamw", "auto", "snapshot"),
    ("fsdp-rollback-restore", "adam_foreach", "restore", "snapshot"),
    ("fsdp-rollback-fused", "adam_fused", "found_inf", "snapshot"),
    ("fsdp-rollback-callback", "adamw", "auto", "callback"),
]

# Accumulation: 2 micro batches per optimizer step; micro batch index -> bad batch. Optimizer step 1 (NaN in its
# first micro batch, on rank 0), 9 (a spike in its second, rank 1), 12 (NaN in its second, rank 1).
MICRO = 2
ACCUMULATED_STEPS = 14
ACCUMULATED_BAD = {1: (0, "nan"), 18: (1, "spike"), 24: (1, "nan")}
ACCUMULATED = [("fsdp-accumulate-host", "adamw", "auto"), ("fsdp-accumulate-fused", "adam_fused", "found_inf")]


def _worker(rank: int, world_size: int, master_port: int, target: str) -> None:
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import gradwatch
    from fsdp_support import agree, build, data, init_gloo, local, optimizer, same, shards, true_norm

    init_gloo(rank, world_size, master_port)

    def rollback_run(case: tuple[str, str, str, str]) -> None:
        name, kind, mechanism, source = case
        net = build()
        opt = optimizer(kind, net)
        checkpoints: dict[int, Any] = {}
        calls: list[int] = []

        def restore(step: int) -> int:  # the user's loader: their sharded checkpoint of step RESTORED
            calls.append(step)
            model_state, optim_state = copy.deepcopy(checkpoints[RESTORED])
            set_state_dict(net, opt, model_state_dict=model_state, optim_state_dict=optim_state)
            return RESTORED

        callback = restore if source == "callback" else None
        monitor = gradwatch.attach(net, opt, run=name, server=target, guard={**SETTINGS, "mechanism": mechanism},
                                   rollback_callback=callback)  # fmt: skip
        assert monitor.guard is not None
        states: dict[int, Any] = {}
        rolled: list[int] = []
        for step in range(1, STEPS + 1):
            x, y = data(step, rank, SPIKES)
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            if int(monitor.guard.last_reasons) & ROLLED_BACK:
                rolled.append(step)
            monitor.step(loss)
            states[step] = shards(net, opt)
            if source == "callback" and step == RESTORED:
                checkpoints[step] = copy.deepcopy(get_state_dict(net, opt))
        assert monitor.close(timeout=10)
        assert rolled == [ROLLBACK_STEP] and monitor.guard.rollback.rollbacks == 1, (name, rolled)
        assert calls == ([ROLLBACK_STEP] if callback else []), (name, calls)
        # Every shard and every optimizer state entry of this rank, exactly as after the restored step; then on.
        assert same(states[ROLLBACK_STEP], states[RESTORED]), name
        assert not same(states[ROLLBACK_STEP + 1], states[ROLLBACK_STEP]), name
        assert all(torch.isfinite(t).all() for _, t in states[STEPS]), name
        assert agree((rolled, [n for n, _ in states[STEPS]])), name

    def accumulate_run(case: tuple[str, str, str], skip: set[int] | None) -> tuple[list[Any], set[int]]:
        """Guarded (skip None), or the reference that never applies the optimizer steps in `skip`."""
        name, kind, mechanism = case
        net = build()
        opt = optimizer(kind, net)
        monitor = None
        if skip is None:
            monitor = gradwatch.attach(net, opt, run=name, server=target, grad_accumulation=True,
                                       guard={"policy": "skip", "warmup": 6, "mechanism": mechanism})  # fmt: skip
        skipped: set[int] = set()
        for step in range(1, ACCUMULATED_STEPS + 1):
            if skip is not None and step in skip:
                continue
            opt.zero_grad()
            for micro in range(MICRO):
                last = micro == MICRO - 1
                net.set_requires_gradient_sync(last)  # the usual FSDP2 accumulation: reduce-scatter once
                x, y = data(MICRO * (step - 1) + micro + 1, rank, ACCUMULATED_BAD)
                loss = nn.functional.mse_loss(net(x), y) / MICRO
                loss.backward()
                if monitor is not None:
                    monitor.observe_loss(loss)
                    if not last:
                        monitor.step(loss)  # a micro step: no optimizer step after it
            if monitor is None:
                opt.step()
                continue
            truth = true_norm(net)  # a collective (test only), before the guard's
            opt.step()
            assert monitor.guard is not None
            got = float(monitor.guard.judged_grad_norm)
            assert math.isfinite(got) == math.isfinite(truth), (name, step, got, truth)
            assert not math.isfinite(truth) or math.isclose(got, truth, rel_tol=1e-5), (name, step, got, truth)
            if float(monitor.guard.last_reasons):
                skipped.add(step)
            monitor.step(loss)
        if monitor is not None:
            assert monitor.guard is not None and monitor.guard.optimizer_steps == ACCUMULATED_STEPS, name
            assert monitor.close(timeout=10)
        return shards(net, opt), skipped

    try:
        for case in ROLLBACKS:
            rollback_run(case)
        for accumulated in ACCUMULATED:
            guarded, skipped = accumulate_run(accumulated, None)
            bad_steps = {(index - 1) // MICRO + 1 for index in ACCUMULATED_BAD}
            assert bad_steps <= skipped, (accumulated, sorted(skipped))
            assert agree(sorted(skipped)), accumulated
            reference, _ = accumulate_run(accumulated, skipped)
            assert same(guarded, reference), accumulated
            assert all(torch.isfinite(local(t)).all() for _, t in guarded), accumulated
    finally:
        torch.distributed.destroy_process_group()


def test_fsdp2_rollback_and_accumulation_keep_every_rank_exact_and_together() -> None:
    with ScriptableServer() as server:
        mp.spawn(_worker, args=(2, released_port(), server.address), nprocs=2, join=True)
        sessions = dict(server.servicer.sessions)
    reports: dict[tuple[str, int], dict[int, Any]] = {}
    for (run, rank, _), session in sessions.items():
        for frame in session.frames.values():
            if frame.HasField("report"):
                reports.setdefault((run, rank), {})[frame.report.step] = frame.report
    for name, *_ in ROLLBACKS:
        # The rollback travels in both ranks' report of the step that made it, naming the restored step.
        restored = [
            {s: r.guard_rolled_back_to for s, r in reports[(name, rank)].items() if r.HasField("guard_rolled_back_to")}
            for rank in (0, 1)
        ]
        assert restored[0] == restored[1] == {ROLLBACK_STEP: RESTORED}, (name, restored)
    for name, *_ in ACCUMULATED:
        # One verdict per optimizer step, the same skips on both ranks.
        skips = [sorted(s for s, r in reports[(name, rank)].items() if r.guard_skip_reasons) for rank in (0, 1)]
        assert skips[0] == skips[1] and skips[0], (name, skips)
