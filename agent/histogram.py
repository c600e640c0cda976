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
over at most SAMPLE_ELEMENTS values, on full-statistics steps only. `log2_histograms` counts k same-size rows
(a stack of tensors or samples, stacks.py) in the same few launches: row r's fields are counted at r·256 + field.
"""

from __future__ import annotations

import torch

from gradwatch.agent.sampling import block_sample
from gradwatch.v1.vocabulary import LOG2_HISTOGRAM_BINS, LOG2_HISTOGRAM_OFFSET

__all__ = ["LOG2_BINS", "LOG2_OFFSET", "SAMPLE_ELEMENTS", "log2_histogram", "log2_histograms"]

LOG2_BINS = LOG2_HISTOGRAM_BINS
LOG2_OFFSET = LOG2_HISTOGRAM_OFFSET
SAMPLE_ELEMENTS = 65536
_F32_EXPONENT_BIAS = 126  # float32: |x| in [2^(E-127), 2^(E-126)) for biased exponent field E (normal numbers)


def log2_histogram(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """LOG2_BINS float32 counts for floating tensor `t`, on `device` (see the module docstring)."""
    with torch.no_grad():
        flat, scale = block_sample(t.detach(), SAMPLE_ELEMENTS)
        return log2_histograms(flat.unsqueeze(0), scale, device)[0]


def log2_histograms(rows: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """(k, LOG2_BINS) float32 counts, one row per row of the 2-D floating tensor `rows` (k tensors' values or
    samples of one size), each multiplied by `scale` (numel / sample size), on `device`: the same counts as k
    single histograms, in a few launches whatever k (the fields of row r are counted at r·256 + field)."""
    with torch.no_grad():
        if rows.dtype != torch.float32:
            rows = rows.to(torch.float32)
        k, n = rows.shape
        field = rows.view(torch.int32).bitwise_right_shift(23).bitwise_and_(0xFF)  # biased exponent
        if k > 1:
            field = field.add_(_row_offsets(k, rows.device))
        field = field.view(-1)
        if rows.device.type == "cpu":
            fields = torch.bincount(field, minlength=_FIELDS * k).to(torch.float32)
        else:  # CUDA's bincount reads the maximum on the host: a sync
            fields = torch.zeros(_FIELDS * k, dtype=torch.float32, device=rows.device)
            fields = fields.index_add_(0, field, torch.ones_like(field, dtype=torch.float32))
        fields = fields.view(k, _FIELDS)
        # Fields up to _LOW fall in bin 0 and from _HIGH in the last bin; 255 (NaN/Inf) in none. Slices and sums,
        # not a matrix product: autocast would run that in half precision (counts above 65504 overflow).
        counts = torch.cat([fields[:, : _LOW + 1].sum(1, keepdim=True), fields[:, _LOW + 1 : _HIGH],
                            fields[:, _HIGH : _FIELDS - 1].sum(1, keepdim=True)], dim=1)  # fmt: skip
        counts[:, 0] -= n - torch.count_nonzero(rows, dim=1)  # zeros share the exponent field of subnormals
        counts = counts if scale == 1.0 else counts.mul_(scale)
        return counts if counts.device == device else counts.to(device, non_blocking=True)


def _row_offsets(k: int, device: torch.device) -> torch.Tensor:
    """(k, 1) int32 offsets r·256 (cached per count and device: made on the device once, no transfer)."""
    key = (k, device)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if len(_OFFSETS) >= _MAX_CACHED:
            _OFFSETS.clear()
        offsets = _OFFSETS[key] = (torch.arange(k, dtype=torch.int32, device=device) * _FIELDS).view(k, 1)
    return offsets


_MAX_CACHED = 256
_OFFSETS: dict[tuple[int, torch.device], torch.Tensor] = {}
_FIELDS = 256
_LOW = _F32_EXPONENT_BIAS - LOG2_OFFSET  # the largest exponent field of bin 0
_HIGH = _LOW + LOG2_BINS - 1  # the smallest exponent field of the last bin
