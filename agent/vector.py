"""Where each value sits in the one float32 vector a report moves from device to host.

The training thread assembles the vector (stats.py, monitor.py); the sender thread reads it (fold.py,
wire.py). Both sides use this layout so they cannot disagree. With P = unique parameters (in the layout's
order) and C = 1 column on ordinary steps or len(PARAM_COLUMNS) = 7 on full-statistics steps:

    [0]                      loss (0 when the loss is not a tensor)
    grad part:   C × P       per-parameter gradient columns, column after column (PARAM_COLUMNS order)
    weight part: C × P       per-parameter weight columns, same order
    tail                     one value per tensor learning rate
    scaler (when watched)    found-inf sum (> 0: the loss scaler skipped the step), the scale used
    updates (full + cadence) UPDATE_COLUMNS × P, when the optimizer stepped with a weight sample taken
    checksum (full steps)    CHECKSUM_PIECES 16-bit pieces (exact in float32) of the int64 parameter checksum
    histograms (full steps)  P × LOG2_BINS gradient log2-magnitude counts (histogram.py)

The device reduces every element of every tensor (the O(elements) work); folding the P per-parameter values
into per-layer columns is O(P) bookkeeping the sender thread does on the host (fold.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.agent.histogram import LOG2_BINS

__all__ = ["CHECKSUM_PIECES", "PARAM_COLUMNS", "UPDATE_COLUMNS", "VectorLayout"]

# Per-parameter columns, in order. "norm" is present on every step, the others on full steps only.
#   norm: L2 norm; max_abs: max |x|; sum: sum of elements; non_finite: NaN/Inf count; nonzero: count of x != 0;
#   min, max: smallest and largest element.
PARAM_COLUMNS: tuple[str, ...] = ("norm", "max_abs", "sum", "non_finite", "nonzero", "min", "max")
# Per-parameter update columns (full steps and the update cadence's, with an optimizer): |Δw|² and |w|² (before
# the step) over the parameter's sample, each times elements / sampled elements (schema-independent extrapolation
# to the whole tensor; see stats.py).
UPDATE_COLUMNS: tuple[str, ...] = ("update_squares", "weight_squares")
# The 64-bit parameter checksum travels as this many 16-bit pieces, least significant first (stats.py).
CHECKSUM_PIECES = 4


@dataclass(frozen=True)
class VectorLayout:
    """Offsets into the report vector for `num_params` parameters."""

    num_params: int
    full: bool
    num_tensor_lrs: int = 0
    scaler: bool = False
    updates: bool = False
    histograms: bool = False
    checksum: bool = False

    LOSS = 0

    @property
    def num_columns(self) -> int:
        return len(PARAM_COLUMNS) if self.full else 1

    @property
    def part_length(self) -> int:
        return self.num_columns * self.num_params

    @property
    def length(self) -> int:
        return self.histogram_start + (LOG2_BINS * self.num_params if self.histograms else 0)

    @property
    def checksum_start(self) -> int:
        return self.update_start + (len(UPDATE_COLUMNS) * self.num_params if self.updates else 0)

    @property
    def checksum_pieces(self) -> slice:
        """The CHECKSUM_PIECES pieces of the parameter checksum (only when `checksum`)."""
        return slice(self.checksum_start, self.checksum_start + CHECKSUM_PIECES)

    @property
    def histogram_start(self) -> int:
        return self.checksum_start + (CHECKSUM_PIECES if self.checksum else 0)

    @property
    def grad_histograms(self) -> slice:
        """P × LOG2_BINS gradient histogram counts, parameter-major (only when `histograms`)."""
        return slice(self.histogram_start, self.histogram_start + LOG2_BINS * self.num_params)

    @property
    def update_start(self) -> int:
        return 1 + 2 * self.part_length + self.num_tensor_lrs + (2 if self.scaler else 0)

    def update_column(self, name: str) -> slice:
        """The P values of update column `name` (only when `updates`)."""
        start = self.update_start + UPDATE_COLUMNS.index(name) * self.num_params
        return slice(start, start + self.num_params)

    def column(self, source: str, name: str) -> slice:
        """The P values of column `name` for `source` ("grad" or "weight")."""
        index = PARAM_COLUMNS.index(name)
        if index >= self.num_columns:
            raise KeyError(f"column {name!r} exists on full-statistics reports only")
        start = 1 + (0 if source == "grad" else self.part_length) + index * self.num_params
        return slice(start, start + self.num_params)

    @property
    def tensor_lrs(self) -> slice:
        start = 1 + 2 * self.part_length
        return slice(start, start + self.num_tensor_lrs)

    @property
    def scaler_skipped(self) -> int:
        """Index of the found-inf sum (only when `scaler`)."""
        return 1 + 2 * self.part_length + self.num_tensor_lrs

    @property
    def scaler_scale(self) -> int:
        """Index of the loss scale (only when `scaler`)."""
        return self.scaler_skipped + 1
