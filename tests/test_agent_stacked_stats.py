"""Full-statistics parameter columns, gradient histograms and the checksum, computed over same-shape stacks
(agent/stacks.py), are exactly what a plain per-tensor torch computation gives, over generated models: random
depth, widths and dtypes (float32, float64, bfloat16), missing gradients, NaN/Inf, frozen, shared, scalar and
non-contiguous parameters, tensors on both sides of the stack and sample bounds, one and two threads."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gradwatch.agent import stacks  # noqa: E402
from gradwatch.agent.histogram import LOG2_BINS, LOG2_OFFSET  # noqa: E402
from gradwatch.agent.sampling import block_sample  # noqa: E402
from gradwatch.agent.schema import build_layout  # noqa: E402
from gradwatch.agent.stacks import STACK_ELEMENTS  # noqa: E402
from gradwatch.agent.stats import ZERO_SAMPLE_ELEMENTS, StatsEngine  # noqa: E402
from gradwatch.agent.vector import CHECKSUM_PIECES, PARAM_COLUMNS  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# On CUDA: extremes, counts, histograms and the checksum are stacked there too (float sums are not: stacks.py).
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
# (rows, cols) of a layer's weight: small ones (stacked), one above the stack bound, one above the sample bound.
SHAPES = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.sampled_from([(181, 182), (300, 240)]),  # 32942 > STACK_ELEMENTS; 72000 > ZERO_SAMPLE_ELEMENTS
)


class Layer(nn.Module):
    """A module owning a weight (possibly non-contiguous) and maybe a bias and a 0-d scale."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, layout: str, bias: bool, scalar: bool) -> None:
        super().__init__()
        rows, cols = shape
        if layout == "transposed":  # dense, permuted: memory order differs from logical order
            weight = torch.randn(cols, rows, dtype=dtype).t()
        elif layout == "strided":  # not dense: every other column of a wider tensor
            weight = torch.randn(rows, 2 * cols, dtype=dtype)[:, ::2]
        else:
            weight = torch.randn(rows, cols, dtype=dtype)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.randn(cols, dtype=dtype)) if bias else None
        self.scale = nn.Parameter(torch.tensor(1.5, dtype=dtype)) if scalar else None


@st.composite
def models(draw: st.DrawFn) -> nn.Module:
    """A model of random depth and widths, dtypes per layer, with shared, frozen, missing-gradient, NaN/Inf,
    zero-heavy and extreme-magnitude parameters and gradients."""
    model = nn.Module()
    layers: list[Layer] = []
    for i in range(draw(st.integers(1, 8))):
        layout = draw(st.sampled_from(["plain", "plain", "plain", "transposed", "strided"]))
        scalar = draw(st.integers(0, 4)) == 0
        layer = Layer(draw(SHAPES), draw(st.sampled_from(DTYPES)), layout, draw(st.booleans()), scalar)
        if layers and draw(st.integers(0, 4)) == 0:  # share an earlier layer's weight (tied weights)
            layer.weight = layers[draw(st.integers(0, len(layers) - 1))].weight
        if draw(st.integers(0, 5)) == 0:
            layer.requires_grad_(False)  # frozen
        layers.append(layer)
        model.add_module(f"layer{i}", layer)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        _disturb(p.data, draw, generator)
        if p.requires_grad and draw(st.integers(0, 4)) != 0:  # else: a missing gradient
            grad = torch.empty_like(p)  # the parameter's strides, as autograd would give (dense ones)
            grad.copy_(torch.randn(p.shape, generator=generator).to(p.dtype))
            _disturb(grad, draw, generator)
            p.grad = grad
    return model


def _disturb(t: torch.Tensor, draw: st.DrawFn, generator: torch.Generator) -> None:
    """Scale `t` by a random power of two, zero a random share, and plant NaN/Inf/subnormal values."""
    t.mul_(2.0 ** draw(st.integers(-40, 40)))
    zeros = draw(st.sampled_from([0.0, 0.3, 1.0]))
    if zeros:
        t.masked_fill_(torch.rand(t.shape, generator=generator) < zeros, 0.0)
    flat = t.view(-1) if t.is_contiguous() else None
    for value in draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 1e-40, -0.0]), max_size=3)):
        index = int(torch.randint(t.numel(), (), generator=generator))
        if flat is not None:
            flat[index] = value
        else:
            t[tuple(int(i) for i in np.unravel_index(index, tuple(t.shape)))] = value


