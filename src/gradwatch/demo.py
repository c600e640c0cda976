"""`gradwatch demo`: an embedded server, a small training run, an injected fault.

The run is a tanh MLP regressing a smooth target on synthetic data, on the CPU.
At `fault_step` one of two faults is injected:

* ``nan``: one input value of the batch becomes NaN (a corrupt sample);
* ``explode``: the learning rate is multiplied by 30 (a bad schedule), so
  gradients grow geometrically until they overflow.

The demo prints every alert the server raised, with the step of injection and
the step and seconds at which the server detected it. It exits 1 when an
injected fault went undetected or a healthy run raised an alert.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

EXPLODE_LR_FACTOR = 30.0
ALERT_WAIT_S = 5.0
EXPECTED = {"nan": "non_finite", "explode": "exploding_gradient"}


class DemoTraining:
    """A tanh MLP regressing a smooth target on fresh synthetic batches (CPU, ~1 ms a step)."""

    FEATURES = 32
    BATCH = 128

    def __init__(self, seed: int = 0) -> None:
        import torch

        self._torch = torch
        self._gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.target = torch.randn(self.FEATURES, 1, generator=self._gen)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(self.FEATURES, 128),
            torch.nn.Tanh(),
            torch.nn.Linear(128, 128),
            torch.nn.Tanh(),
            torch.nn.Linear(128, 1),
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)

    def step(self, fault: str = "none") -> Any:
        """One optimisation step, injecting `fault` ("none", "nan", "explode") first; returns the loss."""
        torch = self._torch
        x = torch.randn(self.BATCH, self.FEATURES, generator=self._gen)
        y = torch.tanh(x @ self.target / 4) + 0.05 * torch.randn(self.BATCH, 1, generator=self._gen)
        if fault == "nan":
            x[0, 0] = float("nan")
        elif fault == "explode":
            for group in self.optimizer.param_groups:
                group["lr"] *= EXPLODE_LR_FACTOR
        elif fault != "none":
            raise ValueError(f"unknown fault {fault!r}; expected none, nan or explode")
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss


@dataclass
class _Seen:
    alert: dict[str, Any]
    received_at: float


class _ProgressBar:
    """A one-line progress bar on a terminal; ten plain lines elsewhere."""

    def __init__(self, total: int, out: TextIO) -> None:
        self._total = total
        self._out = out
        self._tty = out.isatty()
        self._last_decile = -1

    def update(self, done: int, note: str) -> None:
        if self._tty:
            width = 30
            filled = width * done // self._total
            self._out.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{self._total} {note:<32}")
            if done == self._total:
                self._out.write("\n")
            self._out.flush()
            return
        decile = 10 * done // self._total
        if decile != self._last_decile:
            self._last_decile = decile
            self._out.write(f"  step {done}/{self._total} {note}\n")


def run_demo(*, fault: str, steps: int, fault_step: int, seed: int = 0, out: TextIO = sys.stdout) -> int:
    """Run the demo and return the process exit code."""
    import torch

    import gradwatch
    from gradwatch.server.app import ServerApp
    from gradwatch.server.config import ServerConfig

    torch.set_num_threads(1)
    seen: list[_Seen] = []
    arrived = threading.Condition()

    def on_alert(alert: dict[str, Any]) -> None:
        with arrived:
            seen.append(_Seen(dict(alert), time.time()))
            arrived.notify_all()

    app = ServerApp(ServerConfig.local())
    app.add_alert_listener(on_alert)
    app.start()
    run_id = f"demo-{fault}-{int(time.time())}"
    out.write(f"gradwatch demo: server on grpc {app.grpc_target}, metrics at {app.http_url}/metrics\n")
    out.write(f"training {steps} steps, fault '{fault}'" + (f" at step {fault_step}\n" if fault != "none" else "\n"))
    injected_at: float | None = None
    try:
        training = DemoTraining(seed=seed)
        bar = _ProgressBar(steps, out)
        with gradwatch.attach(
            training.model, training.optimizer, run=run_id, server=app.grpc_target, job_name="demo"
        ) as monitor:
            for step in range(1, steps + 1):
                if fault != "none" and step == fault_step:
                    injected_at = time.time()
                loss = training.step(fault if step == fault_step else "none")
                monitor.step(loss)
                bar.update(step, f"alerts: {len(seen)}")
        expected = EXPECTED.get(fault)
        if expected is not None:
            with arrived:
                arrived.wait_for(lambda: any(s.alert["detector"] == expected for s in seen), ALERT_WAIT_S)
        return _print_summary(out, seen, fault, fault_step, injected_at)
    finally:
        app.stop()


def _print_summary(
    out: TextIO, seen: list[_Seen], fault: str, fault_step: int, injected_at: float | None
) -> int:
    fired = [s for s in seen if s.alert["state"] == "firing"]
    out.write(f"\nalerts raised: {len(fired)}\n")
    for s in fired:
        a = s.alert
        layer = f", layer {a['layer']}" if a.get("layer") else ""
        ranks = ",".join(str(r) for r in a["ranks"])
        out.write(f"  [{a['severity'].upper()}] {a['detector']} — rank {ranks}, step {a['step']}{layer}\n")
        out.write(f"      {a['summary']}\n")
        if injected_at is not None:
            delay = max(0.0, s.received_at - injected_at)
            out.write(
                f"      fault injected at step {fault_step}; detected at step {a['step']} "
                f"({a['step'] - fault_step} steps, {delay:.2f} s later)\n"
            )
    if fault == "none":
        if fired:
            out.write("a healthy run raised alerts: that is a false page\n")
            return 1
        out.write("healthy run: no alerts, as expected\n")
        return 0
    if not any(s.alert["detector"] == EXPECTED[fault] for s in fired):
        out.write(f"the injected fault was not detected: no {EXPECTED[fault]} alert\n")
        return 1
    return 0
