"""Fold per-parameter statistics into per-layer columns, on the host (sender thread).

Contract: `LayerFold.fold(values, layout)` takes a report vector that has reached the host (a numpy float32
array laid out as vector.py says) and returns a `Folded`: two sums over the whole model,

    grad_sum_squares          sum over *unique* parameters of norm², so a tied weight counts once
    grad_global_share         the same sum with each parameter weighted by 1 / its replication (schema.py):
                              summed over the ranks of a step, exactly the global sum of squares

and the per-layer columns in schema order, float64:

    {grad,weight}_norm        sqrt of the layer's sum of squares
    and on full steps, for both sources:
    _max_abs                  max over the layer's parameters (NaN if any is NaN)
    _mean                     sum / element count
    _non_finite               NaN/Inf count
    _zero_fraction            (elements − non-zero elements) / element count (sampled on the CPU for large
                              tensors, see stats.ZERO_SAMPLE_ELEMENTS)
    _min, _max                smallest and largest element of the layer's parameters
    update_ratio              |Δw| / |w before the step| of the optimizer step (full steps and the update cadence's,
                              with an optimizer; see stats.py, update_cadence.py)
    grad_log2_histogram       (layers × LOG2_BINS) gradient log2-magnitude counts (histogram.py)

NaN and Inf propagate through every sum and max, so a layer is non-finite exactly when one of its
parameters is. A tied parameter belongs to every layer that owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwatch.agent.histogram import LOG2_BINS
from gradwatch.agent.schema import ModelLayout
from gradwatch.agent.vector import VectorLayout

__all__ = ["Folded", "LayerFold"]


@dataclass(frozen=True, slots=True)
class Folded:
    """One report folded into layers (see the module docstring)."""

    grad_sum_squares: float
    grad_global_share: float
    columns: dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class LayerFold:
    """Parameter → layer membership of one ModelLayout, as numpy index arrays."""

    num_layers: int
    member_params: np.ndarray  # K (layer, parameter) pairs: parameter index ...
    member_layers: np.ndarray  # ... and layer index
    numel_L: np.ndarray  # elements per layer (local shard), at least 1 to keep 0/0 away
    share_P: np.ndarray  # 1 / replication per unique parameter

    @classmethod
    def of(cls, layout: ModelLayout) -> LayerFold:
        member_params = np.asarray(layout.member_params, dtype=np.intp)
        member_layers = np.asarray(layout.member_layers, dtype=np.intp)
        local = np.asarray(layout.local_numels, dtype=np.float64)
        numel = np.bincount(member_layers, weights=local[member_params], minlength=layout.num_layers)
        replication = np.asarray(layout.replication or (1,) * len(layout.params), dtype=np.float64)
        return cls(layout.num_layers, member_params, member_layers, np.maximum(numel, 1.0), 1.0 / replication)

    def fold(self, values: np.ndarray, layout: VectorLayout) -> Folded:
        """The sums and per-layer columns of one report (see the module docstring)."""
        out: dict[str, np.ndarray] = {}
        sum_squares = global_share = 0.0
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf are data here, not accidents
            for source in ("grad", "weight"):
                norm = values[layout.column(source, "norm")].astype(np.float64)
                squares = norm * norm
                if source == "grad":
                    sum_squares = float(squares.sum())
                    global_share = float((squares * self.share_P).sum())
                out[f"{source}_norm"] = np.sqrt(self._sum(squares))
                if not layout.full:
                    continue
                column = {name: values[layout.column(source, name)].astype(np.float64) for name in
                          ("max_abs", "sum", "non_finite", "nonzero", "min", "max")}  # fmt: skip
                out[f"{source}_min"] = self._extreme(column["min"], np.minimum, np.inf)
                out[f"{source}_max"] = self._extreme(column["max"], np.maximum, -np.inf)
                out[f"{source}_max_abs"] = self._max(column["max_abs"])
                out[f"{source}_mean"] = self._sum(column["sum"]) / self.numel_L
                out[f"{source}_non_finite"] = self._sum(column["non_finite"])
                zeros = (self.numel_L - self._sum(column["nonzero"])) / self.numel_L
                out[f"{source}_zero_fraction"] = np.clip(zeros, 0.0, 1.0)  # sampled counts (stats.py) may overshoot
            if layout.histograms:
                per_param = values[layout.grad_histograms].astype(np.float64).reshape(-1, LOG2_BINS)
                histogram = np.zeros((self.num_layers, LOG2_BINS))
                np.add.at(histogram, self.member_layers, per_param[self.member_params])
                out["grad_log2_histogram"] = histogram
            if layout.updates:
                update = self._sum(values[layout.update_column("update_squares")].astype(np.float64))
                weight = self._sum(values[layout.update_column("weight_squares")].astype(np.float64))
                with np.errstate(divide="ignore", invalid="ignore"):  # a layer at zero: no scale, no ratio
                    out["update_ratio"] = np.sqrt(update) / np.sqrt(weight)
        return Folded(sum_squares, global_share, out)

    def _extreme(self, per_param: np.ndarray, op: np.ufunc, start: float) -> np.ndarray:
        out = np.full(self.num_layers, start)
        op.at(out, self.member_layers, per_param[self.member_params])
        return out

    def _sum(self, per_param: np.ndarray) -> np.ndarray:
        return np.bincount(self.member_layers, weights=per_param[self.member_params], minlength=self.num_layers)

    def _max(self, per_param: np.ndarray) -> np.ndarray:
        out = np.zeros(self.num_layers)  # every value here is >= 0
        np.maximum.at(out, self.member_layers, per_param[self.member_params])
        return out
