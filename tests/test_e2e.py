"""End to end: the real agent in real training runs, streaming to a real server on port 0."""

from __future__ import annotations

import math
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.agent.config import RetryPolicy  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.alerts import Alert  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from netfault import FaultyRelay  # noqa: E402
from paging_support import refused_port  # noqa: E402
from wait_support import wait_until  # noqa: E402


class AlertLog:
    """Collects the alerts a server announces and lets a test wait for one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []

    def __call__(self, alert: Alert) -> None:
        with self._cond:
            self.events.append(alert.to_json())
            self._cond.notify_all()

    def wait_for(self, detector: str, timeout: float = 10.0) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(e["detector"] == detector and e["state"] == "firing" for e in self.events), timeout
            )
            assert ok, f"no {detector} alert within {timeout}s; saw {self.events}"
            return next(e for e in self.events if e["detector"] == detector and e["state"] == "firing")


def _start(port: int = 0) -> tuple[ServerApp, AlertLog]:
    app = ServerApp(ServerConfig.local(grpc_port=port))
    log = AlertLog()
    app.add_alert_listener(log)
    app.start()
    return app, log


@pytest.fixture
def server() -> Iterator[tuple[ServerApp, AlertLog]]:
    app, log = _start()
    yield app, log
    app.stop()


def _scrape(app: ServerApp) -> str:
    return urllib.request.urlopen(f"{app.http_url}/metrics", timeout=5).read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"{name}{labels} not exported"
    return total


def _train(monitor: Any, training: DemoTraining, steps: range, faults: dict[int, str] | None = None,
           on_step: Callable[[int], None] | None = None) -> list[float]:
    """Run steps; return the wall time each monitor.step() took."""
    faults = faults or {}
    durations = []
    for step in steps:
        loss = training.step(faults.get(step, "none"))
        start = time.perf_counter()
        monitor.step(loss)
        durations.append(time.perf_counter() - start)
        if on_step is not None:
            on_step(step)
    return durations


def test_e2e_nan_at_step_k_raises_non_finite_for_step_k(server: tuple[ServerApp, AlertLog]) -> None:
    app, log = server
    training = DemoTraining(seed=1)
    with gradwatch.attach(training.model, training.optimizer, run="nan-run", server=app.grpc_target) as m:
        _train(m, training, range(1, 61), {37: "nan"})
    alert = log.wait_for("non_finite")
    assert alert["run"] == "nan-run"
    assert alert["step"] == 37
    assert alert["ranks"] == [0]
    assert alert["severity"] == "critical"
    assert alert["layer"] == "0"  # the first Linear: the NaN input poisons its gradient first
    assert "started in the input batch" in alert["summary"]  # NaN provenance from the forward hooks
    assert [a["detector"] for a in app.alerts(run="nan-run", state="firing")] == ["non_finite"]


def test_e2e_explosion_raises_exploding_gradient_before_non_finite(server: tuple[ServerApp, AlertLog]) -> None:
    app, log = server
    training = DemoTraining(seed=2)
    with gradwatch.attach(training.model, training.optimizer, run="boom", server=app.grpc_target) as m:
        _train(m, training, range(1, 161), {100: "explode"})
    exploding = log.wait_for("exploding_gradient")
    assert exploding["run"] == "boom"
    assert 100 < exploding["step"] <= 106, exploding
    non_finite = log.wait_for("non_finite")
    assert non_finite["step"] > exploding["step"]


@pytest.mark.parametrize("seed", [3, 4])
def test_e2e_healthy_run_raises_no_alert(server: tuple[ServerApp, AlertLog], seed: int) -> None:
    app, log = server
    training = DemoTraining(seed=seed)
    with gradwatch.attach(training.model, training.optimizer, run=f"healthy-{seed}", server=app.grpc_target) as m:
        _train(m, training, range(1, 401))
        assert m.close(timeout=10)
    assert log.events == []
    assert app.alerts() == []
    (run,) = app.runs()
    assert run["run"] == f"healthy-{seed}"
    text = _scrape(app)
    assert _sample(text, "gradwatch_run_step", run=f"healthy-{seed}") == 400
    assert _sample(text, "gradwatch_ingest_frames_total", kind="report") == 400


def test_e2e_agent_keeps_training_without_a_server() -> None:
    training = DemoTraining(seed=5)
    with refused_port() as port:  # nothing listens here
        monitor = gradwatch.attach(training.model, training.optimizer, run="orphan", server=f"127.0.0.1:{port}")
        durations = _train(monitor, training, range(1, 301))
        start = time.perf_counter()
        flushed = monitor.close(timeout=1.0)
        closing = time.perf_counter() - start
    assert not flushed
    assert closing < 2.0
    # No step waited on the network: the slowest step() stays far below a connect timeout.
    assert max(durations) < 0.25, max(durations)


def test_e2e_server_killed_and_restarted_resumes_without_gaps_or_duplicates() -> None:
    first, _ = _start()
    port = first.grpc_port  # the restarted server binds it again (a port that was just ours)
    training = DemoTraining(seed=6)
    monitor = gradwatch.attach(training.model, training.optimizer, run="phoenix", server=f"127.0.0.1:{port}")
    try:
        _train(monitor, training, range(1, 51))
        wait_until(lambda: monitor.counters()["acked"] >= 50, 10, what="steps 1..50 acknowledged",
                   detail=lambda: repr(monitor.counters()))  # fmt: skip
        assert monitor.counters()["acked"] == 50
        first.stop(grace=0)
        outage = _train(monitor, training, range(51, 101))
        assert max(outage) < 0.25, max(outage)
        second, _ = _start(port)
        try:
            _train(monitor, training, range(101, 151))
            assert monitor.close(timeout=15)
            text = _scrape(second)
            # The new server never saw steps 1..50 (acknowledged by the first); it got 51..150 exactly once.
            assert _sample(text, "gradwatch_ingest_frames_total", kind="report") == 100
            assert _sample(text, "gradwatch_run_step", run="phoenix") == 150
        finally:
            second.stop()
    finally:
        monitor.close(timeout=1)


@pytest.mark.parametrize("path", ["flush", "reconnect"])
def test_e2e_lost_acks_are_resent_and_deduplicated(server: tuple[ServerApp, AlertLog], path: str) -> None:
    """Acks for steps 31..60 are lost, then the connection drops. Either way every step is applied once:
    - "flush": the agent cannot reconnect before close(), so its final unary Flush resends 31..80 and the
      server drops the 30 it already holds as duplicates;
    - "reconnect": the agent reconnects first; Welcome tells it the server holds 1..60, so it resends nothing.
    """
    app, _ = server
    relay = FaultyRelay(("127.0.0.1", app.grpc_port))
    training = DemoTraining(seed=7)
    backoff_s = 60.0 if path == "flush" else 0.05
    retry = RetryPolicy(initial_backoff_s=backoff_s, max_backoff_s=backoff_s)
    monitor = gradwatch.attach(training.model, training.optimizer, run="lossy", server=relay.address, retry=retry)
    try:
        _train(monitor, training, range(1, 31))
        wait_until(lambda: monitor.counters()["acked"] >= 30, 10, what="steps 1..30 acknowledged",
                   detail=lambda: repr(monitor.counters()))  # fmt: skip
        relay.hold_replies()  # the server keeps applying frames; its acks never arrive
        _train(monitor, training, range(31, 61))

        def frames() -> float:
            return _sample(_scrape(app), "gradwatch_ingest_frames_total", kind="report")

        wait_until(lambda: frames() >= 60, 10, what="frames 1..60 at the server",
                   detail=lambda: f"report frames ingested: {frames()}")  # fmt: skip
        relay.cut()  # the agent never saw 31..60 acknowledged
        if path == "reconnect":
            wait_until(lambda: monitor.counters()["reconnects"] >= 1, 10, what="the agent to reconnect",
                       detail=lambda: repr(monitor.counters()))  # fmt: skip
        _train(monitor, training, range(61, 81))
        assert monitor.close(timeout=15)
    finally:
        relay.close()
    counters = monitor.counters()
    text = _scrape(app)
    assert _sample(text, "gradwatch_ingest_frames_total", kind="report") == 80
    assert _sample(text, "gradwatch_run_step", run="lossy") == 80
    if path == "flush":
        assert (counters["flushes"], counters["reconnects"]) == (1, 0)
        assert _sample(text, "gradwatch_ingest_duplicate_frames_total") == 30
    else:
        assert counters["reconnects"] == 1
        assert _sample(text, "gradwatch_ingest_duplicate_frames_total") == 0


def test_e2e_metrics_after_real_run_pass_promtool(server: tuple[ServerApp, AlertLog]) -> None:
    app, _ = server
    training = DemoTraining(seed=8)
    with gradwatch.attach(training.model, training.optimizer, run="scraped", server=app.grpc_target) as m:
        _train(m, training, range(1, 41), {30: "nan"})
        assert m.close(timeout=10)
    text = _scrape(app)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _sample(text, "gradwatch_alert_firing", run="scraped", detector="non_finite") == 1
    assert _sample(text, "gradwatch_alert_firing", run="scraped", detector="exploding_gradient") == 0
    assert _sample(text, "gradwatch_non_finite_events_total", run="scraped", kind="gradient") >= 1
    for layer in ("0", "2", "4"):  # the three Linear layers; the Tanh modules own no parameters
        _sample(text, "gradwatch_layer_grad_norm", run="scraped", layer=layer)


def test_e2e_grad_scaler_skipped_steps_are_counted_not_alerted(server: tuple[ServerApp, AlertLog]) -> None:
    from torch import nn

    app, log = server
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    skip_at = {25, 26, 33}  # after the detectors' warm-up: scaled gradients overflow (Inf), the scaler skips
    with gradwatch.attach(model, opt, run="amp", server=app.grpc_target, grad_scaler=scaler) as monitor:
        for step in range(1, 41):
            x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.mse_loss(model(x).float(), x.sum(dim=1, keepdim=True).sin())
            opt.zero_grad()
            scaler.scale(loss).backward()
            if step in skip_at:
                model[0].weight.grad[0, 0] = math.inf
            scaler.step(opt)
            scaler.update()
            monitor.step(loss)
        assert monitor.close(timeout=5)
    (run,) = app.runs()
    assert run["skipped_steps"] == 3 and run["step"] == 40
    assert run["non_finite_events"] == {"loss": 0, "gradient": 0, "weight": 0}
    assert app.alerts(run="amp") == [] and log.events == []
    text = _scrape(app)
    assert _sample(text, "gradwatch_skipped_steps_total", run="amp") == 3
    assert 0 < _sample(text, "gradwatch_layer_update_ratio", run="amp", layer="0") < 1  # step 40's update


def test_e2e_critical_alert_reaches_every_rank_as_a_flag_a_callback_and_an_exception(
    server: tuple[ServerApp, AlertLog],
) -> None:
    from gradwatch.agent.actions import AlertNotice, TrainingAlert

    app, log = server
    notices: list[AlertNotice] = []
    trainings = [DemoTraining(seed=10), DemoTraining(seed=11), DemoTraining(seed=12)]
    common = {"run": "act", "server": app.grpc_target, "world_size": 2}
    stopper = gradwatch.attach(trainings[0].model, trainings[0].optimizer, rank=0, on_alert="flag", **common)
    # Another run (its own model: attaching to a watched model replaces that model's monitor): never told.
    other = gradwatch.attach(trainings[2].model, None, rank=0, on_alert="flag", run="act-other",
                             server=app.grpc_target)  # fmt: skip
    raising = gradwatch.attach(trainings[1].model, trainings[1].optimizer, rank=1, on_alert="raise",
                               alert_callback=notices.append, **common)  # fmt: skip
    raised: list[TrainingAlert] = []
    deadline = time.monotonic() + 15
    step = 0
    while not raised or not stopper.stop_requested:
        assert time.monotonic() < deadline, "no alert action within 15 s"
        step += 1
        stopper.step(trainings[0].step())
        other.step(1.0)
        try:
            raising.step(trainings[1].step("nan" if step == 3 else "none"))
        except TrainingAlert as exc:
            raised.append(exc)
        time.sleep(0.01)  # let acks and commands flow between steps
    raising.step(trainings[1].step())  # once per alert: no second exception
    for monitor in (stopper, other, raising):
        monitor.close(timeout=5)
    firing = [e for e in log.events if e["state"] == "firing"]
    # The NaN sits in the input batch: input_not_normalized (a warning, which non_finite inhibits) sees it too.
    assert {(e["detector"], e["severity"]) for e in firing} <= {("non_finite", "critical"),
                                                               ("input_not_normalized", "warning")}  # fmt: skip
    (alert,) = [e for e in firing if e["detector"] == "non_finite"]
    assert alert["step"] == 3
    assert [(n.detector, n.severity, n.step, n.rank) for n in notices] == [("non_finite", "critical", 3, 1)]
    assert raised[0].notice == notices[0] and "non_finite" in str(raised[0])
    assert raising.stop_requested and stopper.last_alert == notices[0]
    assert other.last_alert is None and not other.stop_requested


def test_e2e_detector_settings_from_attach_apply_to_that_run_only(server: tuple[ServerApp, AlertLog]) -> None:
    """Per-run thresholds from the agent's attach options override the server's, for that run alone."""
    app, log = server
    quiet = {"non_finite": {"enabled": False}, "input_not_normalized": {"enabled": False}}
    for run, detectors in (("tuned", quiet), ("plain", None)):
        training = DemoTraining(seed=1)
        with gradwatch.attach(
            training.model, training.optimizer, run=run, server=app.grpc_target, detectors=detectors
        ) as m:
            _train(m, training, range(1, 41), {37: "nan"})
    alert = log.wait_for("non_finite")
    assert alert["run"] == "plain" and alert["step"] == 37
    assert {a["detector"] for a in app.alerts(run="tuned")} & {"non_finite", "input_not_normalized"} == set()


def test_e2e_bad_detector_setting_fails_at_attach_or_is_refused_with_its_key(
    server: tuple[ServerApp, AlertLog], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = server
    training = DemoTraining(seed=1)
    with pytest.raises(ValueError, match=r"detectors\.exploding_gradient\.factor must be a number"):
        gradwatch.attach(training.model, training.optimizer, run="bad", server=app.grpc_target,
                         detectors={"exploding_gradient": {"factor": {"x": 1}}})  # fmt: skip
    # A well-formed setting the server does not know: the stream is refused with the key, training goes on.
    with caplog.at_level("WARNING", logger="gradwatch"):
        m = gradwatch.attach(training.model, training.optimizer, run="typo", server=app.grpc_target,
                             detectors={"exploding_gradient": {"fctor": 20}})  # fmt: skip
        _train(m, training, range(1, 4))
        m.close(timeout=2)
    assert "detectors.exploding_gradient.fctor" in caplog.text
    assert app.store.get("typo") is None
