"""Fixed-bin log2-magnitude histograms, computed on the device without a host sync.

Bin b (0 ≤ b < LOG2_BINS) counts the finite, non-zero elements with |x| in [2^(b−LOG2_OFFSET−1),
2^(b−LOG2_OFFSET)): from 2^-25 to 2^6 with the defaults. Bin 0 also holds every smaller magnitude and the
last bin every larger one. Zeros and NaN/Inf are not counted (the zero fraction and the non-finite count
report them). Tensors of more than SAMPLE_ELEMENTS elements are histogrammed on a fixed block sample of about
that many elements (sampling.py), counts multiplied by numel / sample size, so the cost per tensor is bounded.

How: the exponent field is read from the float32 bit pattern (integer shifts, no transcendental function:
about 10× cheaper than frexp or log2 on a CPU) and counted into its 256 possible values (a bincount of int32
on the CPU, a scatter-add elsewhere: CUDA's bincount reads the maximum on the host, a sync); two sums and a
slice then fold the 256 counts into the LOG2_BINS bins (the field of NaN/Inf, 255, into none); zeros, which
share bin 0's exponent field with subnormals, are subtracted. Other dtypes are converted to float32 first
(float64 magnitudes beyond float32's range then count as Inf, i.e. not at all). Cost: a few integer passes
over at most SAMPLE_ELEMENTS values, on full-statistics steps only.
"""

from __future__ import annotations

import torch

from gradwatch.agent.sampling import block_sample
from gradwatch.v1.vocabulary import LOG2_HISTOGRAM_BINS, LOG2_HISTOGRAM_OFFSET

__all__ = ["LOG2_BINS", "LOG2_OFFSET", "SAMPLE_ELEMENTS", "log2_histogram"]

LOG2_BINS = LOG2_HISTOGRAM_BINS
LOG2_OFFSET = LOG2_HISTOGRAM_OFFSET
SAMPLE_ELEMENTS = 65536
_F32_EXPONENT_BIAS = 126  # float32: |x| in [2^(E-127), 2^(E-126)) for biased exponent field E (normal numbers)


def log2_histogram(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """LOG2_BINS float32 counts for floating tensor `t`, on `device` (see the module docstring)."""
    with torch.no_grad():
        flat, scale = block_sample(t.detach(), SAMPLE_ELEMENTS)
        if flat.dtype != torch.float32:
            flat = flat.to(torch.float32)
        field = flat.view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)  # biased exponent
        if flat.device.type == "cpu":
            fields = torch.bincount(field, minlength=_FIELDS).to(torch.float32)
        else:  # CUDA's bincount reads the maximum on the host: a sync
            fields = torch.zeros(_FIELDS, dtype=torch.float32, device=flat.device)
            fields = fields.index_add_(0, field, torch.ones_like(flat))
        # Fields up to _LOW fall in bin 0 and from _HIGH in the last bin; 255 (NaN/Inf) in none. Slices and sums,
        # not a matrix product: autocast would run that in half precision (counts above 65504 overflow).
        counts = torch.cat([fields[: _LOW + 1].sum(0, keepdim=True), fields[_LOW + 1 : _HIGH],
                            fields[_HIGH : _FIELDS - 1].sum(0, keepdim=True)])  # fmt: skip
        counts[0] -= flat.numel() - torch.count_nonzero(flat)  # zeros share the exponent field of subnormals
        counts = counts if scale == 1.0 else counts.mul_(scale)
        return counts if counts.device == device else counts.to(device, non_blocking=True)


_FIELDS = 256
_LOW = _F32_EXPONENT_BIAS - LOG2_OFFSET  # the largest exponent field of bin 0
_HIGH = _LOW + LOG2_BINS - 1  # the smallest exponent field of the last bin
