"""Every scenario, from one place: the tests, bench/detection_quality.py and `gradwatch demo --fault`.

Scenario modules each export `SCENARIOS` (a tuple of `Scenario`); add a new module to `_MODULES`.
Names are unique and stable (they are the demo's `--fault` values and the bench's row keys).
"""

from __future__ import annotations

from gradwatch.scenarios import activation_faults, healthy, training_faults
from gradwatch.scenarios.base import Scenario

__all__ = ["SCENARIOS", "faults", "healthy_runs", "scenario"]

_MODULES = (training_faults, activation_faults, healthy)

SCENARIOS: tuple[Scenario, ...] = tuple(s for module in _MODULES for s in module.SCENARIOS)

_names = [s.name for s in SCENARIOS]
if len(set(_names)) != len(_names):
    raise RuntimeError(f"duplicate scenario names: {sorted(n for n in set(_names) if _names.count(n) > 1)}")


def scenario(name: str) -> Scenario:
    """The scenario called `name`; KeyError naming the known ones otherwise."""
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(f"no scenario {name!r} (known: {', '.join(_names)})")


def faults() -> tuple[Scenario, ...]:
    """Scenarios that inject a fault, in catalogue order."""
    return tuple(s for s in SCENARIOS if not s.healthy)


def healthy_runs() -> tuple[Scenario, ...]:
    return tuple(s for s in SCENARIOS if s.healthy)
