"""The detectors' fast medians equal numpy's bit for bit, for any window (property-based)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gradwatch.server.detectors import robust
from gradwatch.server.detectors.robust import median, median_rows, median_sigma, nanmedian_columns, peer_medians

_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)
_DTYPES = st.sampled_from([np.float64, np.float32])


@settings(max_examples=400, deadline=None)
@given(hnp.arrays(_DTYPES, st.integers(1, 300), elements=_FLOATS.filter(lambda v: abs(v) < 1e30 or v != v)))
def test_median_equals_numpy(values: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = float(np.median(values))
    got = median(values)
    assert (np.isnan(expected) and np.isnan(got)) or got == expected
    values_before = values.copy()
    median_sigma(values)
    np.testing.assert_array_equal(values, values_before)  # the window is not reordered


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.float64, st.tuples(st.sampled_from([1, 2, 5, 40, 599, 600, 601]), st.integers(1, 8)), elements=_FLOATS
    )
)
def test_median_rows_and_nanmedian_columns_equal_numpy(matrix: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows, columns = np.median(matrix, axis=1), np.nanmedian(matrix, axis=0)
    np.testing.assert_array_equal(median_rows(matrix), rows)
    np.testing.assert_array_equal(nanmedian_columns(matrix), columns)


_NO_NAN = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 1e308]), st.floats(allow_nan=False))


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 40)), elements=_NO_NAN),
    st.sampled_from([None, "some", "column"]),
)
def test_nanmedian_columns_equals_numpy_with_and_without_missing_values(
    matrix: np.ndarray, missing: str | None
) -> None:
    """Windows with no NaN (one pair of middle rows for every column), with some, and with an empty column."""
    if missing == "some":
        matrix[::3, ::2] = np.nan
    elif missing == "column":
        matrix[:, -1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmedian(matrix, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and quietly, as numpy is under its own filter above
        got = nanmedian_columns(matrix)
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, robust.PEER_MEDIANS_PLAIN), elements=st.one_of(_NO_NAN, _FLOATS)))
def test_peer_medians_of_a_few_values_in_plain_python_equal_the_numpy_selection(values: np.ndarray) -> None:
    got = peer_medians(values)
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(robust, "PEER_MEDIANS_PLAIN", 0)
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in numpy's mean of two middle values
        expected = peer_medians(values)
    assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes()  # zeros' signs included
