"""Full-statistics activation values computed over same-shape stacks at the end of the forward
(module_stats.stacked_module_stats, ActivationTap's deferred outputs) are exactly those of one output at a time
when its module returns (module_stats.module_stats): generated output shapes, dtypes, bounds, NaN/Inf, zeros,
saturated units and in-place writes after a module returned."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.agent import stacks  # noqa: E402
from gradwatch.agent.activations import ActivationTap  # noqa: E402
from gradwatch.agent.module_stats import module_stats, stacked_module_stats  # noqa: E402
from gradwatch.agent.stacks import STACK_ELEMENTS  # noqa: E402

BOUNDS = (None, (0.0, 1.0), (-1.0, 1.0), (0.0, 6.0))
DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@st.composite
def outputs(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[float, float] | None]:
    """k same-shape outputs (0-D to 4-D, at most STACK_ELEMENTS elements each) stacked, in their own dtype, with
    zeros, NaN/Inf, saturated and huge values planted, and bounds to judge saturation against."""
    dims = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=dims, max_size=dims)))
    while math.prod(shape) > STACK_ELEMENTS:  # halve the largest dimension
        largest = shape.index(max(shape))
        shape = (*shape[:largest], shape[largest] // 2, *shape[largest + 1 :])
    k = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((k, *shape), generator=generator) * 2.0 ** draw(st.integers(-20, 20))
    bounds = draw(st.sampled_from(BOUNDS))
    if bounds is not None and draw(st.booleans()):  # squash into the range, many at its ends
        lo, hi = bounds
        x = (torch.sigmoid(x * 4) * (hi - lo) + lo).clamp(lo, hi)
    if draw(st.booleans()):
        x = x.clamp(min=0.0)  # dead units
    flat = x.view(-1)
    for value in draw(st.lists(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 3e38]), max_size=4)):
        flat[int(torch.randint(flat.numel(), (), generator=generator))] = value
    return x.to(dtype), bounds


def _exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=outputs(), threads=st.sampled_from([1, 2]), alike=st.booleans())
def test_stacked_module_statistics_equal_one_output_at_a_time(
    case: tuple[torch.Tensor, tuple[float, float] | None], threads: int, alike: bool
) -> None:
    # alike=False: float sums of each output alone, as on an accelerator (stacks.rows_sum_alike); on CUDA a stack
    # row's own sums would take another order, so only that form runs there (the deferred test below).
    x, bounds = case
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        totals = x.view(x.shape[0], -1).sum(1, dtype=torch.float32)
        alone = None if alike else [a.to(torch.float32) for a in x.unbind()]
        rows = stacked_module_stats(x.to(torch.float32), bounds, totals, alone)
        for i, a in enumerate(x.unbind()):
            total = a.sum(dtype=torch.float32)
            _exact(totals[i], total, f"sum of output {i}")
            _exact(rows[i], module_stats(a.to(torch.float32), bounds, total, None), f"output {i}")
    finally:
        torch.set_num_threads(previous)


class Blocks(nn.Module):
    """Same-shape blocks: Linear, an in-place ReLU (written after the Linear returned), Tanh; then a 4-D part
    (channels), a bfloat16 branch and an output written in place by functional code."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.extend([nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, width), nn.Tanh()])
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.sig = nn.Sigmoid()
        self.low = nn.Linear(width, width).to(torch.bfloat16)
        self.last = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        image = self.sig(self.conv(x[:, : 2 * 16].reshape(-1, 2, 4, 4)))
        x = x + image.mean()
        x = x + self.low(x.to(torch.bfloat16)).float()
        out = self.last(x)
        out[:, 0] = 0.0  # written in place after `last` returned
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alike", [True, False])  # False: float sums of each output alone, as on an accelerator
@pytest.mark.parametrize(("depth", "chunk"), [(1, stacks.STACK_BYTES), (3, stacks.STACK_BYTES), (3, 1000)])
def test_deferred_full_report_equals_the_report_computed_as_each_module_returns(
    depth: int, chunk: int, alike: bool, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stacks, "STACK_BYTES", chunk)  # 1000 bytes: one output per stack
    if not alike:
        monkeypatch.setattr(stacks, "rows_sum_alike", lambda device: False)
    torch.manual_seed(depth)
    model = Blocks(depth, 32).to(device)
    names = {name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    full = {"on": False}
    tap = ActivationTap(model, names, is_full=lambda: full["on"], add_agent_time=lambda s: None)
    tap.install()
    x = torch.randn(6, 32, device=device)
    model(x).sum().backward()
    assert tap.take() is not None  # the first report learns which outputs are written in place later
    full["on"] = True
    captures = []
    for learning in (True, False):  # True: every output measured as its module returns (the reference)
        tap._learning = learning
        model(x).sum().backward()
        capture = tap.take()
        assert capture is not None and capture.full
        captures.append(capture)
    reference, deferred = captures
    assert deferred.stats.keys() == reference.stats.keys() and len(reference.stats) == len(tap.names)
    for index, values in reference.stats.items():
        _exact(deferred.stats[index], values, tap.names[index])
    assert deferred.sums.keys() == reference.sums.keys()
    for index, value in reference.sums.items():
        _exact(deferred.sums[index], value, f"provenance of {tap.names[index]}")
    tap.remove()


class LateWriter(nn.Module):
    """Writes its first layer's output in place after it returned, from a chosen report on (`write`)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.write: str | None = None
        self.kept: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.write == "scale":
            h.mul_(2.0)
        elif self.write == "transpose":  # in place and no longer contiguous: not stackable any more
            h.t_()
        self.kept = h
        return self.second(h.reshape(x.shape[0], 8))


@pytest.mark.parametrize("write", ["scale", "transpose"])
def test_an_output_first_written_in_place_on_a_full_report_is_measured_as_written_and_made_eager(write: str) -> None:
    torch.manual_seed(0)
    model = LateWriter()
    full = {"on": False}
    tap = ActivationTap(model, {"first", "second"}, is_full=lambda: full["on"], add_agent_time=lambda s: None)
    tap.install()
    x = torch.randn(8, 8)
    model(x).sum().backward()
    assert tap.take() is not None and not tap._eager  # learned: nothing written in place yet
    full["on"], model.write = True, write
    model(x).sum().backward()
    capture = tap.take()
    assert capture is not None and model.kept is not None
    first = tap.names.index("first")
    written = model.kept.detach()
    total = written.sum(dtype=torch.float32)
    _exact(capture.sums[first], total, "provenance")
    _exact(capture.stats[first], module_stats(written.float(), None, total, None), "statistics")
    assert first in tap._eager  # from now on measured as it returns
    tap.remove()
