"""Scenario harness: a real tiny training run streaming to a real embedded server, and what it raised.

`run_training(...)` starts a `ServerApp` on loopback port 0 (optionally with detector overrides, given
exactly as the `detectors:` section of the server's YAML file and validated by the same loader), attaches
the real agent with `gradwatch.attach`, trains for `steps` steps on the CPU, flushes the agent and returns a
`RunResult`. Nothing is mocked: reports cross gRPC, every registered detector judges them, alerts come from
the server's alert book.

Training loop, per step (1-based)::

    x, y = data(step)                       # a fresh batch (a per-step batch function)
    ctx = StepContext(step, onset, model, optimizer, x, y)
    if onset is not None and step >= onset: fault(ctx)   # may mutate model, optimizer, ctx.x / ctx.y
    loss = loss_fn(model(ctx.x), ctx.y); zero_grad; backward; optimizer.step(); scheduler.step()
    monitor.step(loss, labels=ctx.y if labels else None)

A one-off fault tests `ctx.at_onset`; a persistent one acts on every step from the onset. A fault built
into the setup itself (an architecture, a frozen layer) has no callable: pass `fault_step=1` alone, so the
result still knows the onset. The agent's overhead
budget is off by default (`overhead_budget=0`): on these tiny models the agent is a large share of a step,
and the budget would otherwise stretch the full-statistics cadence unpredictably on a loaded machine.

`RunResult`:

* `alerts`: every alert that fired, in firing order (`SeenAlert`: detector, severity, step first fired,
  ranks, layer, summary); a detector that fired, resolved and fired again appears twice.
* `onset`: the fault step (None for a healthy run); `losses`: the loss per step (floats).
* `fired(detector)`, `first(detector)`, `steps_to_alert(detector)` (first firing step at or after the onset,
  minus the onset; None if it never fired there).
* `unexpected(severities=("warning", "critical"), allow=(...))`: alerts of those severities from detectors
  not in `allow`, leaving out those the server's inhibition rules would suppress (their inhibiting detector
  fired in the same run), since they never page.
* `detector_errors`: detectors that raised while judging a report (the server logs and skips them); a
  scenario test should assert it is empty.

Scenario definitions (model, data, fault) live in `gradwatch.scenarios.catalogue`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gradwatch.server.alerts import Alert

__all__ = ["DataFn", "FaultFn", "LossFn", "RunResult", "SeenAlert", "StepContext", "run_training"]

DataFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FLUSH_TIMEOUT_S = 60.0


@dataclass
class StepContext:
    """What a fault may change at one step: the batch (`x`, `y`), the model, the optimizer."""

    step: int
    onset: int | None
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    x: torch.Tensor
    y: torch.Tensor

    @property
    def at_onset(self) -> bool:
        """True only at the fault step (for one-off faults)."""
        return self.onset is not None and self.step == self.onset

    def scale_lr(self, factor: float) -> None:
        """Multiply every parameter group's learning rate by `factor`."""
        for group in self.optimizer.param_groups:
            group["lr"] *= factor


FaultFn = Callable[[StepContext], None]


@dataclass(frozen=True)
class SeenAlert:
    """An alert as it opened: `step` is where it started."""

    detector: str
    severity: str
    step: int
    ranks: tuple[int, ...]
    layer: str | None
    summary: str


@dataclass
class RunResult:
    """What a run raised (see module docstring)."""

    run: str
    onset: int | None
    steps: int
    alerts: list[SeenAlert] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    inhibitions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    detector_errors: list[str] = field(default_factory=list)

    def fired(self, detector: str) -> bool:
        return any(a.detector == detector for a in self.alerts)

    def first(self, detector: str) -> SeenAlert | None:
        """The first alert of `detector`, if any."""
        return next((a for a in self.alerts if a.detector == detector), None)

    def steps_to_alert(self, detector: str) -> int | None:
        """Steps from the fault onset to the first `detector` alert at or after it (0: same step)."""
        if self.onset is None:
            return None
        steps = [a.step for a in self.alerts if a.detector == detector and a.step >= self.onset]
        return min(steps) - self.onset if steps else None

    def unexpected(
        self, severities: Iterable[str] = ("warning", "critical"), allow: Iterable[str] = ()
    ) -> list[SeenAlert]:
        """Alerts of `severities` from detectors outside `allow` that would page (not inhibited)."""
        wanted, allowed = set(severities), set(allow)
        sources = {a.detector for a in self.alerts}
        inhibited = {target for src in sources for target in self.inhibitions.get(src, ())}
        return [
            a for a in self.alerts if a.severity in wanted and a.detector not in allowed and a.detector not in inhibited
        ]

    def describe(self) -> str:
        """One line per alert, for assertion messages."""
        if not self.alerts:
            return f"{self.run}: no alerts"
        lines = [f"{a.detector}/{a.severity} at step {a.step} layer {a.layer}: {a.summary}" for a in self.alerts]
        return f"{self.run} (onset {self.onset}):\n  " + "\n  ".join(lines)


