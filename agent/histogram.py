"""Fixed-bin log2-magnitude histograms, computed on the device without a host sync.

Bin b (0 ≤ b < LOG2_BINS) counts the finite, non-zero elements with |x| in [2^(b−LOG2_OFFSET−1),
2^(b−LOG2_OFFSET)): from 2^-25 to 2^6 with the defaults. Bin 0 also holds every smaller magnitude and the
last bin every larger one. Zeros and NaN/Inf are not counted (the zero fraction and the non-finite count
report them). Tensors of more than SAMPLE_ELEMENTS elements are histogrammed on a fixed strided sample of
about that many elements, counts multiplied by the stride, so the cost per tensor is bounded.

How: the exponent is read from the float32 bit pattern (integer shifts, no transcendental function: about
10× cheaper than frexp or log2 on a CPU), mapped to its bin by a 256-entry table (NaN/Inf to a discard bin),
then counted with a fixed-size bincount on the CPU and a scatter-add elsewhere (CUDA's bincount reads the
maximum on the host: a sync); zeros, which share bin 0's exponent field with subnormals, are subtracted.
Other dtypes are converted to float32 first (float64 magnitudes beyond float32's range then count as Inf,
i.e. not at all). Cost: a few integer passes over at most SAMPLE_ELEMENTS values, on full-statistics steps
only.
"""

from __future__ import annotations

import torch

__all__ = ["LOG2_BINS", "LOG2_OFFSET", "SAMPLE_ELEMENTS", "log2_histogram"]

LOG2_BINS = 32
LOG2_OFFSET = 24
SAMPLE_ELEMENTS = 65536
_F32_EXPONENT_BIAS = 126  # float32: |x| in [2^(E-127), 2^(E-126)) for biased exponent field E (normal numbers)


def log2_histogram(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """LOG2_BINS float32 counts for floating tensor `t`, on `device` (see the module docstring)."""
    with torch.no_grad():
        flat = t.detach().reshape(-1)
        stride = max(1, -(-flat.numel() // SAMPLE_ELEMENTS))
        if stride > 1:
            flat = flat[::stride]
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        field = flat.view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)  # biased exponent
        bins = _bin_of_field(flat.device)[field.to(torch.long)]  # NaN/Inf -> LOG2_BINS (dropped below)
        if flat.device.type == "cpu":
            counts = torch.bincount(bins, minlength=LOG2_BINS + 1)[:LOG2_BINS].to(torch.float32)
        else:  # CUDA's bincount reads the maximum on the host: a sync
            counts = torch.zeros(LOG2_BINS + 1, dtype=torch.float32, device=flat.device)
            counts = counts.index_add_(0, bins, torch.ones_like(flat))[:LOG2_BINS]
        counts[0] -= (flat == 0).sum()  # zeros share the exponent field of subnormals (bin 0): not counted
        counts = counts if stride == 1 else counts.mul_(stride)
        return counts if counts.device == device else counts.to(device, non_blocking=True)


_BIN_TABLES: dict[torch.device, torch.Tensor] = {}


def _bin_of_field(device: torch.device) -> torch.Tensor:
    """The bin of each biased float32 exponent field (0..255): 255 (NaN/Inf) maps to LOG2_BINS, not a bin."""
    table = _BIN_TABLES.get(device)
    if table is None:
        fields = torch.arange(256, device=device)
        table = (fields - (_F32_EXPONENT_BIAS - LOG2_OFFSET)).clamp_(0, LOG2_BINS - 1)
        table[255] = LOG2_BINS
        _BIN_TABLES[device] = table
    return table
