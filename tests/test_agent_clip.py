"""`gradwatch.clip_grad_norm_`: exactly torch's result and clipping, and the agent's gradient norms taken from
that same pass (scaled by its coefficient), never from a gradient changed since."""

from __future__ import annotations

import math
import warnings

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from agent_support import ScriptableServer  # noqa: E402
from clip_support import MAX_NORMS, PARAM_SPECS, POISON, SCALES, make_params  # noqa: E402
from gradwatch.agent import clip  # noqa: E402
from gradwatch.agent.schema import build_layout  # noqa: E402
from gradwatch.agent.stats import StatsEngine  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    specs=PARAM_SPECS,
    max_norm=MAX_NORMS,
    norm_type=st.sampled_from((2.0, 1.0, math.inf, 0.5, 3)),
    foreach=st.sampled_from((None, True, False)),
    scale=SCALES,
    poison=POISON,
    as_generator=st.booleans(),
)
def test_clip_grad_norm_returns_and_clips_exactly_as_torch(
    seed: int, specs: list[tuple[tuple[int, ...], torch.dtype, bool]], max_norm: float, norm_type: float,
    foreach: bool | None, scale: float, poison: int | None, as_generator: bool,
) -> None:  # fmt: skip
    ours, theirs = make_params(seed, specs, scale, poison), make_params(seed, specs, scale, poison)
    grads_before = [None if p.grad is None else p.grad.clone() for p in ours]

    def call(function: object, params: list[nn.Parameter]) -> tuple[object, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = function((p for p in params) if as_generator else params, max_norm, norm_type,  # type: ignore[operator]
                                  foreach=foreach)  # fmt: skip
            except Exception as exc:  # torch refuses some inputs (an empty tensor's inf-norm): so must we
                result = exc
        return result, [str(w.message) for w in caught]

    got, warned = call(gradwatch.clip_grad_norm_, ours)
    want, torch_warned = call(torch.nn.utils.clip_grad_norm_, theirs)
    assert warned == torch_warned
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
        return
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all())
    for a, b in zip(ours, theirs, strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad.nan_to_num(nan=7.0), b.grad.nan_to_num(nan=7.0))
    # The norms kept for the agent: norm_type 2 only, float32/float64/bfloat16 gradients, each exactly the norm
    # torch's pass computed for it (before clipping), with the coefficient the clip applied.
    offer = clip.offered()
    for p, before in zip(ours, grads_before, strict=True):
        if p.grad is None or norm_type != 2.0 or p.grad.dtype == torch.float16:
            assert p.grad is None or id(p.grad) not in offer
            continue
        norm, coefficient, ref, version = offer[id(p.grad)]
        assert ref() is p.grad and version == p.grad._version
        want_coefficient = torch.clamp(max_norm / (want + 1e-6), max=1.0)
        assert torch.equal(coefficient, want_coefficient) or (coefficient.isnan() and want_coefficient.isnan())
        expected = torch._foreach_norm([before], 2.0)[0]
        assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())


def test_error_if_nonfinite_raises_as_torch_does() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        gradwatch.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        torch.nn.utils.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    q = nn.Parameter(torch.ones(2))
    q.grad = torch.full((2,), 3.0)
    assert torch.equal(gradwatch.clip_grad_norm_(q, 1.0), torch.tensor(math.sqrt(18.0)))  # a single tensor


def _model() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_the_agent_takes_its_gradient_norms_from_the_clip_and_only_while_they_hold() -> None:
    model = _model()
    engine = StatsEngine(build_layout(model, 1))
    model(torch.randn(5, 6)).square().sum().mul(100).backward()
    before = torch._foreach_norm([p.grad.clone() for p in model.parameters()], 2.0)
    total = gradwatch.clip_grad_norm_(model.parameters(), 0.1)
    coefficient = torch.clamp(0.1 / (total + 1e-6), max=1.0)
    assert float(coefficient) < 1.0  # it clipped
    norms = engine.compute("grad", False)
    # The clip's own norms, scaled by the coefficient it applied: no second pass over the gradients.
    assert all(torch.equal(a, b * coefficient) for a, b in zip(norms, before, strict=True))
    after = [torch.linalg.vector_norm(p.grad) for p in model.parameters()]  # a second pass, for comparison
    torch.testing.assert_close(norms, after, rtol=1e-6, atol=0)
    model[0].weight.grad.mul_(2.0)  # written after the clip: that group is measured again
    again = engine.compute("grad", False)
    assert torch.equal(again[0], torch.linalg.vector_norm(model[0].weight.grad))
    model.zero_grad(set_to_none=True)
    model(torch.randn(5, 6)).sum().backward()  # new gradients: the old offer no longer applies
    fresh = engine.compute("grad", False)
    assert all(torch.equal(a, torch.linalg.vector_norm(p.grad)) for a, p in zip(fresh, model.parameters(), strict=True))


def test_reports_carry_the_norms_of_the_clipped_gradients() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = []
    with ScriptableServer() as server:
        monitor = gradwatch.attach(model, opt, server=server.address, run="clip", full_stats_interval=1,
                                   overhead_budget=0)  # fmt: skip
        for step in range(3):
            loss = model(torch.randn(5, 6)).square().sum() * 10**step
            opt.zero_grad()
            loss.backward()
            total = gradwatch.clip_grad_norm_(model.parameters(), 0.5)
            assert float(total) > 0.5  # it clipped
            expected.append([float(torch.linalg.vector_norm(p.grad)) for p in model.parameters()])
            opt.step()
            monitor.step(loss)
        assert monitor.close(timeout=5)
        reports = server.servicer.reports()
    import numpy as np

    for report, norms in zip(reports, expected, strict=True):
        layers = np.frombuffer(report.layers.grad_norm, dtype="<f4")
        # Two layers (weight and bias each): sqrt of the parameters' squared norms, folded on the host.
        want = [math.hypot(norms[0], norms[1]), math.hypot(norms[2], norms[3])]
        np.testing.assert_allclose(layers, want, rtol=1e-6)
        assert report.grad_sum_squares == pytest.approx(sum(n * n for n in norms), rel=1e-6)
