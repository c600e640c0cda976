"""Scenario-test helpers over the packaged harness (`gradwatch.scenarios.harness`, whose docstring is the API).

The harness and the scenario catalogue live in the package because `gradwatch demo --fault` and
`bench/detection_quality.py` run the same scenarios; this module re-exports them for the tests and adds the
two checks every scenario test makes:

* `assert_caught(result, detector, within=None)`: the fault raised `detector` at or after the onset
  (within `within` steps when given), no detector raised, and nothing unrelated paged critical.
* `assert_quiet(result)`: a healthy run raised no warning or critical alert from any registered detector.
"""

from __future__ import annotations

from gradwatch.scenarios.base import Scenario, Setup, run_scenario
from gradwatch.scenarios.catalogue import SCENARIOS, faults, healthy_runs, scenario
from gradwatch.scenarios.harness import RunResult, SeenAlert, StepContext, run_training

__all__ = [
    "SCENARIOS",
    "RunResult",
    "Scenario",
    "SeenAlert",
    "Setup",
    "StepContext",
    "assert_caught",
    "assert_quiet",
    "faults",
    "healthy_runs",
    "run_scenario",
    "run_training",
    "scenario",
]


def assert_caught(result: RunResult, detector: str, *, within: int | None = None, allow: tuple[str, ...] = ()) -> None:
    """`detector` fired at or after the onset (within `within` steps); no other detector paged critical."""
    assert not result.detector_errors, result.detector_errors
    delay = result.steps_to_alert(detector)
    assert delay is not None, f"{detector} never fired after onset\n{result.describe()}"
    if within is not None:
        assert delay <= within, f"{detector} fired {delay} steps after onset (> {within})\n{result.describe()}"
    early = [a for a in result.alerts if result.onset is not None and a.step < result.onset]
    assert not [a for a in early if a.severity != "info"], f"alerts before the fault\n{result.describe()}"
    stray = result.unexpected(severities=("critical",), allow=(detector, *allow))
    assert not stray, f"unrelated critical alerts\n{result.describe()}"


def assert_quiet(result: RunResult) -> None:
    """No warning or critical alert (info is allowed) and no detector error."""
    assert not result.detector_errors, result.detector_errors
    loud = result.unexpected(severities=("warning", "critical"))
    assert not loud, result.describe()
