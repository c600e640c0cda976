"""Generated parameters with gradients for the clip tests (torch's clip and accelerate's): shapes including
empty ones, four float dtypes, missing gradients, one NaN."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import nn

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Per parameter: its shape, dtype, and whether it has no gradient.
PARAM_SPECS = st.lists(
    st.tuples(st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple), st.sampled_from(DTYPES), st.booleans()),
    min_size=0,
    max_size=6,
)
MAX_NORMS = st.sampled_from((0.0, 1e-3, 0.5, 1.0, 1e6, math.inf))
SCALES = st.sampled_from((1e-3, 1.0, 1e3))
POISON = st.none() | st.integers(0, 5)


def make_params(seed: int, specs: list[tuple[tuple[int, ...], torch.dtype, bool]], scale: float,
                poison: int | None) -> list[nn.Parameter]:  # fmt: skip
    """Parameters (and gradients times `scale`) from a seed; the gradient of parameter `poison` starts with NaN."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, (shape, dtype, absent) in enumerate(specs):
        p = nn.Parameter(torch.randn(shape, generator=generator).to(dtype))
        if not absent:
            p.grad = (torch.randn(shape, generator=generator) * scale).to(dtype)
            if poison == i and p.grad.numel():
                p.grad.view(-1)[0] = float("nan")
        params.append(p)
    return params
