"""The guard on real CPU training runs: a skipped update leaves weights and optimizer state exactly as if the
bad batch had never been seen, for every optimizer family and mechanism, with GradScaler and accumulation;
bad settings fail at attach; every skip is reported with its reasons."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from agent_support import ScriptableServer, batch, make_mlp  # noqa: E402
from gradwatch.agent.config import resolve_config  # noqa: E402
from gradwatch.agent.guard_config import GuardSettings  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

STEPS = 60
WARMUP = 12
SPIKE = 23  # the GradScaler test's spiking step

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
    "sgd_momentum_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=True),
    "sgd_momentum_fused": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3, foreach=False),
    "adam_foreach": lambda p: torch.optim.Adam(p, lr=3e-3, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=3e-3, fused=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=3e-3, fused=True),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=3e-3, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _bad_batch(step: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step)
    if kind == "nan":
        x[3, 2] = float("nan")
    elif kind == "spike":
        y = y + 1e3  # a batch of wrong targets: loss and gradient norm jump by orders of magnitude
    return x, y


def _run(make: Callable[[Any], torch.optim.Optimizer], bad: dict[int, str], *, guard: dict[str, Any] | None,
         address: str | None, drop_bad: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:  # fmt: skip
    """Train STEPS steps; `bad[step]` corrupts that batch. `drop_bad`: the reference that never sees them."""
    model = make_mlp(seed=3)
    optimizer = make(model.parameters())
    monitor = None
    if guard is not None:
        monitor = gradwatch.attach(model, optimizer, server=address, run="guard-test", guard=guard)
    for step in range(1, STEPS + 1):
        if drop_bad and step in bad:
            continue
        x, y = _bad_batch(step, bad.get(step, "none"))
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if monitor is not None:
            monitor.observe_loss(loss)
        optimizer.step()
        if monitor is not None:
            monitor.step(loss)
    if monitor is not None:
        assert monitor.close(timeout=10)
    return model, optimizer


def _skips(server: ScriptableServer) -> dict[int, int]:
    reports = [f.report for f in server.servicer.stream_frames if f.HasField("report")]
    return {int(r.step): int(r.guard_skip_reasons) for r in reports if r.guard_skip_reasons}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mechanism", ["auto", "restore"])
def test_skipped_updates_leave_the_run_as_if_the_bad_batches_never_came(name: str, mechanism: str) -> None:
    # Bad steps drawn per case (seeded by the case): the first step, NaN and spikes after the warmup.
    rng = random.Random(f"{name}-{mechanism}")
    later = rng.sample(range(WARMUP + 2, STEPS + 1), 4)
    bad = {1: "nan", later[0]: "nan", later[1]: "spike", later[2]: "spike", later[3]: "nan"}
    with ScriptableServer() as server:
        guard = {"policy": "skip", "warmup": WARMUP, "mechanism": mechanism}
        guarded_model, guarded_opt = _run(OPTIMIZERS[name], bad, guard=guard, address=server.address)
        skips = _skips(server)
    reference_model, reference_opt = _run(OPTIMIZERS[name], bad, guard=None, address=None, drop_bad=True)
    assert _equal(list(guarded_model.state_dict().values()), list(reference_model.state_dict().values()))
    assert _equal(guarded_opt.state_dict(), reference_opt.state_dict())
    assert sorted(skips) == sorted(bad)
    for step, kind in bad.items():
        expected = pb.GUARD_SKIP_REASON_GRAD_NON_FINITE if kind == "nan" else pb.GUARD_SKIP_REASON_GRAD_SPIKE
        assert skips[step] & expected, (step, kind, skips[step])


def test_unguarded_run_is_poisoned_by_the_same_nan_batch() -> None:
    """The counterfactual: the test above would be vacuous if a NaN batch did no harm."""
    model, _ = _run(OPTIMIZERS["adam"], {20: "nan"}, guard=None, address=None)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_and_accumulation_skip_exactly(fused: bool) -> None:
    """GradScaler (CPU, enabled) steps the optimizer after two micro batches; the guard judges each optimizer
    step once: a NaN micro batch is the scaler's skip (not counted as the guard's), a spiking one the guard's,
    and the run ends exactly like one that never saw it. Fused: the gradients reach the guard still scaled."""

    def run(bad_step: int | None, with_guard: bool, address: str | None) -> tuple[nn.Module, Any]:
        model = make_mlp(seed=4)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        monitor = None
        if with_guard:
            monitor = gradwatch.attach(model, optimizer, grad_scaler=scaler, server=address, run="guard-amp",
                                       grad_accumulation=True, guard={"policy": "skip", "warmup": 8})  # fmt: skip
        for step in range(1, 31):
            if not with_guard and step in (bad_step, SPIKE):
                continue
            optimizer.zero_grad()
            for micro in range(2):
                kind = "none" if step not in (bad_step, SPIKE) or micro == 0 else "nan" if step == bad_step else "spike"
                x, y = _bad_batch(100 * step + micro, kind)
                loss = nn.functional.mse_loss(model(x), y) / 2
                scaler.scale(loss).backward()
                if monitor is not None:
                    monitor.observe_loss(loss)
                    if micro == 0:  # a micro step: its loss joins the report of the optimizer step
                        monitor.step(loss)
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
            if monitor is not None:
                monitor.step(loss)
        if monitor is not None:
            assert monitor.close(timeout=10)
        return model, optimizer

    with ScriptableServer() as server:
        guarded, _ = run(17, True, server.address)
        reports = [f.report for f in server.servicer.stream_frames if f.HasField("report")]
    reference, _ = run(17, False, None)
    # The scaler skips the NaN step itself (it sees Inf/NaN): not the guard's skip, and not counted as one.
    assert [r.step for r in reports if r.skipped_step] == [17]
    assert {r.step: r.guard_skip_reasons for r in reports if r.guard_skip_reasons} == {
        SPIKE: pb.GUARD_SKIP_REASON_LOSS_SPIKE | pb.GUARD_SKIP_REASON_GRAD_SPIKE
    }
    assert [r.micro_steps for r in reports] == [2] * 30
    assert _equal(list(guarded.state_dict().values()), list(reference.state_dict().values()))


@pytest.mark.parametrize(
    "guard",
    [
        "sometimes",
        {"policy": "skip", "threshold": -1},
        {"policy": "skip", "window": 2},
        {"policy": "skip", "warmup": 1.5},
        {"policy": "skip", "mechanism": "magic"},
        {"policy": "skip", "unknown": 1},
        {"policy": "skip", "judge_loss": False, "judge_grad_norm": False},
        {"policy": "rollback", "lr_scale": 2.0},
        {"policy": "skip", "top_k": 10_000},
        {"policy": "skip", "mechanism": "found_inf"},  # not a fused optimizer
        42,
    ],
)
def test_bad_guard_settings_fail_at_attach(guard: object) -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match="guard"):
        gradwatch.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), guard=guard, server="127.0.0.1:1")


def test_guard_needs_an_optimizer() -> None:
    with pytest.raises(ValueError, match="guard needs the optimizer"):
        gradwatch.attach(make_mlp(), None, guard="skip", server="127.0.0.1:1")


def test_guard_from_the_environment() -> None:
    assert resolve_config({}, env={"GRADWATCH_GUARD": "skip"}).guard == GuardSettings(policy="skip")
    config = resolve_config({}, env={"GRADWATCH_GUARD": '{"policy": "rollback", "rollback_after": 2}'})
    assert config.guard == GuardSettings(policy="rollback", rollback_after=2)
    assert resolve_config({}, env={}).guard.enabled is False
    with pytest.raises(ValueError, match="GRADWATCH_GUARD"):
        resolve_config({}, env={"GRADWATCH_GUARD": "{not json"})
    with pytest.raises(ValueError, match="GRADWATCH_GUARD"):
        resolve_config({}, env={"GRADWATCH_GUARD": "always"})
    # A keyword beats the variable.
    assert resolve_config({"guard": "off"}, env={"GRADWATCH_GUARD": "skip"}).guard.enabled is False


@pytest.mark.parametrize("seed", range(4))
def test_autopsy_tensor_ids_and_top_k_travel_exactly(seed: int) -> None:
    """Integer-tensor batch ids of any int64 value survive the float32 report vector bit for bit; the top-k by
    loss comes out highest first with NaN above all; micro steps' ids and losses add up (accumulation)."""
    g = torch.Generator().manual_seed(seed)
    model = make_mlp(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected: list[tuple[list[str], list[str]]] = []
    with ScriptableServer() as server:
        monitor = gradwatch.attach(model, optimizer, server=server.address, run="autopsy", grad_accumulation=True,
                                   guard={"policy": "skip", "top_k": 5})  # fmt: skip
        for step in range(1, 6):
            ids_all: list[int] = []
            losses_all: list[torch.Tensor] = []
            for micro in range(2):
                x, y = batch(10 * step + micro)  # distinct samples: no ties in the top-k
                ids = torch.randint(-(2**62), 2**62, (32,), generator=g)
                per_sample = ((model(x) - y) ** 2).mean(dim=1)
                per_sample.mean().backward()
                reported = per_sample.detach().clone()
                if step == 3:
                    reported[7] = float("nan")
                monitor.step(per_sample.mean(), batch_ids=ids, sample_losses=reported)
                ids_all += ids.tolist()
                losses_all.append(reported)
            optimizer.step()
            optimizer.zero_grad()
            monitor.step(None)
            losses = torch.cat(losses_all)
            nan = torch.isnan(losses)
            order = sorted(range(64), key=lambda i: (not nan[i], 0.0 if nan[i] else -float(losses[i]), i))[:5]
            expected.append(([str(i) for i in ids_all], [str(ids_all[i]) for i in order]))
        assert monitor.close(timeout=10)
        reports = [f.report for f in server.servicer.stream_frames if f.HasField("report")]
    assert len(reports) == 5
    for report, (ids, top) in zip(reports, expected, strict=True):
        assert list(report.batch_ids) == ids
        got = [s.id for s in report.top_samples]
        nans = sum(1 for s in report.top_samples if s.loss != s.loss)  # NaN ties come in no particular order
        assert set(got[:nans]) == set(top[:nans]) and got[nans:] == top[nans:]
        assert nans == (2 if report.step == 3 else 0)


def test_bad_autopsy_input_is_counted_and_dropped_not_raised() -> None:
    from gradwatch.agent import errors

    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    errors.set_strict(False)
    try:
        with ScriptableServer() as server:
            monitor = gradwatch.attach(model, optimizer, server=server.address, run="autopsy-bad")
            x, y = batch(1)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            monitor.step(loss, batch_ids=torch.rand(32))  # float ids: not ids
            monitor.step(loss, batch_ids="abc")  # a string is not a sequence of ids
            assert monitor.counters()["internal_errors"].get("step", 0) >= 2
            assert monitor.close(timeout=10)
    finally:
        errors.set_strict(True)


def test_guard_judges_every_gradient_the_optimizer_applies_with_or_without_the_agents_norms() -> None:
    """The norm the guard judges is over the optimizer's parameters: from the agent's per-parameter norms when the
    model owns them all, else from its own pass (an extra parameter the model does not own; one without a
    gradient counts zero); a NaN in the extra parameter's gradient alone is skipped all the same."""
    for extra in (False, True):
        model = make_mlp(seed=7)
        params = list(model.parameters())
        outside = nn.Parameter(torch.ones(3))
        unused = nn.Parameter(torch.ones(2))  # never gets a gradient
        optimizer = torch.optim.Adam(params + ([outside, unused] if extra else []), lr=3e-3)
        with ScriptableServer() as server:
            monitor = gradwatch.attach(model, optimizer, server=server.address, run=f"guard-norm-{extra}",
                                       guard={"policy": "skip", "warmup": 4})  # fmt: skip
            assert monitor.guard is not None
            for step in range(1, 13):
                x, y = batch(step)
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                if extra:
                    loss = loss + (outside * (math.nan if step == 9 else 1.0)).sum() * 1e-3
                loss.backward()
                truth = torch.nn.utils.get_total_norm([p.grad for p in optimizer.param_groups[0]["params"]
                                                       if p.grad is not None])  # fmt: skip
                before = [p.detach().clone() for p in params]
                optimizer.step()
                got = monitor.guard.judged_grad_norm
                assert torch.isfinite(got) == torch.isfinite(truth) and (
                    not torch.isfinite(truth) or torch.allclose(got, truth, rtol=1e-5)
                ), (extra, step, got, truth)
                skipped = float(monitor.guard.last_reasons) > 0
                assert skipped == (extra and step == 9), (extra, step)
                assert skipped == all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
                monitor.step(loss)
            assert monitor.guard.shared_norm_steps == (0 if extra else 12)
            assert monitor.close(timeout=10)


def test_closure_steps_are_applied_unjudged_and_counted() -> None:
    """optimizer.step(closure) (L-BFGS) computes its gradients inside the step, after the guard's pre-hook: the
    guard must not judge the previous step's gradients in their place."""
    model = make_mlp(seed=8)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2)
    with ScriptableServer() as server:
        monitor = gradwatch.attach(model, optimizer, server=server.address, run="guard-lbfgs", guard="skip")
        for step in range(1, 6):
            x, y = batch(step)

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            loss = optimizer.step(closure)
            monitor.step(loss)
        assert monitor.guard is not None and monitor.guard.unjudged_steps == 5
        assert monitor.close(timeout=10)
        assert not _skips(server)