class _DetectorErrors(logging.Handler):
    """Catches the ingest pipeline's 'detector X failed' log records."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.failed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("detector ") and record.exc_info:
            self.failed.append(f"{record.getMessage()}: {record.exc_info[1]!r}")


def run_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataFn,
    loss_fn: LossFn,
    *,
    steps: int,
    fault: FaultFn | None = None,
    fault_step: int | None = None,
    scheduler: Any = None,
    labels: bool = False,
    run: str = "scenario",
    attach_options: Mapping[str, Any] | None = None,
    detectors: Mapping[str, Mapping[str, Any]] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_alert: Callable[[Alert], None] | None = None,
) -> RunResult:
    """Train `steps` steps with gradwatch attached to a fresh embedded server; see the module docstring.

    `scheduler`: anything with `.step()`, stepped after each optimizer step. `labels`: pass `y` to
    `monitor.step` as class labels. `attach_options`: extra `gradwatch.attach` keywords. `detectors`:
    per-detector setting overrides ({"loss_spike": {"factor": 4.0}}). `on_step(step)`: called before each
    step (progress, timing); `on_alert(alert)`: the server's alerts (gradwatch.server.alerts.Alert) as they
    fire and resolve.
    """
    import gradwatch
    from gradwatch.server.app import ServerApp
    from gradwatch.server.config import load_config
    from gradwatch.server.detectors import inhibitions

    if fault is not None and fault_step is None:
        raise ValueError("a fault needs a fault_step")
    config = load_config(
        {
            "grpc": {"host": "127.0.0.1", "port": 0},
            "http": {"host": "127.0.0.1", "port": 0},
            "alerting": {"log": False},
            "detectors": {name: dict(values) for name, values in (detectors or {}).items()},
        },
        source="scenario detectors",
    )
    result = RunResult(run=run, onset=fault_step, steps=steps, inhibitions=inhibitions())
    lock = threading.Lock()

    def record(alert: Alert) -> None:
        if alert.run != run:
            return
        if on_alert is not None:
            on_alert(alert)
        if not alert.firing:
            return
        seen = SeenAlert(
            detector=alert.detector,
            severity=alert.severity,
            step=int(alert.step),
            ranks=tuple(alert.ranks),
            layer=alert.layer,
            summary=alert.summary,
        )
        with lock:
            result.alerts.append(seen)

    errors = _DetectorErrors()
    ingest_log = logging.getLogger("gradwatch.server.ingest")
    ingest_log.addHandler(errors)
    app = ServerApp(config)
    app.add_alert_listener(record)
    app.start()
    try:
        options = {"overhead_budget": 0.0, **(attach_options or {})}
        monitor = gradwatch.attach(model, optimizer, run=run, server=app.grpc_target, **options)
        try:
            for step in range(1, steps + 1):
                if on_step is not None:
                    on_step(step)
                x, y = data(step)
                ctx = StepContext(step, fault_step, model, optimizer, x, y)
                if fault is not None and fault_step is not None and step >= fault_step:
                    fault(ctx)
                loss = loss_fn(model(ctx.x), ctx.y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                monitor.step(loss, labels=ctx.y if labels else None)
                result.losses.append(float(loss.detach()))
        finally:
            flushed = monitor.close(timeout=FLUSH_TIMEOUT_S)
        if not flushed:
            raise RuntimeError(f"run {run!r}: the agent did not flush within {FLUSH_TIMEOUT_S} s")
        _settle(app, run, steps)
    finally:
        app.stop()
        ingest_log.removeHandler(errors)
    with lock:
        result.alerts.sort(key=lambda a: a.step)
    result.detector_errors = errors.failed
    return result


def _settle(app: Any, run: str, steps: int) -> None:
    """Wait until the server has applied the last step (the flush acks it; this guards the invariant)."""
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while time.monotonic() < deadline:
        for view in app.runs():
            if view.get("run") == run and int(view.get("step") or 0) >= steps:
                return
        time.sleep(0.02)
    raise RuntimeError(f"run {run!r}: the server never saw step {steps}")
