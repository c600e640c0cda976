"""A report over the server's frame limit (Welcome.max_frame_bytes) is dropped and counted by the agent, never
sent: the server would refuse the stream for it, and again on every resend, so nothing after it would arrive.
Real agent, real server (its limits.max_message_bytes lowered so the full-statistics reports exceed it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from agent_support import make_mlp, train, wait_until  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.server.validate import TOO_LARGE  # noqa: E402
from server_support import sample, scrape, server_config, start_app  # noqa: E402

STEPS, FULL_EVERY = 20, 5


def test_agent_drops_and_counts_reports_over_the_servers_frame_limit_and_the_rest_arrive() -> None:
    app = start_app(server_config(max_message_bytes=1024))  # a 3-layer model's full report is about 1.6 kB
    try:
        model = make_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        # overhead_budget=0: full statistics exactly every FULL_EVERY steps (the budget would stretch them)
        monitor = attach(model, opt, server=app.grpc_target, run="wide", full_stats_interval=FULL_EVERY,
                         heartbeat_interval_s=0.05, overhead_budget=0)  # fmt: skip
        train(model, opt, monitor, STEPS)
        full = STEPS // FULL_EVERY
        assert wait_until(lambda: monitor.counters()["acked"] == STEPS - full)
        dropped = lambda: sample(scrape(app), "gradwatch_agent_dropped_total", run="wide", reason=TOO_LARGE)  # noqa: E731
        assert wait_until(lambda: dropped() == full)  # reported in a heartbeat, shown by the server
        counters = monitor.counters()
        assert not monitor.close(timeout=5)  # something was dropped
        assert counters["dropped"][TOO_LARGE] == full
        assert counters["stream_failures"] == counters["rejections"] == 0  # the stream was never refused
        [run] = [r for r in app.runs() if r["run"] == "wide"]
        assert run["ranks"][0]["reports"] == STEPS - full and run["step"] == STEPS - 1
        assert sample(scrape(app), "gradwatch_ingest_errors_total", reason=TOO_LARGE) == 0  # never sent
    finally:
        app.stop(grace=0)
