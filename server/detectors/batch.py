"""What a cross-rank detector sees of a batch of compact reports (relayed columns), and how it is fed.

A cross-rank detector that can judge a batch of reports with array operations has two more methods besides
`observe`: `plan_batch(batch, ranks)`, side-effect free, returns an opaque plan or None when the batch must be
fed one report at a time (the ingest path then does so for every detector, so none sees half a batch); and
`observe_batch(batch, ranks, plan)` returns `(index, finding)` pairs, `index` being the report whose one-by-one
`observe` would have produced the finding. Feeding a batch must yield the findings one-by-one feeding yields
(tests/test_relay_columns_equivalence.py). The batch path runs only for reports that are all finite (no
non-finite flag, loss or gradient norm) and carry no per-layer or per-module columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ReportBatch"]


@dataclass(frozen=True)
class ReportBatch:
    """Reports of one run, in arrival order: element i of every array is report i."""

    rank: np.ndarray  # int64
    step: np.ndarray  # int64
    #: The loss where the report had one, else NaN (`has_loss` False).
    loss: np.ndarray
    has_loss: np.ndarray
    step_duration_s: np.ndarray
    param_checksum: np.ndarray  # uint64, where has_checksum
    has_checksum: np.ndarray
    #: Server time the batch was received (every report of it).
    received_at: float

    def __len__(self) -> int:
        return int(self.rank.size)
