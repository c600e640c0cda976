"""Rollback on real CPU training runs against a real server: after K skips in a window the guard restores the
last known-good snapshot exactly (or calls the user's restore callback), skips the abandoned step, cools the
learning rate down, and says so (event, report, alert)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from agent_support import batch, make_mlp  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from server_support import get_json, metric, scrape  # noqa: E402

BAD = (40, 41, 42)  # three spiking batches in a row: K = 3 skips within the window
SETTINGS = {"policy": "rollback", "warmup": 15, "rollback_after": 3, "rollback_window": 10, "snapshot_every": 10,
            "lr_scale": 0.5, "lr_scale_steps": 4}  # fmt: skip


def _train(app: ServerApp, run: str, callback: Any = None) -> tuple[dict[int, Any], list[float], Any]:
    """Returns the optimizer state after every step, the rate each step used, and the monitor."""
    model = make_mlp(seed=5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    states: dict[int, Any] = {}
    rates: list[float] = []
    monitor = gradwatch.attach(model, optimizer, run=run, server=app.grpc_target, overhead_budget=0,
                               guard=SETTINGS, rollback_callback=callback)  # fmt: skip
    # After attach: the guard's pre-hook has scaled the rate by the time this one reads it.
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
    for step in range(1, 61):
        x, y = batch(step)
        if step in BAD:
            y = y + 100.0
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        optimizer.step()
        monitor.step(loss)
        states[step] = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))
    assert monitor.close(timeout=10)
    return states, rates, monitor


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_rollback_restores_the_last_good_snapshot_exactly_and_alerts() -> None:
    app = ServerApp(ServerConfig.local()).start()
    try:
        states, rates, monitor = _train(app, "guard-rollback")
        # Flags are read one step late on the CPU: the third skip (42) is known at step 43, which rolls back
        # to the snapshot of optimizer step 30 (the one of step 40 was a skipped step: never known-good) and
        # skips its own update, since its gradients came from the abandoned state.
        assert monitor.guard is not None and monitor.guard.rollback.rollbacks == 1
        assert _equal(states[43], states[30])
        assert not _equal(states[44], states[43])
        # The cool-down: steps 44..47 at half the rate, then back to the configured one.
        assert rates[43:47] == [5e-3] * 4 and rates[47] == rates[41] == 1e-2
        text = scrape(app)
        assert metric(text, "gradwatch_guard_rollbacks_total", run="guard-rollback") == 1
        assert metric(text, "gradwatch_guard_skipped_steps_total", run="guard-rollback") == 4  # 40-42 and 43
        alerts = {a["detector"]: a for a in get_json(f"{app.http_url}/api/v1/alerts")["alerts"]}
        assert alerts["guard_rollback"]["step"] == 43 and "optimizer step 30" in alerts["guard_rollback"]["summary"]
        (run,) = [r for r in get_json(f"{app.http_url}/api/v1/runs")["runs"] if r["run"] == "guard-rollback"]
        (event,) = [e for e in run["recent_events"] if e["kind"] == "guard_rollback"]
        assert event["attributes"]["restored_step"] == "30" and event["attributes"]["source"] == "snapshot"
    finally:
        app.stop()


def test_rollback_through_the_users_callback() -> None:
    calls: list[int] = []

    def restore(step: int) -> int:
        calls.append(step)
        return 25  # the user's loader put back their checkpoint of step 25

    app = ServerApp(ServerConfig.local()).start()
    try:
        _train(app, "guard-callback", restore)
        assert calls == [43]
        alerts = {a["detector"]: a for a in get_json(f"{app.http_url}/api/v1/alerts")["alerts"]}
        assert "optimizer step 25" in alerts["guard_rollback"]["summary"]
    finally:
        app.stop()
