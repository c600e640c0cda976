"""The wire words both sides import (gradwatch.v1.vocabulary) agree with the contract and with what each side does."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.server.detectors.layerwise import ACTIVATION_TYPES as SERVER_ACTIVATION_TYPES
from gradwatch.server.recorder import ACTIVATION_COLUMNS as RECORDED_ACTIVATION_COLUMNS
from gradwatch.server.recorder import LAYER_COLUMNS as RECORDED_LAYER_COLUMNS
from gradwatch.server.report import COLUMN_WIDTHS
from gradwatch.v1 import gradwatch_pb2 as pb
from gradwatch.v1.vocabulary import (
    ACTIVATION_MODULE_TYPES,
    ACTIVATION_STATISTICS,
    LOG2_HISTOGRAM_BINS,
    LOG2_HISTOGRAM_OFFSET,
    first_non_finite,
)


def test_vocabulary_activation_statistics_are_the_contracts_columns_without_the_histogram() -> None:
    fields = [f.name for f in pb.ActivationStats.DESCRIPTOR.fields]
    assert sorted(ACTIVATION_STATISTICS) == sorted(f for f in fields if f != "log2_histogram")
    assert len(set(ACTIVATION_STATISTICS)) == len(ACTIVATION_STATISTICS)


def test_vocabulary_recorded_columns_are_contract_columns() -> None:
    assert set(RECORDED_ACTIVATION_COLUMNS) <= set(ACTIVATION_STATISTICS)
    assert set(RECORDED_LAYER_COLUMNS) <= {f.name for f in pb.LayerStats.DESCRIPTOR.fields}


def test_vocabulary_histogram_columns_have_the_bins_of_the_vocabulary() -> None:
    histograms = [f.name for m in (pb.LayerStats, pb.ActivationStats) for f in m.DESCRIPTOR.fields
                  if f.name.endswith("log2_histogram")]  # fmt: skip
    assert histograms and {name: COLUMN_WIDTHS.get(name) for name in histograms} == dict.fromkeys(
        histograms, LOG2_HISTOGRAM_BINS
    )


def test_vocabulary_activation_types_are_one_list_for_agent_and_server() -> None:
    torch = pytest.importorskip("torch")
    from gradwatch.agent.activations import ACTIVATION_TYPES, STATS_PER_MODULE

    assert SERVER_ACTIVATION_TYPES == ACTIVATION_MODULE_TYPES
    assert tuple(t.__name__ for t in ACTIVATION_TYPES) == ACTIVATION_MODULE_TYPES
    assert all(issubclass(t, torch.nn.Module) for t in ACTIVATION_TYPES)
    assert len(ACTIVATION_STATISTICS) == STATS_PER_MODULE


@given(st.integers(0, LOG2_HISTOGRAM_BINS - 1), st.floats(1.0, 2.0, exclude_max=True, width=32), st.booleans())
def test_vocabulary_histogram_bin_b_holds_magnitudes_below_two_to_the_b_minus_offset(
    b: int, mantissa: float, negative: bool
) -> None:
    torch = pytest.importorskip("torch")
    from gradwatch.agent.histogram import log2_histogram

    value = mantissa * 2.0 ** (b - LOG2_HISTOGRAM_OFFSET - 1) * (-1 if negative else 1)
    counts = log2_histogram(torch.tensor([value, 0.0], dtype=torch.float32), torch.device("cpu"))
    assert counts.shape == (LOG2_HISTOGRAM_BINS,)
    assert counts.tolist() == [1.0 if i == b else 0.0 for i in range(LOG2_HISTOGRAM_BINS)]


_VALUES = st.sampled_from([0.0, 1.0, 3.5, np.nan, np.inf, -np.inf])


@given(st.data())
def test_first_non_finite_is_the_first_layer_with_a_bad_norm_or_count(data: st.DataObject) -> None:
    norms = data.draw(hnp.arrays(np.float32, st.integers(0, 12), elements=_VALUES))
    counts = data.draw(st.none() | hnp.arrays(np.float32, len(norms), elements=_VALUES))
    bad = [not np.isfinite(n) or (counts is not None and counts[i] != 0) for i, n in enumerate(norms)]
    assert first_non_finite(norms, counts) == (bad.index(True) if any(bad) else None)
    assert first_non_finite(None, counts) == (None if counts is None else next(
        (i for i, c in enumerate(counts) if c != 0), None))
