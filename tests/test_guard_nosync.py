"""The guard's device-side paths read nothing on the host: with fused optimizers (the found-inf flag, also under
torch.amp.GradScaler) and the `restore` mechanism, a guarded training step reads exactly as many tensor values
on the host as the same step without the guard (after the optimizer's first step, which creates the state and
is judged on the host once), while skipping bad batches exactly. The host mechanism, which does read its
verdict, shows that the count sees the guard's reads. A read is counted where torch dispatches it
(`aten._local_scalar_dense`: `.item()`, `float()`, `int()`, `bool()` of a tensor) on the training thread; on a
CUDA device the same paths run under `torch.cuda.set_sync_debug_mode("error")` (tests/test_guard_gpu.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import gradwatch  # noqa: E402
from agent_support import ScriptableServer, batch, make_mlp  # noqa: E402

STEPS = 30
BAD = {14: "nan", 21: "spike"}

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=3e-3, fused=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=3e-3, fused=True),
    "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=3e-3, foreach=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=False),
}


class HostReads(TorchDispatchMode):
    """Counts tensor values read on the host by this thread while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    if BAD.get(step) == "nan":
        x[3, 2] = float("nan")
    elif BAD.get(step) == "spike":
        y = y + 1e3
    return x, y


def _train(name: str, scaled: bool, guard: dict[str, Any] | None, address: str | None,
           drop_bad: bool = False) -> tuple[list[int], nn.Module, torch.optim.Optimizer, Any]:  # fmt: skip
    """Host reads per training step (guard None: attached without a guard; address None: no agent at all)."""
    model = make_mlp(seed=5)
    optimizer = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
    monitor = None
    if address is not None:
        monitor = gradwatch.attach(model, optimizer, server=address, run=f"nosync-{name}-{scaled}",
                                   grad_scaler=scaler, guard=guard or "off")  # fmt: skip
    reads: list[int] = []
    for step in range(1, STEPS + 1):
        if drop_bad and step in BAD:
            continue
        x, y = _batch(step)
        with HostReads() as counter:
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            if monitor is not None:
                monitor.observe_loss(loss)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            if monitor is not None:
                monitor.step(loss)
        reads.append(counter.count)
    mechanism = None if monitor is None or monitor.guard is None else monitor.guard.mechanism
    if monitor is not None:
        assert monitor.close(timeout=10)
    return reads, model, optimizer, mechanism


@pytest.mark.parametrize(
    ("name", "scaled", "mechanism"),
    [
        ("adamw_fused", False, "found_inf"),
        ("adam_fused", True, "found_inf"),
        ("sgd_fused", True, "found_inf"),
        ("adam_foreach", False, "restore"),
    ],
)
def test_device_side_guard_adds_no_host_read_and_skips_exactly(name: str, scaled: bool, mechanism: str) -> None:
    guard = {"policy": "skip", "warmup": 8, "mechanism": "auto" if mechanism == "found_inf" else mechanism}
    with ScriptableServer() as server:
        guarded, model, optimizer, used = _train(name, scaled, guard, server.address)
        unguarded, *_ = _train(name, scaled, None, server.address)
        reports = [f.report for f in server.servicer.stream_frames if f.HasField("report")]
    assert used == mechanism
    # The first optimizer step is judged on the host (it creates the optimizer state: docs/guard.md).
    assert guarded[0] >= unguarded[0]
    assert guarded[1:] == unguarded[1:], (guarded, unguarded)
    # ... and it skipped: the NaN step is the scaler's own skip when there is one, the spike the guard's.
    skips = sorted(r.step for r in reports if r.guard_skip_reasons)
    assert skips == ([21] if scaled else sorted(BAD))
    _, reference, reference_opt, _ = _train(name, scaled, None, None, drop_bad=True)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        assert optimizer.state[p].keys() == reference_opt.state[q].keys()
        assert all(torch.equal(optimizer.state[p][k], reference_opt.state[q][k]) for k in optimizer.state[p])


def test_host_mechanism_reads_its_verdict_and_the_count_sees_it() -> None:
    """The counterfactual: without it the test above could pass with a count that sees nothing."""
    with ScriptableServer() as server:
        guarded, *_, used = _train("adamw", False, {"policy": "skip", "warmup": 8}, server.address)
        unguarded, *_ = _train("adamw", False, None, server.address)
    assert used == "host"
    assert all(g > u for g, u in zip(guarded, unguarded, strict=True)), (guarded, unguarded)
