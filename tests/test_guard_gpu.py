"""The guard on CUDA decides and skips on the device: fused AdamW under torch.amp.GradScaler("cuda") (the
found-inf flag), capturable AdamW (the device-side restore; its step counters live on the device) and foreach
AdamW (restore; its CPU step counters are put back at the next step from the flag's non-blocking copy, waited
for through an event, not a stream synchronisation) train through NaN and spiking batches under
torch.cuda.set_sync_debug_mode("error") after the optimizer's first step (judged on the host once,
docs/guard.md), and end bit for bit like a run that never saw those batches (skipped without a GPU;
scripts/gpu_check.sh runs it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from agent_support import ScriptableServer, batch, make_mlp  # noqa: E402
from gradwatch.agent import errors  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

STEPS = 40
BAD = {14: "nan", 21: "spike", 33: "spike"}
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=3e-3, fused=True),
    "adamw_capturable": lambda p: torch.optim.AdamW(p, lr=3e-3, capturable=True, foreach=True),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=3e-3, foreach=True),  # step counters on the CPU
}


def _train(name: str, scaled: bool, address: str | None) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """Guarded under sync-debug "error" from step 2 (address given), or the reference without the bad steps."""
    device = torch.device("cuda")
    model = make_mlp(seed=6).to(device)
    optimizer = OPTIMIZERS[name](model.parameters())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8) if scaled else None
    monitor = None
    if address is not None:
        monitor = attach(model, optimizer, server=address, run=f"guard-gpu-{name}", grad_scaler=scaler,
                         guard={"policy": "skip", "warmup": 8})  # fmt: skip
    batches = {}
    for step in range(1, STEPS + 1):
        x, y = batch(step)
        if BAD.get(step) == "nan":
            x[3, 2] = float("nan")
        elif BAD.get(step) == "spike":
            y = y + 1e3
        batches[step] = (x.to(device), y.to(device))
    torch.cuda.synchronize()
    try:
        for step in range(1, STEPS + 1):
            if monitor is None and step in BAD:
                continue
            if monitor is not None and step == 2:
                torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
            x, y = batches[step]
            optimizer.zero_grad(set_to_none=True)
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
    finally:
        torch.cuda.set_sync_debug_mode(0)
    mechanism = None if monitor is None or monitor.guard is None else monitor.guard.mechanism
    if monitor is not None:
        assert monitor.close(timeout=10)
    return model, optimizer, mechanism


@pytest.mark.parametrize(
    ("name", "scaled", "mechanism"),
    [("adamw_fused", True, "found_inf"), ("adamw_capturable", False, "restore"), ("adamw_foreach", False, "restore")],
)
def test_guard_gpu_skips_on_the_device_without_a_sync_and_exactly(name: str, scaled: bool, mechanism: str) -> None:
    errors.reset()
    with ScriptableServer() as server:
        model, optimizer, used = _train(name, scaled, server.address)
        reports = server.servicer.reports()
    assert used == mechanism
    assert errors.counts() == {}  # nothing in the hooks failed (a sync would have raised there)
    assert [r.step for r in reports] == list(range(1, STEPS + 1))
    # With the scaler the NaN step is its own skip (not the guard's), the spikes are the guard's.
    skips = sorted(r.step for r in reports if r.guard_skip_reasons)
    assert skips == ([21, 33] if scaled else sorted(BAD))
    assert [r.step for r in reports if r.skipped_step] == ([14] if scaled else [])
    reference, reference_opt, _ = _train(name, scaled, None)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        state, expected = optimizer.state[p], reference_opt.state[q]
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
