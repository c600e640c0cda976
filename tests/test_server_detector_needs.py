"""DetectorSpec.needs and .observes are promises the ingestor relies on to skip calls: checked on generated reports.

A detector that `needs` some report parts is run twice over the same generated reports of two ranks: one
instance sees every report, the other only those carrying one of the parts it needs (what the ingestor calls
it with). Every verdict must be the same, and None on the reports the second instance never saw. A cross-rank
detector with `observes=False` must find nothing in any report (its ticks judge).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.detectors import REGISTRY
from gradwatch.server.detectors.base import REPORT_PARTS, report_parts
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.settings import SettingError

LAYERS = ("a.weight", "b.weight", "c.weight")
MODULES = ("net.0", "net.1", "net.2", "net.3")
TYPES = ("Linear", "ReLU", "Tanh", "Linear")
SKIPPING = [spec for spec in REGISTRY if spec.needs]
TICK_ONLY = [spec for spec in REGISTRY if not spec.observes]

# Values at and around the detectors' thresholds (dead and saturated fractions, zero gradients and updates,
# collapsed outputs, lopsided labels), so that they fire and clear within a short sequence.
_FRACTION = st.sampled_from([0.0, 0.05, 0.5, 0.97, 1.0, math.nan])
_NORM = st.sampled_from([0.0, 1e-9, 0.01, 1.0, 30.0, math.nan])


def _column(draw: st.DrawFn, values: st.SearchStrategy[float], n: int) -> np.ndarray:
    return np.asarray(draw(st.lists(values, min_size=n, max_size=n)), dtype=np.float32)


@st.composite
def _report(draw: st.DrawFn, rank: int, step: int) -> RankReport:
    fields: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {}
    if draw(st.booleans()):
        columns = {"grad_norm": _column(draw, _NORM, 3), "weight_norm": _column(draw, _NORM, 3)}
        if draw(st.booleans()):
            columns["update_ratio"] = _column(draw, _NORM, 3)
    ratio = columns.get("update_ratio")
    if ratio is None and draw(st.booleans()):
        ratio = _column(draw, _NORM, 3)
    if draw(st.booleans()):
        fields["activations"] = {
            "dead_fraction": _column(draw, _FRACTION, 4),
            "saturated_fraction": _column(draw, _FRACTION, 4),
            "mean": _column(draw, st.sampled_from([0.0, 0.1, 5.0, -3.0]), 4),
            "std": _column(draw, st.sampled_from([0.0, 0.01, 1.0]), 4),
        }
        fields["modules"], fields["module_types"] = MODULES, TYPES
    if draw(st.booleans()):
        fields["output_spread"] = draw(st.sampled_from([0.0, 1e-6, 0.5, math.nan]))
        fields["output_rms"] = draw(st.sampled_from([0.0, 1.0, math.inf]))
    if draw(st.booleans()):
        fields["label_histogram"] = _column(draw, st.sampled_from([0.0, 1.0, 500.0, 10_000.0]), 3)
    if draw(st.booleans()):
        fields["param_checksum"] = draw(st.sampled_from([1, 2]))
    return RankReport(
        run="run", rank=rank, step=step, wall_time=float(step), step_duration_s=0.1,
        loss=draw(st.sampled_from([0.5, 2.0, 1e-6])), grad_norm=draw(st.sampled_from([0.0, 1.0, 50.0])),
        non_finite_flags=0, columns=columns, layer_names=LAYERS, non_finite_kinds=(), non_finite_layer=None,
        received_at=float(step), update_ratio=ratio, **fields,
    )  # fmt: skip


@st.composite
def _reports(draw: st.DrawFn) -> list[RankReport]:
    steps = draw(st.integers(1, 40))
    return [draw(_report(rank, step)) for step in range(1, steps + 1) for rank in (0, 1)]


def _config(spec: Any) -> Any:
    """The detector's settings with its streaks shortened, so that random reports make it fire and clear."""
    short = {"consecutive": 1, "reports": 1, "resolve_after": 2, "min_reports": 0}
    names = {field.name for field in dataclasses.fields(spec.config_type)}
    return spec.config_type(**{key: value for key, value in short.items() if key in names})


def _table() -> RankTable:
    table = RankTable(2)
    for rank in (0, 1):
        table.join(rank, 2, "host", 0, 2, now=0.0)  # one replica group of two: checksums are compared
    return table


