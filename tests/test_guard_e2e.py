"""The guard and the autopsy against a real server: a guarded CPU training run meets a NaN batch and a batch
with corrupted samples; the server counts the skips, its alerts and incidents name the step, the batch ids and
the corrupted samples among the top-k by loss, and `gradwatch incidents show` and the HTML report list them."""

from __future__ import annotations

import pathlib
import random

import pytest

torch = pytest.importorskip("torch")
from test_recorder import complete, wait_until  # noqa: E402
from test_views import gradwatch_cli  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from agent_support import make_mlp  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from server_support import get_json, metric, scrape  # noqa: E402

STEPS = 90
BATCH = 32


def _data(step: int, corrupt: set[int], nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(BATCH, 8, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    for i in corrupt:
        y[i] = 500.0  # a wrong label far outside the targets' range
    if nan:
        x[sorted(corrupt)[0], 1] = float("nan")
    return x, y


def test_guarded_run_names_the_corrupted_samples_in_alert_incident_cli_and_html(tmp_path: pathlib.Path) -> None:
    rng = random.Random(19)
    nan_step, spike_step = rng.randrange(45, 60), rng.randrange(65, 80)
    nan_sample, spiked = rng.randrange(BATCH), set(rng.sample(range(BATCH), 3))
    app = ServerApp(ServerConfig.local()).start()
    try:
        model = make_mlp(seed=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        with gradwatch.attach(model, optimizer, run="guard-e2e", server=app.grpc_target, overhead_budget=0,
                              guard={"policy": "skip", "warmup": 20, "top_k": 5}) as monitor:  # fmt: skip
            for step in range(1, STEPS + 1):
                corrupt = {nan_sample} if step == nan_step else spiked if step == spike_step else set()
                x, y = _data(step, corrupt, nan=step == nan_step)
                optimizer.zero_grad()
                per_sample = nn.functional.mse_loss(model(x), y, reduction="none").mean(dim=1)
                loss = per_sample.mean()
                loss.backward()
                monitor.observe_loss(loss)
                optimizer.step()
                ids = [f"s{step}-{i}" for i in range(BATCH)]
                monitor.step(loss, batch_ids=ids, sample_losses=per_sample)
            assert monitor.close(timeout=10)
        assert all(torch.isfinite(p).all() for p in model.parameters())

        text = scrape(app)
        assert metric(text, "gradwatch_guard_skipped_steps_total", run="guard-e2e") == 2

        alerts = {a["detector"]: a for a in get_json(f"{app.http_url}/api/v1/alerts")["alerts"]}
        skip = alerts["guard_skip"]
        assert skip["step"] == nan_step and "non-finite" in skip["summary"]
        (autopsy,) = skip["autopsy"]
        assert autopsy["step"] == nan_step and autopsy["rank"] == 0
        assert autopsy["batch_ids"] == [f"s{nan_step}-{i}" for i in range(BATCH)]
        assert autopsy["top_samples"][0] == {"id": f"s{nan_step}-{nan_sample}", "loss": None, "finite": False,
                                             "index": nan_sample}  # fmt: skip
        assert f"s{nan_step}-{nan_sample} (non-finite)" in skip["summary"]
        nan_alert = alerts["non_finite"]
        assert nan_alert["autopsy"][0]["top_samples"][0]["id"] == f"s{nan_step}-{nan_sample}"

        # The spike: a loss_spike alert of its own, whose top samples are the corrupted ones.
        spike = alerts["loss_spike"]
        assert spike["step"] == spike_step, spike
        top = [s["id"] for s in spike["autopsy"][0]["top_samples"]]
        assert set(top[: len(spiked)]) == {f"s{spike_step}-{i}" for i in spiked}

        (incident,) = wait_until(lambda: complete(app.http_url, detector="guard_skip"), what="the guard_skip incident")
        shown = gradwatch_cli("incidents", "show", incident["id"], "--server", app.http_url)
        assert f"autopsy: step {nan_step}, rank 0" in shown and f"s{nan_step}-{nan_sample}" in shown
        assert "non-finite" in shown
        report = tmp_path / "incident.html"
        gradwatch_cli("report", incident["id"], "-o", str(report), "--server", app.http_url)
        html = report.read_text()
        assert 'id="autopsy"' in html and f"s{nan_step}-{nan_sample}" in html
    finally:
        app.stop()
