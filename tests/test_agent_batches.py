"""The agent batches its push groups only for a server that says it takes batches; older servers get single frames.

Both against real servers: the gradwatch ServerApp (says so in its Welcome) and the scriptable ingest peer of the
sender tests, whose Welcome, like a server from before AgentFrame.batch, says nothing about batches.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agent_support import ScriptableServer, make_mlp, train, wait_until  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from server_support import metric, scrape, start_app  # noqa: E402

STEPS = 120


def _train(address: str, run: str) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with attach(model, opt, server=address, run=run, job_name="unit", rank=0, world_size=1) as monitor:
        train(model, opt, monitor, STEPS)  # steps far faster than the push interval: groups of several reports


def test_agent_sends_push_groups_as_batches_to_a_server_that_takes_them() -> None:
    app = start_app()
    try:
        _train(app.grpc_target, "batched")
        [run] = [r for r in app.runs() if r["run"] == "batched"]
        assert run["ranks"][0]["reports"] == STEPS and run["step"] == STEPS  # every report, once
        text = scrape(app)
        batches = metric(text, "gradwatch_ingest_frames_total", kind="batch")
        assert 0 < batches < STEPS / 2  # groups, not one message per report
        assert metric(text, "gradwatch_ingest_frames_total", kind="report") == STEPS
        assert metric(text, "gradwatch_ingest_duplicate_frames_total") == 0
    finally:
        app.stop(grace=0)


def test_agent_sends_single_frames_to_a_server_that_does_not_say_it_takes_batches() -> None:
    with ScriptableServer() as server:
        _train(server.address, "unbatched")
        assert wait_until(lambda: len(server.servicer.reports()) == STEPS)
        assert server.servicer.of_kind("batch") == []
        assert [f.seq for f in server.servicer.frames()] == list(range(1, len(server.servicer.frames()) + 1))
