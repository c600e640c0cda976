"""Forward-hook statistics (activations, inputs, labels) and NaN provenance, against plain host references."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from agent_support import ScriptableServer, batch, train  # noqa: E402
from gradwatch.agent import dispatch  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

COLUMNS = (
    "mean", "std", "max_abs", "non_finite", "zero_fraction", "dead_fraction", "saturated_fraction", "unit_spread",
)  # fmt: skip


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def _f32(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4")


def _model() -> nn.Sequential:
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4), nn.Sigmoid())
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # four dead ReLU units
        model[2].weight *= 40.0  # a saturating tanh
    return model


def _reference(out: torch.Tensor, bounds: tuple[float, float] | None) -> list[float]:
    a = out.detach().double()
    units = a.reshape(-1, a.shape[-1]).T  # (units, samples): units are the last dimension
    if bounds is None:
        saturated = math.nan
    else:
        lo, hi = bounds
        margin = 0.01 * (hi - lo)
        # A unit is saturated when more than half of its outputs sit within the margin of an end.
        flat_end = ((units <= lo + margin) | (units >= hi - margin)).double().mean(dim=1)
        saturated = float((flat_end > 0.5).double().mean())
    return [
        float(a.mean()),
        float(a.std(correction=0)),
        float(a.abs().max()),
        float((~torch.isfinite(a)).sum()),
        float((a == 0).double().mean()),
        float((units.max(dim=1).values <= 0).double().mean()),
        saturated,
        float(a.reshape(-1, a.shape[-1]).std(dim=1, correction=0).mean()),  # across units, per sample, averaged
    ]


def test_agent_activation_input_output_and_label_stats_match_host_reference(server: ScriptableServer) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = attach(model, opt, server=server.address, run="activations", full_stats_interval=2)
    outputs: dict[int, torch.Tensor] = {}
    for i, module in enumerate(model):  # the test's own hooks, after the agent's: a plain copy of each output
        module.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach().clone()))
    bounds = {3: (-1.0, 1.0), 5: (0.0, 1.0)}
    expected = []
    for step in range(1, 5):
        x, _ = batch(step)
        y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(step))
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss, labels=y)
        expected.append({
            "modules": np.array([_reference(outputs[i], bounds.get(i)) for i in range(6)]),
            "input_mean": x.double().mean(dim=0).numpy(),
            "input_std": x.double().std(dim=0, correction=0).numpy(),
            "spread": float(out.detach().double().std(dim=0, correction=0).mean()),
            "rms": float(out.detach().double().square().mean().sqrt()),
            "labels": np.bincount(y.numpy(), minlength=int(y.max()) + 1),
        })  # fmt: skip
    assert monitor.close(timeout=5)
    hello = server.servicer.of_kind("hello")[0].hello
    assert list(hello.activation_schema.names) == ["0", "1", "2", "3", "4", "5"]
    assert list(hello.activation_schema.module_types) == ["Linear", "ReLU", "Linear", "Tanh", "Linear", "Sigmoid"]
    reports = server.servicer.reports()
    assert [r.HasField("activations") for r in reports] == [False, True, False, True]
    for report, ref in zip(reports, expected, strict=True):
        assert report.non_finite == 0 and not report.HasField("first_non_finite_module")
        if not report.HasField("activations"):
            assert not report.input_mean and not report.label_histogram and not report.HasField("output_spread")
            continue
        for k, name in enumerate(COLUMNS):
            np.testing.assert_allclose(_f32(getattr(report.activations, name)), ref["modules"][:, k],
                                       rtol=1e-4, atol=1e-6, err_msg=name)  # fmt: skip
        np.testing.assert_allclose(_f32(report.input_mean), ref["input_mean"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(_f32(report.input_std), ref["input_std"], rtol=1e-4, atol=1e-6)
        assert report.output_spread == pytest.approx(ref["spread"], rel=1e-4)
        assert report.output_rms == pytest.approx(ref["rms"], rel=1e-4)
        np.testing.assert_array_equal(_f32(report.label_histogram), ref["labels"])
    dead = _f32(reports[1].activations.dead_fraction)
    assert dead[1] >= 0.25  # the four units biased to -100 never fire
    assert _f32(reports[1].activations.saturated_fraction)[3] > 0  # the scaled-up tanh saturates


@pytest.mark.parametrize("shape", [(1024, 256), (16, 32, 24, 24)])
def test_large_outputs_use_a_fixed_sample_for_moments_but_exact_extremes_dead_and_saturated_units(
    shape: tuple[int, ...],
) -> None:
    """Outputs above SAMPLE_ELEMENTS: sampled moments within a small tolerance of the truth, exact maxima,
    dead and saturated units, and a single NaN never reported as zero non-finite values."""
    from gradwatch.agent.histogram import SAMPLE_ELEMENTS
    from gradwatch.agent.module_stats import module_stats as _module_stats
    from gradwatch.agent.module_stats import sample_positions

    torch.manual_seed(31)
    a = torch.relu(torch.randn(shape) + 0.3)
    units = a.shape[1] if a.dim() == 4 else a.shape[-1]
    unit_dim = 1 if a.dim() == 4 else a.dim() - 1
    dead_units = torch.arange(units) % 5 == 0
    a.index_fill_(unit_dim, dead_units.nonzero().reshape(-1), 0.0)  # every fifth unit never fires
    assert a.numel() > 2 * SAMPLE_ELEMENTS
    positions = sample_positions(a.numel(), a.device)
    assert positions is not None and positions.numel() == SAMPLE_ELEMENTS
    assert torch.equal(positions, sample_positions(a.numel(), a.device))  # fixed: the same every step
    got = _module_stats(a, None, a.sum(), positions)[:8].double().numpy()
    ref = _reference(a if a.dim() < 4 else a.movedim(1, -1), None)
    np.testing.assert_allclose(got[[0, 1]], ref[:2], rtol=0.02)  # mean, std from the sample
    assert got[2] == pytest.approx(ref[2], rel=1e-6)  # max |a|: exact
    assert got[3] == 0.0
    assert got[4] == pytest.approx(ref[4], abs=0.01)  # zero fraction from the sample
    assert got[5] == pytest.approx(float(dead_units.double().mean()), abs=1e-6)  # dead units: exact
    assert math.isnan(got[6])
    assert got[7] == pytest.approx(ref[7], rel=0.05)  # spread across units, from a subset of positions
    histogram = _module_stats(a, None, a.sum(), positions)[8:].double()
    assert float(histogram.sum()) == pytest.approx(float((a != 0).sum()), rel=0.02)

    squashed = torch.sigmoid(a * 40.0 - 20.0)  # units that never fire sit at the lower end: saturated
    got = _module_stats(squashed, (0.0, 1.0), squashed.sum(), positions)[:8].double().numpy()
    ref = _reference(squashed if a.dim() < 4 else squashed.movedim(1, -1), (0.0, 1.0))
    assert got[6] == pytest.approx(ref[6], abs=1e-6)  # saturated units: exact

    a.reshape(-1)[int(positions[0]) + 1 if int(positions[1]) != int(positions[0]) + 1 else 3] = math.nan
    got = _module_stats(a, None, a.sum(), positions)[:8].double().numpy()
    assert got[3] >= 1.0  # one NaN off the sample still counts


class _Branches(nn.Module):
    """`late` is registered first but runs second: forward order differs from registration order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(22)
        self.late = nn.Linear(16, 1)
        self.early = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.poison_at: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.early(x)
        if self.calls == self.poison_at:
            h = h * torch.where(torch.arange(16) == 3, math.nan, 1.0)  # NaN born after `early`, before `act`
        return self.late(self.act(h))