def _columns(t: torch.Tensor | None, device: torch.device) -> list[torch.Tensor]:
    """PARAM_COLUMNS of one tensor, one at a time, the plain way (None or non-floating: zeros). The norm is the
    multi-tensor norm of that tensor alone, as every step computes it."""
    if t is None or not t.is_floating_point():
        return [torch.zeros((), dtype=torch.float64, device=device)] * len(PARAM_COLUMNS)
    accumulate = torch.float64 if t.dtype == torch.float64 else torch.float32
    if t.numel() > ZERO_SAMPLE_ELEMENTS and t.device.type == "cpu":  # counted on a fixed block sample (sampling.py)
        sample, scale = block_sample(t, ZERO_SAMPLE_ELEMENTS)
        non_finite = (~torch.isfinite(sample)).sum() * scale
        non_finite = non_finite if bool(torch.isfinite(t).all()) else non_finite.clamp(min=1.0)
        nonzero = torch.count_nonzero(sample) * scale
    else:
        non_finite, nonzero = (~torch.isfinite(t)).sum(), torch.count_nonzero(t)
    values = [torch._foreach_norm([t], 2.0, dtype=accumulate)[0], t.abs().amax(), t.sum(dtype=accumulate), non_finite,
              nonzero, t.amin(), t.amax()]  # fmt: skip
    return [v.to(torch.float64) for v in values]


def _histogram(t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """LOG2_BINS counts of |x| in [2^(b-OFFSET-1), 2^(b-OFFSET)) by frexp (sampled above the bound, scaled)."""
    if t is None or not t.is_floating_point():
        return torch.zeros(LOG2_BINS, device=device)
    values, scale = block_sample(t, ZERO_SAMPLE_ELEMENTS) if t.numel() > ZERO_SAMPLE_ELEMENTS else (t.reshape(-1), 1.0)
    v = values.to(torch.float32)
    v = v[torch.isfinite(v) & (v != 0)]
    exponent = torch.frexp(v).exponent.to(torch.int64)  # |x| = m·2^e, m in [0.5, 1): |x| in [2^(e-1), 2^e)
    counts = torch.bincount((exponent + LOG2_OFFSET).clamp(0, LOG2_BINS - 1), minlength=LOG2_BINS).to(torch.float32)
    return counts if scale == 1.0 else counts.mul_(scale)


def _checksum(params: list[torch.Tensor]) -> list[float]:
    """The wrapping int64 sum of the bit patterns (8-byte words where a tensor's bytes are whole words), in
    16-bit pieces, computed on the host with numpy."""
    total = 0
    for p in params:
        t = p.detach().cpu().contiguous()
        if t.numel() == 0:
            continue
        bits = t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().reshape(-1)
        if t.element_size() != 8 and t.numel() * t.element_size() % 8 == 0:
            bits = bits.view(np.int64)
        total += int(bits.astype(np.int64).sum(dtype=np.int64))
    total %= 2**64
    return [float((total >> (16 * i)) & 0xFFFF) for i in range(CHECKSUM_PIECES)]


def _exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got.to(torch.float64), expected.to(torch.float64), rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    model=models(),
    threads=st.sampled_from([1, 2]),
    device=st.sampled_from(DEVICES),
    chunk=st.sampled_from([stacks.STACK_BYTES, 300]),  # 300 bytes: groups split into many stacks
    alike=st.booleans(),  # False: float sums of each tensor alone, as on an accelerator (stacks.rows_sum_alike)
)
def test_stacked_full_statistics_equal_the_per_tensor_computation(
    model: nn.Module, threads: int, device: str, chunk: int, alike: bool
) -> None:
    model.to(device)  # gradients move with their parameters
    engine = StatsEngine(build_layout(model))
    target = engine.layout.device
    params = engine.layout.params
    previous, bound, rule = torch.get_num_threads(), stacks.STACK_BYTES, stacks.rows_sum_alike
    torch.set_num_threads(threads)
    stacks.STACK_BYTES = chunk
    if not alike:
        stacks.rows_sum_alike = lambda device: False
    try:
        for source in ("grad", "weight"):
            got = torch.stack(engine.compute(source, full=True))
            tensors = [p.grad if source == "grad" else p.detach() for p in params]
            per_tensor = [_columns(t, target) for t in tensors]
            expected = torch.stack([per_tensor[i][c] for c in range(len(PARAM_COLUMNS)) for i in range(len(params))])
            _exact(got, expected, source)
        _exact(engine.grad_histograms(), torch.cat([_histogram(p.grad, target) for p in params]), "histograms")
        _exact(torch.stack(engine.checksum()), torch.tensor(_checksum(list(params)), device=target), "checksum")
    finally:
        torch.set_num_threads(previous)
        stacks.STACK_BYTES, stacks.rows_sum_alike = bound, rule


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _full_step_ops(layers: int) -> int:
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    engine = StatsEngine(build_layout(model))
    for _ in range(2):  # the second time: without the one-time constants (cached row offsets, shifts)
        with _Count() as count:
            engine.compute("grad", full=True)
            engine.compute("weight", full=True)
            engine.grad_histograms()
            engine.checksum()
    return count.ops


def test_full_statistics_launch_a_number_of_operations_that_does_not_grow_with_same_shape_parameters() -> None:
    # Two shapes (16 x 16 weights, 16 biases) whatever the depth: 60 more parameters of those shapes launch nothing
    # more (their rows are views of the stacks' results).
    assert STACK_ELEMENTS >= 16 * 16
    assert _full_step_ops(64) == _full_step_ops(4)
