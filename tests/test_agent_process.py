"""The agent as a guest in the training process: forks, exit, cleanup and its own errors."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from agent_support import ScriptableServer, agent_side_threads, make_mlp, train, wait_until  # noqa: E402
from gradwatch.agent import dispatch, errors  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.agent.stats import StatsEngine  # noqa: E402


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


# A training script that forks, run in a fresh interpreter: there the agent imports grpc first, as in a real
# job, so it can switch gRPC's fork handlers off (process.py explains why); inside pytest grpc is imported long
# before. It forks raw children and a DataLoader's workers while its stream is open, and prints what it saw.
_FORKING_SCRIPT = """
import json, os, sys, threading, time
import torch
import gradwatch
from gradwatch.agent import dispatch
from gradwatch.agent.monitor import NoopMonitor

def wait(pid, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hung"

class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, index):
        x = torch.full((8,), index / 64)
        return x, x.sum().reshape(1)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
monitor = gradwatch.attach(model, opt, run="forking", server=sys.argv[1])

def train_step(x, y):
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    monitor.step(loss)

children = []
for round_ in range(8):  # raw forks, each right after a few steps, while frames and acks are in flight
    for _ in range(3):
        train_step(torch.randn(16, 8), torch.zeros(16, 1))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            train_step(torch.randn(4, 8), torch.zeros(4, 1))  # hooks gone, step() inert
            again = gradwatch.attach(model, opt, run="child", server=sys.argv[1])
            inert = (monitor.step_count == 3 * (round_ + 1) and monitor.close(timeout=5) is False
                     and isinstance(again, NoopMonitor) and threading.active_count() == 1
                     and not dispatch.is_watched(opt))
            code = 0 if inert else 3
        finally:
            os._exit(code)
    children.append(wait(pid))

loader = torch.utils.data.DataLoader(Squares(), batch_size=16, num_workers=2, multiprocessing_context="fork")
for _epoch in range(3):  # workers are forked afresh each epoch
    for x, y in loader:
        train_step(x, y)

print(json.dumps({
    "children": children,
    "steps": monitor.step_count,
    "closed": monitor.close(timeout=10),
    "fork_support": os.environ.get("GRPC_ENABLE_FORK_SUPPORT"),
    "pid": os.getpid(),
}))
"""


@pytest.mark.timeout(120)
def test_agent_is_inert_in_forked_children_and_keeps_streaming_in_the_parent(server: ScriptableServer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    result = subprocess.run(
        [sys.executable, "-c", _FORKING_SCRIPT, server.address], env=env, capture_output=True, text=True, timeout=100
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["children"] == [0] * 8, result.stderr  # none hung, none crashed, all inert
    assert outcome["fork_support"] == "false"
    steps = outcome["steps"]
    assert steps == 8 * 3 + 3 * 4 and outcome["closed"] is True
    assert [r.step for r in server.servicer.reports()] == list(range(1, steps + 1))
    assert {h.hello.pid for h in server.servicer.of_kind("hello")} == {outcome["pid"]}  # no child connected


def test_agent_leaves_an_explicit_grpc_fork_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch.agent import process

    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "true")
    process.prefer_no_grpc_fork_handlers()
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "true"
    monkeypatch.delenv("GRPC_ENABLE_FORK_SUPPORT")
    process.prefer_no_grpc_fork_handlers()  # grpc is already imported in this interpreter: too late to change
    assert "GRPC_ENABLE_FORK_SUPPORT" not in os.environ


def test_attach_then_close_leaves_no_hooks_and_no_threads(server: ScriptableServer) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = agent_side_threads()
    monitor = attach(model, opt, server=server.address, run="tidy")
    assert dispatch.is_watched(opt) and dispatch.is_watched(model)
    train(model, opt, monitor, 4)
    assert monitor.close(timeout=5)
    assert not dispatch.is_watched(opt) and not any(dispatch.is_watched(m) for m in model.modules())
    assert wait_until(lambda: agent_side_threads() <= before), agent_side_threads() - before
    monitor.step(torch.tensor(1.0))  # after close: a no-op, not an error
    assert monitor.step_count == 4
    assert monitor.close(timeout=5) is True  # idempotent


def test_agent_flushes_at_interpreter_exit_without_close(server: ScriptableServer) -> None:
    code = textwrap.dedent(
        f"""
        import torch, gradwatch
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = gradwatch.attach(model, opt, run="exit", server="{server.address}")
        for _ in range(5):
            loss = model(torch.randn(3, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            monitor.step(loss)
        # no close(): the atexit flush delivers
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [r.step for r in server.servicer.reports()] == [1, 2, 3, 4, 5]
    assert server.servicer.of_kind("goodbye")[0].goodbye.final_step == 5


def test_internal_errors_are_counted_logged_once_and_swallowed_in_production(
    server: ScriptableServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: StatsEngine, source: str, full: bool) -> torch.Tensor:
        raise RuntimeError("statistics bug")

    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="buggy")
    errors.reset()
    errors.set_strict(False)
    monkeypatch.setattr(StatsEngine, "compute", broken)
    try:
        with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
            losses = train(model, opt, monitor, 5)  # the training loop never sees the bug
        assert len(losses) == 5
        counts = monitor.counters()["internal_errors"]
        assert counts == {"optimizer_pre_hook": 5, "optimizer_post_hook": 5, "step": 5}
        logged = [r for r in caplog.records if "internal error" in r.getMessage()]
        assert len(logged) == 3  # once per place, not once per failure
    finally:
        errors.set_strict(True)
        errors.reset()
    monkeypatch.undo()
    assert monitor.close(timeout=5)


def test_internal_errors_reraise_in_strict_mode(server: ScriptableServer, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_mlp()
    monitor = attach(model, None, server=server.address, run="strict")
    monkeypatch.setattr(StatsEngine, "compute", lambda self, source, full: 1 / 0)
    errors.set_strict(True)
    with pytest.raises(ZeroDivisionError):
        monitor.step(torch.tensor(0.5))
    monkeypatch.undo()
    monitor.close(timeout=5)
    errors.reset()
