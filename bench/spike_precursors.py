#!/usr/bin/env python3
"""Do gradient-norm or update-norm precursors rise before a loss spike? Lead time and precision of simple rules.

The repository's spike scenarios (gradwatch.scenarios: `spike`, one batch of garbage targets; `explode`, SGD's
rate ×30; `diverge`, Adam's rate ×300) are trained without an agent, several seeds each, beside the same runs
without their fault (the false-warning baseline). Every step records the loss, the global gradient norm (before
the step) and the global update norm |w_after − w_before|.

A *loss spike* is the first step at or after the fault whose loss exceeds the median of the previous `--window`
losses by 6 robust standard deviations (1.4826 × MAD) and by 50 % (the guard's rule with its defaults, windowed
on all steps). A *warning* of a rule is a step where its signal exceeds the median of its previous `--window`
values by `k` robust standard deviations and by 25 %; rules: gradient norm and update norm, k ∈ {3, 6}, and
"rising": the signal grew by more than 10 % on each of the last 3 steps. For each rule:
- lead time: spike step − the first warning in the 50 steps up to and including the spike step (0: the warning
  comes with the spike, no earlier; "none": no warning there);
- false warnings: warnings per 1000 steps of the healthy runs, and in the fault runs before the fault step.

    python bench/spike_precursors.py [--seeds 10] [--window 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradwatch.scenarios.base import Scenario
from gradwatch.scenarios.harness import StepContext
from gradwatch.scenarios.training_faults import SCENARIOS

NAMES = ("spike", "explode", "diverge")
LOOKBACK = 50  # steps before a spike in which a warning counts as its precursor
Rule = Callable[[np.ndarray, int, int], bool]  # (signal, step index, window) -> warn


def robust(k: float) -> Rule:
    def warn(values: np.ndarray, i: int, window: int) -> bool:
        past = values[max(0, i - window) : i]
        past = past[np.isfinite(past)]
        if past.size < 10:
            return False
        median = float(np.median(past))
        mad = float(np.median(np.abs(past - median)))
        value = float(values[i])
        return not np.isfinite(value) or value > median + max(k * 1.4826 * mad, 0.25 * abs(median))

    return warn


def rising(values: np.ndarray, i: int, window: int) -> bool:
    if i < 3:
        return False
    last = values[i - 3 : i + 1]
    return bool(np.all(last[1:] > 1.1 * last[:-1]))


RULES: dict[str, tuple[str, Rule]] = {
    "grad_norm z>3": ("grad", robust(3.0)),
    "grad_norm z>6": ("grad", robust(6.0)),
    "grad_norm rising": ("grad", rising),
    "update_norm z>3": ("update", robust(3.0)),
    "update_norm z>6": ("update", robust(6.0)),
    "update_norm rising": ("update", rising),
}


def train(scenario: Scenario, seed: int, with_fault: bool) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    setup = scenario.build(seed)
    model, optimizer = setup.model, setup.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    losses, grads, updates = [], [], []
    for step in range(1, scenario.steps + 1):
        x, y = setup.data(step)
        ctx = StepContext(step, scenario.fault_step, model, optimizer, x, y)
        if with_fault and setup.fault is not None and step >= (scenario.fault_step or 0):
            setup.fault(ctx)
        loss = setup.loss_fn(model(ctx.x), ctx.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads.append(float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))
        before = [p.detach().clone() for p in params]
        optimizer.step()
        updates.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.detach() - b) for p, b in zip(params, before, strict=True)]))))  # fmt: skip
        losses.append(float(loss.detach()))
    return {"loss": np.array(losses), "grad": np.array(grads), "update": np.array(updates)}


def spike_step(loss: np.ndarray, start: int, window: int) -> int | None:
    """Index of the first loss spike at or after index `start` (the guard's rule, see the docstring)."""
    for i in range(max(start, 10), loss.size):
        past = loss[max(0, i - window) : i]
        median = float(np.median(past))
        mad = float(np.median(np.abs(past - median)))
        if not np.isfinite(loss[i]) or loss[i] > median + max(6 * 1.4826 * mad, 0.5 * abs(median)):
            return i
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenarios = {s.name: s for s in SCENARIOS}
    out: dict[str, Any] = {"window": args.window, "seeds": args.seeds, "scenarios": {}}
    for name in NAMES:
        scenario = scenarios[name]
        fault_index = (scenario.fault_step or 1) - 1
        leads: dict[str, list[int | None]] = {rule: [] for rule in RULES}
        early: dict[str, int] = dict.fromkeys(RULES, 0)
        healthy: dict[str, int] = dict.fromkeys(RULES, 0)
        spikes: list[int | None] = []
        healthy_steps = early_steps = 0
        for seed in range(args.seeds):
            faulty = train(scenario, seed, True)
            clean = train(scenario, seed, False)
            spike = spike_step(faulty["loss"], fault_index, args.window)
            spikes.append(None if spike is None else spike - fault_index)
            healthy_steps += clean["loss"].size - 10
            early_steps += fault_index - 10
            for rule, (signal, warn) in RULES.items():
                healthy[rule] += sum(warn(clean[signal], i, args.window) for i in range(10, clean["loss"].size))
                early[rule] += sum(warn(faulty[signal], i, args.window) for i in range(10, fault_index))
                lead = None
                if spike is not None:
                    hits = [
                        i for i in range(max(0, spike - LOOKBACK), spike + 1) if warn(faulty[signal], i, args.window)
                    ]
                    lead = spike - hits[0] if hits else None
                leads[rule].append(lead)
        print(f"\n{name}: {scenario.description}")
        print(f"  loss spike at fault + {spikes} (steps; None: no spike by the rule)")
        rows = {}
        for rule in RULES:
            found = [lead for lead in leads[rule] if lead is not None]
            per_k_healthy = 1000 * healthy[rule] / max(healthy_steps, 1)
            per_k_early = 1000 * early[rule] / max(early_steps, 1)
            median = statistics.median(found) if found else None
            print(f"  {rule:20s} lead {leads[rule]}  median {median}  false warnings: healthy {per_k_healthy:.1f}"
                  f"/1000 steps, before the fault {per_k_early:.1f}/1000")  # fmt: skip
            rows[rule] = {"leads": leads[rule], "false_per_1000_healthy": per_k_healthy,
                          "false_per_1000_before_fault": per_k_early}  # fmt: skip
        out["scenarios"][name] = {"spike_after_fault": spikes, "rules": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
