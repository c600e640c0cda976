"""`gradwatch demo`: an embedded server, a small training run on the CPU, an injected fault.

`--fault NAME` takes any fault scenario of `gradwatch.scenarios.catalogue` (the same runs the detector tests
and bench/detection_quality.py use; `gradwatch demo --list` prints them with the detector each must raise),
or ``none`` for a healthy run. The scenario's model, data and fault are trained for `steps` steps with the
agent attached (fault injected at `fault_step`, both defaulting to the scenario's own), and the demo prints
every alert the server raised, with the step of injection and the step and seconds at which it was
detected. It exits 1 when the injected fault went undetected or a healthy run raised a warning or a
critical alert, 2 on a bad fault name or step.

`DemoTraining` is the small tanh MLP regression the end-to-end tests and the latency bench drive by hand.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gradwatch.server.alerts import Alert

EXPLODE_LR_FACTOR = 30.0
ALERT_WAIT_S = 5.0
HEALTHY = "none"
#: The healthy scenario `--fault none` trains.
HEALTHY_SCENARIO = "healthy_mlp_sgd"


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


def fault_names() -> tuple[str, ...]:
    """Every --fault value: "none" and the catalogue's fault scenarios (imports torch)."""
    from gradwatch.scenarios.catalogue import faults

    return (HEALTHY, *(s.name for s in faults()))


def list_faults(out: TextIO = sys.stdout) -> int:
    """Print every --fault value with the detector it must raise; returns the exit code."""
    from gradwatch.scenarios.catalogue import faults

    out.write(f"{HEALTHY:<24} a healthy run: no warning or critical alert\n")
    for s in faults():
        out.write(f"{s.name:<24} → {s.expect}: {s.description}\n")
    return 0


@dataclass
class _Seen:
    alert: Alert
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


def run_demo(
    *,
    fault: str,
    steps: int | None = None,
    fault_step: int | None = None,
    seed: int = 0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the demo and return the process exit code (module docstring)."""
    from gradwatch.scenarios.base import run_scenario
    from gradwatch.scenarios.catalogue import scenario

    names = fault_names()
    if fault not in names:
        err.write(f"gradwatch demo: unknown fault {fault!r}; known: {', '.join(names)}\n")
        return 2
    sc = scenario(HEALTHY_SCENARIO if fault == HEALTHY else fault)
    steps = steps if steps is not None else sc.steps
    if sc.healthy:
        fault_step = None
    elif sc.fault_step == 1:
        if fault_step not in (None, 1):
            err.write(f"gradwatch demo: fault {fault!r} is built into the set-up from step 1; omit --fault-step\n")
            return 2
        fault_step = 1
    else:
        fault_step = fault_step if fault_step is not None else sc.fault_step
    if fault_step is not None and fault_step > steps:
        err.write(f"gradwatch demo: --fault-step {fault_step} is beyond --steps {steps}\n")
        return 2
    sc = dataclasses.replace(sc, steps=steps, fault_step=fault_step)

    seen: list[_Seen] = []
    arrived = threading.Condition()
    bar = _ProgressBar(steps, out)
    injected_at: list[float] = []

    def on_alert(alert: Alert) -> None:
        with arrived:
            seen.append(_Seen(alert, time.time()))
            arrived.notify_all()

    def on_step(step: int) -> None:
        if step == fault_step:
            injected_at.append(time.time())
        if step > 1:
            bar.update(step - 1, f"alerts: {len(seen)}")

    out.write(f"gradwatch demo: {sc.name}: {sc.description}\n")
    out.write(
        f"training {steps} steps on the CPU with an embedded server"
        + (f", fault injected at step {fault_step}\n" if fault_step is not None else "\n")
    )
    result = run_scenario(sc, seed, on_step=on_step, on_alert=on_alert)
    bar.update(steps, f"alerts: {len(seen)}")
    if sc.expect is not None:
        with arrived:
            arrived.wait_for(lambda: any(s.alert.detector == sc.expect for s in seen), ALERT_WAIT_S)
    return _print_summary(out, seen, sc.expect, fault_step, injected_at[0] if injected_at else None, result.losses)


def _print_summary(
    out: TextIO,
    seen: list[_Seen],
    expected: str | None,
    fault_step: int | None,
    injected_at: float | None,
    losses: list[float],
) -> int:
    fired = [s for s in seen if s.alert.firing]
    if losses:
        out.write(f"\nloss: first {losses[0]:.4g}, last {losses[-1]:.4g}\n")
    out.write(f"alerts raised: {len(fired)}\n")
    for s in fired:
        a = s.alert
        layer = f", layer {a.layer}" if a.layer else ""
        ranks = ",".join(str(r) for r in a.ranks)
        out.write(f"  [{a.severity.upper()}] {a.detector} — rank {ranks}, step {a.step}{layer}\n")
        out.write(f"      {a.summary}\n")
        if injected_at is not None and fault_step is not None:
            delay = max(0.0, s.received_at - injected_at)
            out.write(
                f"      fault injected at step {fault_step}; detected at step {a.step} "
                f"({a.step - fault_step} steps, {delay:.2f} s later)\n"
            )
    if expected is None:
        loud = [s for s in fired if s.alert.severity in ("warning", "critical")]
        if loud:
            out.write("a healthy run raised alerts: that is a false page\n")
            return 1
        out.write("healthy run: no alerts, as expected\n")
        out.write(NEXT_STEPS)
        return 0
    if not any(s.alert.detector == expected for s in fired):
        out.write(f"the injected fault was not detected: no {expected} alert\n")
        return 1
    out.write(NEXT_STEPS)
    return 0


#: What the demo ends with: how to go from here to a real run.
NEXT_STEPS = """
next:
  gradwatch demo --list                 every fault scenario and the detector it must raise
  gradwatch serve                       a standing server: gRPC on 50051, HTTP on 9400 (overview at /)
  gradwatch.attach(model, optimizer, run="my-run", server="localhost:50051")   in your training loop
  gradwatch runs | alerts | incidents | top | report ID     what the server saw (README: Quick start)
"""
