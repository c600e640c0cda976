"""Every scenario of the catalogue on a real run: each fault raises its detector, as fast and naming what it
should (EXPECTED, one row per fault scenario and detector), and each healthy run stays quiet while it learns.

A fault added to the catalogue without a row here fails `test_every_fault_scenario_has_expectations`."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest

pytest.importorskip("torch")

from harness import RunResult, Scenario, assert_caught, assert_quiet, faults, healthy_runs, run_scenario


@dataclass(frozen=True)
class Expect:
    """What one detector's first alert on a fault scenario must show."""

    #: The detector; None: the scenario's own (`expect`), judged by assert_caught (nothing else pages critical).
    detector: str | None = None
    #: Steps from the onset to the first alert, at most.
    within: int | None = None
    severity: str | None = None
    #: The alert names one of these layers.
    layers: tuple[str, ...] = ()
    #: The alert names a layer (any).
    has_layer: bool = False
    #: Substrings of its summary.
    says: tuple[str, ...] = ()
    #: Detectors that must not fire at all.
    silent: tuple[str, ...] = ()
    #: Anything more the run must show.
    check: Callable[[RunResult], None] | None = None
    seeds: tuple[int, ...] = (0,)


def _nan_after_the_gradient_alert(result: RunResult) -> None:
    nan, first = result.first("non_finite"), result.first("exploding_gradient")
    assert first is not None and (nan is None or nan.step > first.step), result.describe()


def _spike_recovers(result: RunResult) -> None:
    assert result.losses[-1] < 2 * min(result.losses[:99]) + 0.05, "the run did not recover"


def _enough_labels_seen(result: RunResult) -> None:
    alert = result.first("class_imbalance")
    seen = re.search(r"of (\d+) labels seen", alert.summary if alert else "")
    assert seen is not None and int(seen.group(1)) >= 500, result.describe()  # judged only once enough were seen


def _one_window(result: RunResult) -> None:
    alert = result.first("loss_not_decreasing")
    # The default window is 200 reports, judged 10 times in a row.
    assert alert is not None and alert.step <= 220, result.describe()


def _only_warning_is_gradients_not_applied(result: RunResult) -> None:
    loud = [a.detector for a in result.unexpected(severities=("warning", "critical"))]
    assert loud == ["gradients_not_applied"], result.describe()


EXPECTED: dict[str, tuple[Expect, ...]] = {
    "nan": (
        Expect(within=0, severity="critical", says=("input batch",)),
        Expect("input_not_normalized", within=0, says=("NaN or Inf",)),
    ),
    # The step after the jump is the first whose gradient the bigger update changed; two reports confirm.
    "explode": (Expect(within=4, check=_nan_after_the_gradient_alert),),
    "diverge": (Expect(),),
    "shuffled_labels": (Expect(within=10, silent=("exploding_gradient",)),),
    "spike": (Expect(within=0, silent=("loss_divergence", "exploding_gradient"), check=_spike_recovers),),
    "lr_zero": (Expect(severity="warning", says=("not decreasing",), check=_one_window),),
    "deep_sigmoid": (Expect(layers=("0",), says=("vanish with depth",)),),
    # Full statistics every 10 steps; the median of 5 turns after 3 low reports.
    "lr_too_low": (Expect(within=30, has_layer=True, says=("too low",)),),
    # Step 1's norm is the reference; steps 2 and 3 are the first two over it (consecutive = 2).
    "broken_from_start": (
        Expect(within=5, severity="critical", says=("first norm",), silent=("poor_weight_init",), seeds=(0, 1)),
    ),
    "frozen_layer": (
        Expect(within=40, severity="warning", layers=("0",), check=_only_warning_is_gradients_not_applied),
        Expect("frozen_parameters", severity="info", says=("1 never updated",)),
    ),
    # Three full-statistics reports in a row (every 10 steps) after the warm-up: at most ~4 reports.
    "dead_relu": (Expect(within=40, severity="warning", layers=("1",), says=("75%",)),),
    "saturated_tanh": (
        Expect(within=50, layers=("3",), says=("Tanh",), silent=("dead_relu", "activation_not_centered")),
    ),
    # Three warm-up reports, then five in a row over the threshold (a report every 10 steps).
    "sigmoid_hidden": (Expect(within=90, layers=("1", "3"), says=("Sigmoid",)),),
    "raw_pixels": (Expect(within=40, layers=("input",), says=("off-scale",)),),
    "tiny_init": (Expect(within=30, has_layer=True, says=("vanishes with depth",)),),
    "constant_init": (Expect(within=30, layers=("0",), says=("same value",)),),
    "stuck_batch": (Expect(within=50, layers=("output",), says=("same output",)),),
    # Labels are counted on full-statistics steps (64 every 10 steps): 500 are seen by step 80.
    "class_imbalance": (
        Expect(within=90, says=("class 0",), silent=("input_not_normalized",), check=_enough_labels_seen),
    ),
}

FAULT_CASES = [
    pytest.param(sc, seed, id=f"{sc.name}-seed{seed}" if seed else sc.name)
    for sc in faults()
    for seed in sorted({s for e in EXPECTED.get(sc.name, (Expect(),)) for s in e.seeds})
]
HEALTHY = healthy_runs()


def test_every_fault_scenario_has_expectations() -> None:
    assert sorted(EXPECTED) == sorted(sc.name for sc in faults())
    for name, rows in EXPECTED.items():
        assert rows[0].detector is None, f"{name}: the first row is the scenario's own detector"


@pytest.mark.parametrize(("sc", "seed"), FAULT_CASES)
def test_fault_scenario_raises_its_detector(sc: Scenario, seed: int) -> None:
    assert sc.expect is not None
    result = run_scenario(sc, seed)
    for expect in EXPECTED[sc.name]:
        if seed not in expect.seeds:
            continue
        detector = expect.detector or sc.expect
        if expect.detector is None:
            assert_caught(result, detector, within=expect.within, allow=sc.allow)
        elif expect.within is not None:
            delay = result.steps_to_alert(detector)
            assert delay is not None and delay <= expect.within, result.describe()
        alert = result.first(detector)
        assert alert is not None, f"{detector} never fired\n{result.describe()}"
        assert expect.severity is None or alert.severity == expect.severity, result.describe()
        assert not expect.layers or alert.layer in expect.layers, result.describe()
        assert alert.layer is not None or not expect.has_layer, result.describe()
        for words in expect.says:
            assert words in alert.summary, result.describe()
        assert not [d for d in expect.silent if result.fired(d)], result.describe()
        if expect.check is not None:
            expect.check(result)


def test_the_catalogue_has_at_least_eight_healthy_runs() -> None:
    assert len(HEALTHY) >= 8


@pytest.mark.parametrize("sc", HEALTHY, ids=[s.name for s in HEALTHY])
def test_healthy_run_raises_nothing(sc: Scenario) -> None:
    result = run_scenario(sc)
    assert_quiet(result)
    # It really trained: the median of its last ten losses is well below that of its first ten.
    assert statistics.median(result.losses[-10:]) < 0.8 * statistics.median(result.losses[:10]), result.losses[::25]
