"""The agent in common training setups: gradient accumulation, AMP loss scaling, frozen and tied parameters,
torch.compile. Each checks what reaches the wire against values computed plainly in the test."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from agent_support import ScriptableServer, batch, make_mlp  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def _grad_sum_squares(model: nn.Module) -> float:
    unique = {id(p): p for p in model.parameters() if p.grad is not None}
    return sum(float(p.grad.double().pow(2).sum()) for p in unique.values())


def test_agent_grad_accumulation_reports_once_per_optimizer_step(server: ScriptableServer) -> None:
    model = make_mlp(seed=11)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="accumulate", grad_accumulation=True,
                     full_stats_interval=2)  # fmt: skip
    expected_loss: list[float] = []
    expected_sum_sq: list[float] = []
    for step in range(3):
        micro_losses = []
        for micro in range(4):
            x, y = batch(10 * step + micro)
            loss = nn.functional.mse_loss(model(x), y)
            (loss / 4).backward()
            micro_losses.append(loss.detach())
            if micro < 3:
                monitor.step(loss)  # a micro step: no report
        expected_sum_sq.append(_grad_sum_squares(model))
        opt.step()
        monitor.step(loss)  # after the optimizer step: the report
        opt.zero_grad()
        expected_loss.append(float(torch.stack(micro_losses).mean()))
    assert monitor.step_count == 3
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == [1, 2, 3]
    assert [r.micro_steps for r in reports] == [4, 4, 4]
    assert [r.optimizer_step for r in reports] == [1, 2, 3]
    assert [r.HasField("layers") for r in reports] == [False, True, False]
    for report, loss, sum_sq in zip(reports, expected_loss, expected_sum_sq, strict=True):
        assert report.loss == pytest.approx(loss, rel=1e-6)
        assert report.grad_sum_squares == pytest.approx(sum_sq, rel=1e-5)  # the accumulated gradient
        assert not report.skipped_step and not report.HasField("loss_scale")


def test_agent_without_grad_accumulation_reports_every_step_call(server: ScriptableServer) -> None:
    model = make_mlp(seed=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="no-accumulate")
    for micro in range(4):  # the default: every step() reports, the optimizer stepped or not
        x, y = batch(micro)
        nn.functional.mse_loss(model(x), y).backward()
        monitor.step(float(micro))
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [(r.step, r.micro_steps, r.loss) for r in reports] == [(1, 1, 0.0), (2, 1, 1.0), (3, 1, 2.0), (4, 1, 3.0)]


def _amp_steps(monitor: object, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               steps: int, inf_at: set[int], micro: int = 1) -> list[float]:  # fmt: skip
    """AMP training on CPU; at steps in `inf_at`, one scaled gradient becomes Inf (an fp16 overflow)."""
    scales = []
    for step in range(1, steps + 1):
        for m in range(micro):
            x, y = batch(100 * step + m)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), y)
            scaler.scale(loss).backward()
            if m < micro - 1:
                monitor.step(loss)  # type: ignore[attr-defined]
        if step in inf_at:
            model[0].weight.grad[0, 0] = math.inf
        scales.append(float(scaler.get_scale()))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        monitor.step(loss)  # type: ignore[attr-defined]
    return scales


@pytest.mark.parametrize("accumulate", [False, True])
def test_agent_grad_scaler_skipped_step_is_reported_as_skipped(server: ScriptableServer, accumulate: bool) -> None:
    model = make_mlp(seed=13)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    monitor = attach(model, opt, server=server.address, run="amp", grad_scaler=scaler,
                     grad_accumulation=accumulate, full_stats_interval=1)  # fmt: skip
    scales = _amp_steps(monitor, model, opt, scaler, 5, inf_at={3}, micro=2 if accumulate else 1)
    assert scales == [1024.0, 1024.0, 1024.0, 512.0, 512.0]
    assert monitor.close(timeout=5)
    assert "step" not in scaler.__dict__  # the instance is restored
    reports = server.servicer.reports()
    assert [r.step for r in reports] == [1, 2, 3, 4, 5]  # the skipped step is a report, not a micro step
    assert [r.skipped_step for r in reports] == [False, False, True, False, False]
    assert [r.loss_scale for r in reports] == scales
    assert [r.optimizer_step for r in reports] == [1, 2, 2, 3, 4]
    assert [r.micro_steps for r in reports] == [2 if accumulate else 1] * 5
    skipped = reports[2]
    # The test zeroes the gradients before monitor.step(): the skipped step shows no gradient, finite weights.
    assert skipped.non_finite == 0 and math.isfinite(skipped.loss)
    for report in reports[:2] + reports[3:]:
        assert report.non_finite == 0
        # Statistics of performed steps are of the unscaled gradients (read inside optimizer.step()).
        assert report.grad_sum_squares < 1e3


def test_agent_frozen_and_tied_parameters_with_an_optimizer_over_trainable_ones(server: ScriptableServer) -> None:
    torch.manual_seed(14)
    embed, frozen, proj = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10)
    proj.weight = embed.weight  # tied
    frozen.requires_grad_(False)
    model = nn.ModuleDict({"embed": embed, "frozen": frozen, "proj": proj})
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    monitor = attach(model, opt, server=server.address, run="frozen-tied", full_stats_interval=1)
    expected = []
    for step in range(3):
        idx = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(step))
        logits = proj(torch.relu(frozen(embed(idx))))
        loss = nn.functional.cross_entropy(logits.reshape(-1, 10), idx.reshape(-1))
        opt.zero_grad()
        loss.backward()
        expected.append(_grad_sum_squares(model))
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert len(reports) == 3
    for report, sum_sq in zip(reports, expected, strict=True):
        assert report.grad_sum_squares == pytest.approx(sum_sq, rel=1e-5)  # the tied weight once
        assert report.grad_global_share == pytest.approx(sum_sq, rel=1e-5)  # one rank: the whole model
        grad_norm = np.frombuffer(report.layers.grad_norm, dtype="<f4")
        assert grad_norm[1] == 0.0  # frozen: no gradient, never "non-finite"
        assert report.non_finite == 0


def test_agent_reports_from_a_compiled_model(server: ScriptableServer) -> None:
    model = make_mlp(seed=15)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compiled", full_stats_interval=1)  # before compile
    compiled = torch.compile(model, backend="aot_eager")
    expected = []
    for step in range(1, 5):
        x, y = batch(step)
        loss = nn.functional.mse_loss(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        expected.append(_grad_sum_squares(model))
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == [1, 2, 3, 4]
    for report, sum_sq in zip(reports, expected, strict=True):
        assert report.grad_sum_squares == pytest.approx(sum_sq, rel=1e-5)
        assert report.HasField("layers") and report.non_finite == 0


def test_attach_rejects_a_grad_scaler_without_optimizer_or_of_the_wrong_type() -> None:
    model = make_mlp()
    with pytest.raises(ValueError, match="grad_scaler needs the optimizer"):
        attach(model, None, grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"must be a torch\.amp\.GradScaler"):
        attach(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- overhead budget


def test_budget_controller_stretches_the_interval_to_fit_the_budget() -> None:
    from gradwatch.agent.budget import MAX_INTERVAL, WARMUP_REPORTS, BudgetController

    budget = BudgetController(0.01, base_interval=10)
    changes = []
    for report in range(1, 3 * WARMUP_REPORTS):
        full = report % budget.interval == 0
        # 10 ms steps; an ordinary step costs the agent 20 µs, a full one 5 ms more.
        change = budget.observe(full, 5.02e-3 if full else 20e-6, 10e-3)
        if change is not None:
            changes.append((report, change))
    # (20 µs + 5 ms / N) / 10 ms <= 1 %  =>  N >= 5 ms / 80 µs = 62.5
    assert changes == [(WARMUP_REPORTS, 63)]
    assert not budget.over_budget and budget.estimate == pytest.approx(0.01, rel=0.01)

    tiny = BudgetController(0.01, base_interval=10)  # the every-step cost alone is over budget
    for report in range(1, 2 * WARMUP_REPORTS):
        tiny.observe(report % tiny.interval == 0, 50e-6, 200e-6)
    assert tiny.interval == MAX_INTERVAL and tiny.over_budget

    cheap = BudgetController(0.01, base_interval=10)  # well within budget: the configured interval stays
    off = BudgetController(0.0, base_interval=10)
    for report in range(1, 2 * WARMUP_REPORTS):
        assert cheap.observe(report % 10 == 0, 10e-6, 100e-3) is None
        assert off.observe(report % 10 == 0, 1.0, 1e-3) is None
    assert cheap.interval == off.interval == 10


def test_budget_controller_takes_a_pause_for_a_pause_not_for_slower_steps() -> None:
    from gradwatch.agent.budget import MAX_INTERVAL, PAUSES_BEFORE_NEW_NORMAL, WARMUP_REPORTS, BudgetController

    budget = BudgetController(0.01, base_interval=10)
    for report in range(1, 2 * WARMUP_REPORTS):
        budget.observe(report % budget.interval == 0, 200e-6, 1e-3)  # 20 % every step: over budget
    assert budget.interval == MAX_INTERVAL  # 1 ms steps: the FLOOR_S floor (10,000 steps) is no lower
    assert budget.observe(False, 200e-6, 3.0) is None  # a 3 s checkpoint pause
    for _ in range(20):
        budget.observe(False, 200e-6, 1e-3)
        assert budget.interval == MAX_INTERVAL  # the pause did not make room for full statistics
    for _ in range(PAUSES_BEFORE_NEW_NORMAL + 30):
        budget.observe(False, 200e-6, 0.1)  # steps really got 100x slower: the agent's 0.2 % now fits
    assert budget.interval < MAX_INTERVAL and not budget.over_budget


def test_budget_controller_keeps_full_statistics_at_least_every_floor_seconds() -> None:
    from gradwatch.agent.budget import FLOOR_S, MAX_INTERVAL, WARMUP_REPORTS, BudgetController

    for step_s in (1e-3, 5e-3, 20e-3, 0.1, 2.0):
        budget = BudgetController(0.01, base_interval=10)
        for report in range(1, 3 * WARMUP_REPORTS):
            full = report % budget.interval == 0
            budget.observe(full, 10 * step_s if full else step_s, step_s)  # every step alone is 100x the budget
        assert budget.over_budget
        # Never more than FLOOR_S of training between full statistics, never below the configured interval.
        assert budget.interval == max(10, min(MAX_INTERVAL, int(FLOOR_S / step_s))), step_s


def test_budget_controller_does_not_take_full_statistics_steps_for_pauses() -> None:
    from gradwatch.agent.budget import MAX_INTERVAL, WARMUP_REPORTS, BudgetController

    # A small model: an ordinary step takes 0.25 ms, a full-statistics one 2.5 ms (10x, over PAUSE_FACTOR).
    budget = BudgetController(0.01, base_interval=5)
    for report in range(1, WARMUP_REPORTS + 5):
        full = report % budget.interval == 0
        budget.observe(full, 2.3e-3 if full else 50e-6, 2.5e-3 if full else 0.25e-3)
    assert budget.interval == MAX_INTERVAL and budget.over_budget  # 50 µs of 0.25 ms is over 1 % by itself
    assert budget.estimate is not None and budget.estimate > 0.01


def test_agent_over_budget_lowers_its_cadence_and_says_so_in_reports(server: ScriptableServer) -> None:
    from gradwatch.agent.budget import MAX_INTERVAL, WARMUP_REPORTS

    model = make_mlp(seed=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # A budget of one part per million: whatever the machine's load, the every-step signals exceed it. Steps
    # beyond the warm-up leave room for steps a loaded machine makes look like pauses (budget.PAUSE_FACTOR).
    monitor = attach(model, opt, server=server.address, run="budget", full_stats_interval=5, overhead_budget=1e-6)
    for step in range(1, WARMUP_REPORTS + 201):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    # The first report has no duration to measure; the controller decides at its WARMUP_REPORTS-th observation
    # (later by as many steps as the machine paused for: those are not step times, see budget.PAUSE_FACTOR).
    # The interval goes to MAX_INTERVAL, or to the time floor (FLOOR_S of steps) when steps are slow.
    intervals = [r.full_stats_interval for r in reports]
    switch = next(i for i, n in enumerate(intervals) if n != 5)
    assert switch >= WARMUP_REPORTS + 1 and len(reports) - switch >= 10
    before, after = reports[:switch], reports[switch:]
    assert {r.full_stats_interval for r in before} == {5} and not any(r.over_budget for r in before)
    assert all(5 < r.full_stats_interval <= MAX_INTERVAL and r.over_budget for r in after)
    # Full statistics wait for the stretched cadence; every-step signals do not.
    assert all(r.step % r.full_stats_interval == 0 for r in after if r.HasField("layers"))
    assert all(r.grad_sum_squares > 0 for r in after)


def test_attach_rejects_a_bad_overhead_budget() -> None:
    for bad in (-0.1, 1.0, float("nan"), "1%"):
        with pytest.raises(ValueError, match="overhead_budget"):
            attach(make_mlp(), None, overhead_budget=bad)


def test_alert_actions_observe_mode_records_without_flag_or_exception() -> None:
    from gradwatch.agent.actions import AlertActions, AlertNotice, TrainingAlert

    notice = AlertNotice("non_finite", "critical", 7, 1, "non-finite loss")
    calls: list[AlertNotice] = []
    observe = AlertActions("observe", calls.append)
    observe.deliver(notice)
    observe.poll()
    observe.poll()  # once per notice
    assert calls == [notice] and observe.last_alert == notice and not observe.stop_requested
    raising = AlertActions("raise", None)
    raising.deliver(notice)
    assert raising.stop_requested  # at once, before the next step
    with pytest.raises(TrainingAlert, match="critical alert non_finite: non-finite loss"):
        raising.poll()
    raising.poll()


def test_attach_rejects_bad_alert_options() -> None:
    with pytest.raises(ValueError, match="on_alert"):
        attach(make_mlp(), None, on_alert="stop")
    with pytest.raises(ValueError, match="alert_callback must be callable"):
        attach(make_mlp(), None, alert_callback="print")  # type: ignore[arg-type]


def test_agent_with_a_disabled_grad_scaler_reports_scale_one_and_no_skips(server: ScriptableServer) -> None:
    model = make_mlp(seed=17)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # a common switch: AMP off, same training loop
    monitor = attach(model, opt, server=server.address, run="amp-off", grad_scaler=scaler)
    _amp_steps(monitor, model, opt, scaler, 3, inf_at=set())
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [(r.skipped_step, r.loss_scale, r.optimizer_step) for r in reports] == [(False, 1.0, i) for i in (1, 2, 3)]
