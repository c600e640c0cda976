"""The rank table's per-rank timing medians (read by straggler, stalled, collective_hang and the API on every tick)
equal np.nanmedian of the same rows bit for bit, and a cached median is never served after a report changed it
(property-based: random report streams, single and batched)."""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwatch.server.collectives import BETWEEN_WINDOW, CollectiveBoard
from gradwatch.server.ranktable import TIMING_WINDOW, RankTable

_SECONDS = st.one_of(
    st.sampled_from([0.0, -1.0, 0.5, 0.25, 1e-9, float("nan"), float("inf")]), st.floats(0.0, 10.0, width=32)
)
_REPORT = st.tuples(st.integers(0, 6), _SECONDS, st.one_of(st.none(), _SECONDS), st.booleans())


def _nanmedian_rows(rows: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(rows, axis=1)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_REPORT, max_size=40), min_size=1, max_size=6), st.integers(1, 7))
def test_step_and_pre_forward_medians_equal_numpy_after_every_batch(batches: list, world: int) -> None:
    table = RankTable(world)
    for batch in batches:
        singles = [r for r in batch if not r[3]]
        many = [r for r in batch if r[3]]
        for rank, duration, pre_forward, _ in singles:
            table.report(rank, 1, duration, pre_forward, 0.0)
        if many:
            ranks = np.array([r[0] for r in many], dtype=np.int64)
            durations = np.array([r[1] for r in many])
            pre = np.array([np.nan if r[2] is None else r[2] for r in many])
            table.report_many(ranks, np.ones_like(ranks), durations, pre, 0.0)
        for _ in range(2):  # the second read is the cached one
            np.testing.assert_array_equal(table.step_time(), _nanmedian_rows(table._durations))
            np.testing.assert_array_equal(table.pre_forward_time(), _nanmedian_rows(table._pre_forward))
        assert table.step_time().shape == (table.size,)
    assert table._durations.shape[1] == TIMING_WINDOW


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), _SECONDS), max_size=60), st.integers(1, 4))
def test_between_time_equals_numpy(reports: list, chunks: int) -> None:
    board = CollectiveBoard()
    board.fit(3)
    for part in np.array_split(np.arange(len(reports)), chunks):
        if part.size:
            ranks = np.array([reports[i][0] for i in part], dtype=np.int64)
            board.between_many(ranks, np.array([reports[i][1] for i in part]))
        rows = np.where(np.arange(BETWEEN_WINDOW) < board._between_count[:, None], board._between, np.nan)
        np.testing.assert_array_equal(board.between_time(), _nanmedian_rows(rows))


def test_a_copy_keeps_its_own_medians() -> None:
    table = RankTable(2)
    table.report(0, 1, 1.0, None, 0.0)
    clone = table.copy()
    assert clone.step_time()[0] == 1.0
    table.report(0, 2, 3.0, None, 0.0)
    assert table.step_time()[0] == 2.0 and clone.step_time()[0] == 1.0
