"""Preflight: can the model overfit one small batch? The first test of the debugging checklist.

    from gradwatch.preflight import overfit_check

    verdict = overfit_check(model, (x, y), torch.nn.functional.cross_entropy,
                            lambda params: torch.optim.Adam(params, lr=1e-3), steps=300)
    print(verdict)            # passed or failed, the loss curve's summary, the detectors that fired
    assert verdict.passed, verdict

A healthy model and training loop drive the loss on one fixed batch close to zero within a few hundred
steps; when they cannot, the bug is in the model, the loss or the optimizer set-up (a learning rate of
zero, parameters missing from the optimizer, a detached loss, labels that do not match), not in the
hyper-parameters, and no amount of data will fix it.

How it works: a deep copy of `model` (the caller's model is left untouched unless `copy=False`) is trained
on the same batch for `steps` steps with the optimizer `optimizer_factory(params)` builds, with the real
agent attached to a real embedded gradwatch server on loopback (the scenario harness,
`gradwatch.scenarios.harness`): every registered detector judges the run exactly as in production, with
per-layer statistics on every step and a loss plateau judged over 50 steps instead of 200 (the batch is
fixed, so there is no batch noise to average out). The run passes when the lowest of its last ten losses
is at most `max_final_ratio` of the first loss (or at most `target_loss`, when given).

Torch is imported when `overfit_check` runs, never when this module is imported.
"""

from __future__ import annotations

import copy as copy_module
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OverfitVerdict", "overfit_check"]

#: Detector settings for a fixed batch: no batch noise, so a plateau shows within 50 steps.
PREFLIGHT_DETECTORS: Mapping[str, Mapping[str, Any]] = {
    "loss_not_decreasing": {"window": 50, "smooth": 25},
}


@dataclass(frozen=True)
class FiredDetector:
    """A detector that raised an alert during the check: where it started and what it said."""

    detector: str
    severity: str
    step: int
    layer: str | None
    summary: str


@dataclass(frozen=True)
class OverfitVerdict:
    """The outcome of `overfit_check`: `passed`, the loss per step and the alerts raised."""

    passed: bool
    losses: tuple[float, ...]
    initial_loss: float
    final_loss: float
    threshold: float
    reason: str
    fired: tuple[FiredDetector, ...] = field(default=())

    @property
    def detectors(self) -> tuple[str, ...]:
        """Names of the detectors that fired, in firing order, each once."""
        return tuple(dict.fromkeys(f.detector for f in self.fired))

    def __str__(self) -> str:
        head = "overfit check PASSED" if self.passed else "overfit check FAILED"
        lines = [f"{head}: {self.reason}"]
        checkpoints = sorted({0, len(self.losses) // 4, len(self.losses) // 2, 3 * len(self.losses) // 4})
        curve = ", ".join(f"step {i + 1}: {self.losses[i]:.4g}" for i in checkpoints if i < len(self.losses))
        lines.append(f"  loss curve: {curve}, last: {self.final_loss:.4g}")
        for f in self.fired:
            where = f", layer {f.layer}" if f.layer else ""
            lines.append(f"  [{f.severity}] {f.detector} at step {f.step}{where}: {f.summary}")
        return "\n".join(lines)


def overfit_check(
    model: Any,
    batch: tuple[Any, Any],
    loss_fn: Callable[[Any, Any], Any],
    optimizer_factory: Callable[[Iterable[Any]], Any],
    *,
    steps: int = 300,
    max_final_ratio: float = 0.05,
    target_loss: float | None = None,
    copy: bool = True,
    labels: bool = False,
    detectors: Mapping[str, Mapping[str, Any]] | None = None,
) -> OverfitVerdict:
    """Train on one batch for `steps` steps and judge whether the model overfits it (module docstring).

    `batch`: (inputs, targets), passed as `loss_fn(model(inputs), targets)`. `optimizer_factory(params)`
    builds the optimizer for the (copied) model's parameters. `labels`: pass the targets to the agent as
    class labels. `detectors`: server detector settings merged over the preflight ones.
    Raises ValueError on a bad argument.
    """
    if steps < 20:
        raise ValueError(f"steps must be at least 20, got {steps}")
    if not 0.0 < max_final_ratio < 1.0:
        raise ValueError(f"max_final_ratio must be in (0, 1), got {max_final_ratio}")
    if not isinstance(batch, tuple) or len(batch) != 2:
        raise ValueError("batch must be an (inputs, targets) tuple")

    import torch

    from gradwatch.scenarios.harness import run_training

    trained = copy_module.deepcopy(model) if copy else model
    if not isinstance(trained, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    optimizer = optimizer_factory(trained.parameters())
    inputs, targets = batch
    settings = {name: dict(values) for name, values in PREFLIGHT_DETECTORS.items()}
    for name, values in (detectors or {}).items():
        settings.setdefault(name, {}).update(values)
    result = run_training(
        trained,
        optimizer,
        lambda step: (inputs, targets),
        loss_fn,
        steps=steps,
        labels=labels,
        run="preflight-overfit",
        attach_options={"full_stats_interval": 1},
        detectors=settings,
    )
    losses = tuple(result.losses)
    initial = losses[0]
    final = min(losses[-10:])
    threshold = target_loss if target_loss is not None else max_final_ratio * initial
    passed = final <= threshold and not any(a.severity == "critical" for a in result.alerts)
    fired = tuple(FiredDetector(a.detector, a.severity, a.step, a.layer, a.summary) for a in result.alerts)
    if passed:
        reason = f"the loss fell from {initial:.4g} to {final:.4g} in {steps} steps (threshold {threshold:.4g})"
    elif final <= threshold:
        reason = f"the loss fell to {final:.4g}, but a critical detector fired"
    else:
        drop = (initial - final) / abs(initial) if initial else 0.0
        reason = (
            f"the loss only went from {initial:.4g} to {final:.4g} ({drop:+.1%}) in {steps} steps on one batch "
            f"(needs ≤ {threshold:.4g}): the model, the loss or the optimizer set-up is broken"
        )
    return OverfitVerdict(passed, losses, initial, final, threshold, reason, fired)
