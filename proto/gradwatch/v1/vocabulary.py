"""Words of the wire contract that gradwatch.proto cannot state in its types, defined once for both sides.

Hand-written, beside the generated modules (scripts/gen_protos.py writes only those and leaves this file
alone); the agent and the server import it, so neither restates these. Torch-free: the server imports it.

* `LOG2_HISTOGRAM_BINS` float32 counts per layer or module in every `*log2_histogram` column; bin b counts
  the finite, non-zero values with |x| in [2^(b−LOG2_HISTOGRAM_OFFSET−1), 2^(b−LOG2_HISTOGRAM_OFFSET)),
  bin 0 also every smaller magnitude, the last bin every larger one.
* `ACTIVATION_MODULE_TYPES`: the `torch.nn` class names the agent's forward hooks watch as activation
  functions (the server's activation detectors judge the modules of these types).
* `ACTIVATION_STATISTICS`: the per-module `ActivationStats` columns in the order the agent computes them
  (each module's statistics, then its histogram).
* `first_non_finite(norms, counts)`: which layer is the first non-finite one, for the agent's
  `first_non_finite_layer` and the server's fallback from the columns alike.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ACTIVATION_MODULE_TYPES",
    "ACTIVATION_STATISTICS",
    "LOG2_HISTOGRAM_BINS",
    "LOG2_HISTOGRAM_OFFSET",
    "first_non_finite",
]

LOG2_HISTOGRAM_BINS = 32
LOG2_HISTOGRAM_OFFSET = 24

ACTIVATION_MODULE_TYPES: tuple[str, ...] = (
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish",
    "Sigmoid", "Tanh", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "LogSigmoid",
)  # fmt: skip

ACTIVATION_STATISTICS: tuple[str, ...] = (
    "mean", "std", "max_abs", "non_finite", "zero_fraction", "dead_fraction", "saturated_fraction", "unit_spread",
)  # fmt: skip


def first_non_finite(norms: np.ndarray | None, counts: np.ndarray | None = None) -> int | None:
    """Index of the first layer whose norm is non-finite or whose non-finite count is not 0 (a NaN count is
    itself a sign of trouble), or None; None when neither column is given."""
    bad: np.ndarray | None = None
    if counts is not None:
        bad = counts != 0
    if norms is not None:
        bad = ~np.isfinite(norms) if bad is None else bad | ~np.isfinite(norms)
    if bad is None:
        return None
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None
