"""Decoding of activation, output, input and label statistics into RankReport (numpy views, no copies)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from activation_support import MODULE_TYPES, MODULES, activation_report, f32, schema
from gradwatch.server.report import ACTIVATION_COLUMN_NAMES, build_report
from gradwatch.v1 import gradwatch_pb2 as pb


def test_report_decodes_every_activation_column_as_read_only_views() -> None:
    m = len(MODULES)
    values = {name: [float(i + 10 * k) for i in range(m)] for k, name in enumerate(ACTIVATION_COLUMN_NAMES)}
    values["log2_histogram"] = [float(v) for v in range(m * 32)]
    report = activation_report(10, acts=values)
    assert report.modules == MODULES and report.module_types == MODULE_TYPES
    assert set(report.activations) == set(ACTIVATION_COLUMN_NAMES)
    for name in ACTIVATION_COLUMN_NAMES:
        column = report.activations[name]
        assert column.dtype == np.dtype("<f4") and not column.flags.writeable
        if name == "log2_histogram":
            assert column.shape == (m, 32) and column[2, 5] == 2 * 32 + 5  # module-major
        else:
            np.testing.assert_array_equal(column, values[name])
    assert "unit_spread" in report.activations  # the symmetric-neuron column travels too


def test_report_decodes_output_input_and_labels() -> None:
    report = activation_report(
        10, output_spread=0.25, output_rms=2.0, input_mean=[0.5, -1.0], input_std=[1.0, 3.0], labels=[4, 0, 7]
    )
    assert report.output_spread == 0.25 and report.output_rms == 2.0
    assert report.input_mean is not None and report.input_std is not None
    np.testing.assert_array_equal(report.input_mean, [0.5, -1.0])
    np.testing.assert_array_equal(report.input_std, [1.0, 3.0])
    assert report.label_histogram is not None
    np.testing.assert_array_equal(report.label_histogram, [4, 0, 7])
    assert not report.input_non_finite


def test_report_without_model_io_has_empty_defaults() -> None:
    msg = pb.StepReport(step=3, grad_sum_squares=1.0)
    report = build_report("run", 0, msg, ("a",), 0.0, schema())
    assert report.activations == {} and report.modules == () and report.module_types == ()
    assert report.output_spread is None and report.output_rms is None
    assert report.input_mean is None and report.input_std is None and report.label_histogram is None


def test_report_input_non_finite_flag_is_exposed() -> None:
    report = activation_report(4, flags=pb.NON_FINITE_FLAG_INPUT)
    assert report.input_non_finite and report.origin == "input batch"


def test_report_ignores_activation_columns_without_a_schema_and_mismatched_lengths() -> None:
    msg = pb.StepReport(step=3, grad_sum_squares=1.0)
    msg.activations.CopyFrom(pb.ActivationStats(mean=f32([1.0, 2.0]), std=f32([1.0] * len(MODULES))))
    assert build_report("run", 0, msg, (), 0.0, None).activations == {}
    report = build_report("run", 0, msg, (), 0.0, schema())
    assert set(report.activations) == {"std"}  # `mean` has 2 values for 5 modules: left out, not misread


def test_report_keeps_activations_of_a_loss_scaler_skipped_step() -> None:
    """A skipped step's gradients are scaled; its forward statistics are not."""
    report = activation_report(5, acts={"mean": [0.0] * len(MODULES)}, skipped_step=True)
    assert report.skipped and math.isnan(report.grad_norm)
    assert "mean" in report.activations


@pytest.mark.parametrize("types", [(), ("Linear",)])
def test_report_module_types_missing_or_short_become_blank(types: tuple[str, ...]) -> None:
    report = activation_report(6, acts={"mean": [0.0] * len(MODULES)}, modules=schema(MODULES, types))
    assert report.module_types == ("",) * len(MODULES)