def _outcome(detector: Any, report: RankReport, table: RankTable | None) -> Any:
    return detector.observe(report) if table is None else list(detector.observe(report, table))


@pytest.mark.parametrize("spec", SKIPPING, ids=lambda spec: spec.name)
@settings(max_examples=25, deadline=None)
@given(reports=_reports())
def test_a_detector_shown_only_the_reports_it_needs_says_the_same(spec: Any, reports: list[RankReport]) -> None:
    everything, needed = spec.create(_config(spec)), spec.create(_config(spec))
    tables = (_table(), _table()) if spec.scope == "run" else (None, None)
    for report in reports:
        for table in tables:
            if table is not None:
                table.report(report.rank, report.step, 0.1, None, now=report.received_at)
        seen = _outcome(everything, report, tables[0])
        if spec.needs_mask & report_parts(report):
            assert _outcome(needed, report, tables[1]) == seen
        else:
            assert seen in (None, []), f"{spec.name} judged a report without {spec.needs}: {seen}"


def _shortest(spec: Any) -> Any:
    """The detector's settings with each streak and warm-up as short as it accepts (judged within the reports)."""
    values: dict[str, int] = {}
    names = {field.name for field in dataclasses.fields(spec.config_type)}
    for key in ("consecutive", "reports", "resolve_after", "min_reports", "window", "min_steps"):
        for value in range(0, 12) if key in names else ():
            try:
                spec.config_type(**values, **{key: value})
            except SettingError:
                continue
            values[key] = value
            break
    return spec.config_type(**values)


def _contents(report: RankReport) -> list[Any]:
    """Each field of `report` and, for its arrays (also inside mappings), their bytes."""
    out: list[Any] = []
    for field in dataclasses.fields(report):
        value = getattr(report, field.name)
        out.append(value)
        for item in value.values() if isinstance(value, dict) else [value]:
            if isinstance(item, np.ndarray):
                out.append(item.tobytes())
    return out


@pytest.mark.parametrize("spec", REGISTRY, ids=lambda spec: spec.name)
@settings(max_examples=5, deadline=None)
@given(reports=_reports())
def test_no_detector_changes_a_report(spec: Any, reports: list[RankReport]) -> None:
    """Reports are shared by the store, the recorder and every detector, and are not frozen (RankReport): no
    detector may assign to one or write into its arrays."""
    detector, table = spec.create(_shortest(spec)), _table() if spec.scope == "run" else None
    for report in reports:
        before = _contents(report)
        if table is not None:
            table.report(report.rank, report.step, 0.1, None, now=report.received_at)
        _outcome(detector, report, table)
        after = _contents(report)
        assert len(after) == len(before)
        for old, new in zip(before, after, strict=True):
            assert new is old or (isinstance(old, bytes) and new == old), f"{spec.name} changed a report"


@pytest.mark.parametrize("spec", TICK_ONLY, ids=lambda spec: spec.name)
@settings(max_examples=10, deadline=None)
@given(reports=_reports())
def test_a_tick_only_detector_finds_nothing_in_reports(spec: Any, reports: list[RankReport]) -> None:
    detector, table = spec.create(spec.config_type()), _table()
    for report in reports:
        table.report(report.rank, report.step, 0.1, None, now=report.received_at)
        assert list(detector.observe(report, table)) == []


def test_report_parts_has_one_bit_per_part() -> None:
    empty = RankReport(
        run="run", rank=0, step=1, wall_time=0.0, step_duration_s=0.1, loss=0.5, grad_norm=1.0,
        non_finite_flags=0, columns={}, layer_names=LAYERS, non_finite_kinds=(), non_finite_layer=None,
        received_at=0.0,
    )  # fmt: skip
    assert report_parts(empty) == 0
    one = np.ones(len(LAYERS), dtype=np.float32)
    parts = {"columns": {"grad_norm": one}, "activations": {"mean": one}, "update_ratio": one, "output_spread": 1.0,
             "label_histogram": np.ones(4), "param_checksum": 7}  # fmt: skip
    assert set(parts) == set(REPORT_PARTS)
    for part, value in parts.items():  # bit i of report_parts is REPORT_PARTS[i]
        assert report_parts(dataclasses.replace(empty, **{part: value})) == 1 << REPORT_PARTS.index(part), part
    assert all(spec.needs_mask < 1 << len(REPORT_PARTS) for spec in REGISTRY)
    assert SKIPPING and TICK_ONLY  # the ingestor's skips are in use (else this file checks nothing)