def test_agent_nan_provenance_names_the_first_module_in_forward_order(server: ScriptableServer) -> None:
    model = _Branches()
    model.poison_at = 3
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = attach(model, opt, server=server.address, run="provenance", full_stats_interval=100)
    for step in range(1, 5):
        x, y = batch(step)
        if step == 4:
            x[2, 1] = math.inf  # and a bad input batch later
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    names = list(server.servicer.of_kind("hello")[0].hello.activation_schema.names)
    assert names == ["late", "early", "act"]
    reports = server.servicer.reports()
    assert [r.non_finite & pb.NON_FINITE_FLAG_ACTIVATION != 0 for r in reports] == [False, False, True, True]
    third = reports[2]
    assert names[third.first_non_finite_module] == "act"  # not `late` (first registered), not `early` (clean)
    assert not third.non_finite & pb.NON_FINITE_FLAG_INPUT
    fourth = reports[3]
    assert fourth.non_finite & pb.NON_FINITE_FLAG_INPUT
    assert names[fourth.first_non_finite_module] == "early"


class _Poisoned(nn.Module):
    """Linear -> ReLU -> Linear -> Tanh, where a NaN can be born in functional code before the Tanh."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(23)
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Tanh()
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.act1(self.fc1(x)))
        if self.poison:
            h = h.log()  # NaN for negative values: born between fc2 and act2
        return self.act2(h)


def test_agent_provenance_skips_only_sums_it_can_infer() -> None:
    """A contracting activation fed directly by the module before it is not summed; anything else is."""
    from gradwatch.agent.activations import ActivationTap

    model = _Poisoned()
    tap = ActivationTap(model, {"fc1", "fc2"}, is_full=lambda: False, add_agent_time=lambda s: None)
    tap.install()
    assert tap.names == ("fc1", "act1", "fc2", "act2")
    x, _ = batch(1)
    model(x).sum().backward()
    capture = tap.take()
    assert capture is not None
    assert capture.order == [0, 1, 2, 3]
    assert sorted(capture.sums) == [0, 2]  # each activation sees its predecessor's very output: implied
    model.poison = True
    model(x).sum().backward()
    capture = tap.take()
    assert capture is not None and sorted(capture.sums) == [0, 2, 3]  # act2 now sees log()'s output: summed
    model.poison = False
    tap.remove()
    model.act2 = nn.SELU()  # expanding (scale > 1): summed even when fed directly
    tap = ActivationTap(model, {"fc1", "fc2"}, is_full=lambda: False, add_agent_time=lambda s: None)
    tap.install()
    model(x).sum().backward()
    capture = tap.take()
    assert capture is not None and sorted(capture.sums) == [0, 2, 3]
    tap.remove()


@pytest.mark.parametrize("where", ["linear overflow", "before tanh"])
def test_agent_provenance_stays_exact_with_skipped_sums(server: ScriptableServer, where: str) -> None:
    model = _Poisoned()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = attach(model, opt, server=server.address, run=f"skip-{where}", full_stats_interval=100)

    def poison(step: int) -> None:
        if step != 3:
            return
        if where == "linear overflow":
            with torch.no_grad():
                model.fc1.weight.fill_(3e38)  # finite weights, an infinite output: fc1 is first, not act1
        else:
            model.poison = True

    train(model, opt, monitor, 3, before_step=poison)
    assert monitor.close(timeout=5)
    names = list(server.servicer.of_kind("hello")[0].hello.activation_schema.names)
    reports = server.servicer.reports()
    assert [r.non_finite & pb.NON_FINITE_FLAG_ACTIVATION != 0 for r in reports] == [False, False, True]
    assert names[reports[2].first_non_finite_module] == ("fc1" if where == "linear overflow" else "act2")


def test_agent_forward_hooks_can_be_switched_off(server: ScriptableServer) -> None:
    model = _model()
    monitor = attach(model, None, server=server.address, run="no-hooks", forward_hooks=False, full_stats_interval=1)
    x, _ = batch(1)
    model(x).sum().backward()
    monitor.step()
    assert not dispatch.is_watched(model[1]) and not dispatch.is_watched(model)
    assert monitor.close(timeout=5)
    (report,) = server.servicer.reports()
    assert not report.HasField("activations")
    assert len(server.servicer.of_kind("hello")[0].hello.activation_schema.names) == 0


def test_agent_model_output_statistics_come_with_full_statistics_reports_only(server: ScriptableServer) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = attach(model, opt, server=server.address, run="output-hook", full_stats_interval=3, overhead_budget=0)
    for step in range(1, 7):
        x, _ = batch(step)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    assert [r.HasField("output_spread") for r in server.servicer.reports()] == [False, False, True] * 2


def test_agent_stores_nothing_on_the_model_and_close_stops_watching(server: ScriptableServer) -> None:
    model = _model()
    monitor = attach(model, None, server=server.address, run="hooks-removed")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # process-wide hooks
    assert dispatch.is_watched(model[0]) and dispatch.is_watched(model)
    assert monitor.close(timeout=5)
    assert not any(dispatch.is_watched(m) for m in model.modules())


def test_agent_unit_spread_sees_symmetric_neurons_and_conv_channels(server: ScriptableServer) -> None:
    torch.manual_seed(23)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.Tanh(),
                         nn.Linear(8, 1))  # fmt: skip
    with torch.no_grad():
        conv[2].weight.fill_(0.01)  # identical rows: every unit of conv[2] (and the Tanh) computes the same value
        conv[2].bias.fill_(0.1)
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    monitor = attach(conv, opt, server=server.address, run="symmetric", full_stats_interval=1)
    outputs: dict[int, torch.Tensor] = {}
    for i, module in enumerate(conv):
        module.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach().clone()))
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([2, -100, 0, 2, -100])  # -100: an ignore_index, not a class
    out = conv(x)
    out.sum().backward()
    opt.step()
    monitor.step(out.sum(), labels=y)
    assert monitor.close(timeout=5)
    hello = server.servicer.of_kind("hello")[0].hello
    assert list(hello.activation_schema.names) == ["0", "2", "3", "4"]  # Flatten is not watched
    (report,) = server.servicer.reports()
    spread = _f32(report.activations.unit_spread)
    conv_out = outputs[0].double()
    assert spread[0] == pytest.approx(float(conv_out.std(dim=1, correction=0).mean()), rel=1e-4)  # across channels
    assert spread[1] == pytest.approx(0.0, abs=1e-6) and spread[2] == pytest.approx(0.0, abs=1e-6)
    assert _f32(report.activations.std)[1] > 1e-3  # yet the outputs vary across samples
    assert math.isnan(spread[3])  # one output unit: no spread across units
    np.testing.assert_array_equal(_f32(report.label_histogram), [1, 0, 2])


def test_input_moments_per_channel_stay_accurate_far_from_zero() -> None:
    from gradwatch.agent.activations import _feature_moments

    torch.manual_seed(4)
    images = torch.randn(16, 3, 8, 8) * torch.tensor([0.5, 2.0, 0.01]).reshape(1, 3, 1, 1) + 300.0  # raw-pixel scale
    mean, std = _feature_moments(images)
    wide = images.double()
    np.testing.assert_allclose(mean.numpy(), wide.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), wide.std(dim=(0, 2, 3), correction=0).numpy(), rtol=1e-3)
    sequences = torch.randn(4, 5, 2000)  # (batch, positions, features): the first 1024 features only
    mean, std = _feature_moments(sequences)
    assert mean.shape == std.shape == (1024,)
    np.testing.assert_allclose(std.numpy(), sequences[..., :1024].double().std(dim=(0, 1), correction=0).numpy(),
                               rtol=1e-4)  # fmt: skip
    empty_mean, empty_std = _feature_moments(torch.empty(0, 3, 4, 4))  # an empty batch: NaN, not an error
    assert empty_mean.shape == (3,) and bool(torch.isnan(empty_mean).all() and torch.isnan(empty_std).all())


def test_histograms_are_exact_under_autocast() -> None:
    from gradwatch.agent.histogram import log2_histogram

    values = torch.randn(200_000, generator=torch.Generator().manual_seed(1)) * 3  # counts above fp16's 65504
    plain = log2_histogram(values, torch.device("cpu"))
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cpu", dtype=dtype):
            assert torch.equal(log2_histogram(values, torch.device("cpu")), plain), dtype
