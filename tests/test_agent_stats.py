"""The agent's statistics: what reaches the wire matches a plain torch computation, without host syncs."""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import gradwatch.agent  # noqa: E402
from agent_support import ScriptableServer, batch, make_mlp, train  # noqa: E402
from gradwatch.agent.fold import LayerFold  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.agent.schema import build_layout  # noqa: E402
from gradwatch.agent.stats import StatsEngine  # noqa: E402
from gradwatch.agent.vector import VectorLayout  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

AGENT_DIR = str(Path(gradwatch.agent.__file__).resolve().parent)
FULL_COLUMNS = ("norm", "max_abs", "mean", "non_finite", "zero_fraction")  # LayerStats, per source


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def _column(stats: pb.LayerStats, name: str) -> np.ndarray:
    return np.frombuffer(getattr(stats, name), dtype="<f4")


def _reference(tensors_by_layer: list[list[torch.Tensor | None]]) -> dict[str, list[float]]:
    """Per-layer statistics the slow, obvious way (float64, one layer at a time; None = all-zero)."""
    out: dict[str, list[float]] = {name: [] for name in FULL_COLUMNS}
    for tensors in tensors_by_layer:
        present = [t.detach().reshape(-1).double() for t in tensors if t is not None]
        if not present:  # a layer without gradients: all statistics of zeros
            for name, value in zip(FULL_COLUMNS, (0.0, 0.0, 0.0, 0.0, 1.0), strict=True):
                out[name].append(value)
            continue
        flat = torch.cat(present)
        out["norm"].append(float(torch.linalg.vector_norm(flat)))
        out["max_abs"].append(float(flat.abs().max()))
        out["mean"].append(float(flat.mean()))
        out["non_finite"].append(float((~torch.isfinite(flat)).sum()))
        out["zero_fraction"].append(float((flat == 0).double().mean()))
    return out


class TiedModel(nn.Module):
    """Tied embedding/projection weights, a frozen layer (no grads) and an all-zero bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.proj = nn.Linear(8, 10)
        self.proj.weight = self.embed.weight
        nn.init.zeros_(self.proj.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.frozen(self.embed(idx))))


def test_stats_engine_and_fold_match_reference_with_tied_frozen_and_zero_params() -> None:
    model = TiedModel()
    idx = torch.tensor([[1, 2, 3], [4, 4, 0]])
    loss = nn.functional.cross_entropy(model(idx).reshape(-1, 10), torch.tensor([1, 2, 3, 4, 5, 6]))
    loss.backward()
    engine = StatsEngine(build_layout(model))
    schema = engine.layout.schema
    assert schema.names == ("embed", "frozen", "proj")
    assert schema.param_counts == (80, 72, 90)  # proj owns the tied weight (80) and its bias (10)

    grads, weights = engine.compute("grad", full=True), engine.compute("weight", full=True)
    vector = torch.stack([loss.detach(), *grads, *weights]).numpy()
    layout = VectorLayout(num_params=len(engine.layout.params), full=True)
    assert vector.shape == (layout.length,) and len(engine.layout.params) == 4  # the tied weight once
    folded = LayerFold.of(engine.layout).fold(vector, layout)
    columns = folded.columns

    layers = [list(m.parameters(recurse=False)) for m in (model.embed, model.frozen, model.proj)]
    for source, tensors in (("grad", [[p.grad for p in ps] for ps in layers]), ("weight", layers)):
        ref = _reference(tensors)
        for name in FULL_COLUMNS:
            np.testing.assert_allclose(columns[f"{source}_{name}"], ref[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # The tied weight counts once in the model-wide sum of squares; the frozen layer counts as zero.
    unique_grads = [model.embed.weight.grad, model.proj.bias.grad]
    expected_sum_sq = sum(float(g.double().pow(2).sum()) for g in unique_grads)
    assert folded.grad_sum_squares == pytest.approx(expected_sum_sq, rel=1e-5)
    assert columns["grad_norm"][1] == 0.0 and columns["grad_zero_fraction"][1] == 1.0  # absent grads are zeros


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_every_step_norms_of_differentiable_gradients_record_no_graph() -> None:
    # backward(create_graph=True) leaves gradients that require grad themselves: the every-step norms (computed
    # without a grad-mode context) must still be plain values, not nodes that would keep those gradients alive.
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))
    model(torch.randn(5, 4)).square().sum().backward(create_graph=True)
    assert all(p.grad is not None and p.grad.requires_grad for p in model.parameters())
    engine = StatsEngine(build_layout(model))
    norms = engine.compute("grad", full=False)
    assert not any(n.requires_grad or n.grad_fn is not None for n in norms)
    expected = [float(p.grad.detach().double().norm()) for p in engine.layout.params]
    np.testing.assert_allclose([float(n) for n in norms], expected, rtol=1e-6)


def test_zero_fraction_of_a_large_tensor_is_sampled_within_a_percent_and_stays_exact_for_small_ones() -> None:
    from gradwatch.agent.stats import ZERO_SAMPLE_ELEMENTS

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(1000, 300), nn.Linear(300, 8))  # 300 000 and 2 400 weights
    assert model[0].weight.numel() > 4 * ZERO_SAMPLE_ELEMENTS
    with torch.no_grad():
        for layer in model:
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.37)  # about 37 % zeros, scattered
            layer.bias.zero_()
    engine = StatsEngine(build_layout(model))
    grads, weights = engine.compute("grad", full=True), engine.compute("weight", full=True)
    layout = VectorLayout(num_params=len(engine.layout.params), full=True)
    columns = LayerFold.of(engine.layout).fold(torch.stack([torch.zeros(()), *grads, *weights]).numpy(), layout).columns
    truth = [float((torch.cat([layer.weight.reshape(-1), layer.bias]) == 0).double().mean()) for layer in model]
    assert abs(columns["weight_zero_fraction"][0] - truth[0]) < 0.01  # sampled
    assert columns["weight_zero_fraction"][1] == pytest.approx(truth[1], abs=1e-6)  # exact
    assert 0.0 <= columns["weight_zero_fraction"][0] <= 1.0


def _weight_columns(model: nn.Module) -> dict[str, np.ndarray]:
    engine = StatsEngine(build_layout(model))
    grads, weights = engine.compute("grad", full=True), engine.compute("weight", full=True)
    layout = VectorLayout(num_params=len(engine.layout.params), full=True)
    return LayerFold.of(engine.layout).fold(torch.stack([torch.zeros(()), *grads, *weights]).numpy(), layout).columns


def test_zero_fraction_sample_sees_every_column_of_a_matrix_whose_half_is_zero() -> None:
    # Zero columns (the inputs of a dead unit upstream) in rows of 1024: a sample that aliased with the row
    # length would see only some columns and report 0 or 1.
    model = nn.Sequential(nn.Linear(1024, 256))
    with torch.no_grad():
        model[0].weight[:, 512:] = 0.0
        model[0].bias.fill_(1.0)
    columns = _weight_columns(model)
    assert abs(columns["weight_zero_fraction"][0] - 0.5 * 262144 / 262400) < 0.01


def test_non_finite_count_of_a_large_tensor_is_sampled_but_one_bad_element_is_never_reported_as_none() -> None:
    from gradwatch.agent.stats import ZERO_SAMPLE_ELEMENTS

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(1000, 300), nn.Linear(300, 8), nn.Linear(8, 8))
    assert model[0].weight.numel() > 4 * ZERO_SAMPLE_ELEMENTS
    with torch.no_grad():
        model[0].weight[7, 11] = math.nan  # one NaN in 300 000 values: most samples miss it
        model[1].weight[3, 5] = math.inf  # small tensors are counted exactly
        model[1].weight[4, 5] = -math.inf
    columns = _weight_columns(model)
    assert columns["weight_non_finite"][0] >= 1.0
    assert columns["weight_non_finite"][1] == 2.0 and columns["weight_non_finite"][2] == 0.0
    with torch.no_grad():
        model[0].weight.masked_fill_(torch.rand_like(model[0].weight) < 0.1, math.nan)  # about 10 % NaN
    truth = float(torch.isnan(model[0].weight).sum())
    assert abs(_weight_columns(model)["weight_non_finite"][0] - truth) < 0.01 * model[0].weight.numel()


def test_huge_finite_values_are_not_counted_as_non_finite() -> None:
    # The float32 norm of 1e20s overflows to inf; the elements are finite all the same.
    model = nn.Sequential(nn.Linear(1000, 300))
    with torch.no_grad():
        model[0].weight.fill_(1e20)
    columns = _weight_columns(model)
    assert not np.isfinite(columns["weight_norm"][0]) and columns["weight_non_finite"][0] == 0.0


def test_zero_fraction_of_a_channels_last_weight_is_read_in_memory_order_without_a_copy() -> None:
    from gradwatch.agent.sampling import _flat, block_sample

    conv = nn.Conv2d(64, 128, 3).to(memory_format=torch.channels_last)  # 73 728 weights
    with torch.no_grad():
        conv.weight[:, :32] = 0.0  # half the input channels
    weight = conv.weight.detach()
    assert not weight.is_contiguous()
    assert _flat(weight).untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()  # a view, no copy
    sample, scale = block_sample(weight, 65536)
    assert scale > 1.0 and sample.numel() < weight.numel()
    columns = _weight_columns(nn.Sequential(conv))
    truth = float((torch.cat([conv.weight.reshape(-1), conv.bias]) == 0).double().mean())
    assert abs(columns["weight_zero_fraction"][0] - truth) < 0.01


def test_agent_stats_on_the_wire_match_reference_every_step(server: ScriptableServer) -> None:
    model = make_mlp(seed=3)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    expected: list[dict[str, dict[str, list[float]]]] = []
    losses: list[float] = []
    monitor = attach(model, None, server=server.address, run="ref", full_stats_interval=1)
    for step in range(1, 6):
        x, y = batch(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with torch.no_grad():  # a hand-written SGD step: no optimizer, so the agent reads .grad in step()
            for p in model.parameters():
                p -= 0.05 * p.grad
        expected.append(
            {
                "grad": _reference([[p.grad for p in m.parameters()] for m in linears]),
                "weight": _reference([list(m.parameters()) for m in linears]),
            }
        )
        losses.append(float(loss.detach()))
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == [1, 2, 3, 4, 5]
    for report, ref, loss in zip(reports, expected, losses, strict=True):
        assert report.has_loss and report.loss == pytest.approx(loss, rel=1e-6)
        assert report.non_finite == 0 and not report.HasField("first_non_finite_layer")
        assert report.grad_sum_squares == pytest.approx(sum(n * n for n in ref["grad"]["norm"]), rel=1e-5)
        for source in ("grad", "weight"):
            for name in FULL_COLUMNS:
                got = _column(report.layers, f"{source}_{name}")
                np.testing.assert_allclose(got, ref[source][name], rtol=1e-5, atol=1e-7, err_msg=f"{source} {name}")


def test_agent_nan_input_at_step_k_flags_step_k_and_first_layer(server: ScriptableServer) -> None:
    model = make_mlp(seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # Step 5 is a full-statistics step: weights are read on those only (StatsEngine.compute).
    monitor = attach(model, opt, server=server.address, run="nan", full_stats_interval=5)
    train(model, opt, monitor, 8, nan_at=5)
    assert monitor.close(timeout=5)
    reports = {r.step: r for r in server.servicer.reports()}
    for step in range(1, 5):
        assert reports[step].non_finite == 0, step
        assert not reports[step].HasField("first_non_finite_layer")
    bad = reports[5]
    assert bad.non_finite & pb.NON_FINITE_FLAG_LOSS
    assert bad.non_finite & pb.NON_FINITE_FLAG_GRADIENT
    assert bad.non_finite & pb.NON_FINITE_FLAG_WEIGHT  # weights are read after the (poisoned) update
    assert math.isnan(bad.loss) and bad.has_loss
    assert bad.HasField("first_non_finite_layer") and bad.first_non_finite_layer == 0
    assert math.isnan(bad.grad_sum_squares)
    after = reports[6]  # not a full step: the poisoned weights show through the loss and gradients
    assert after.non_finite & pb.NON_FINITE_FLAG_LOSS and after.non_finite & pb.NON_FINITE_FLAG_GRADIENT
    assert not after.non_finite & pb.NON_FINITE_FLAG_WEIGHT


def test_agent_first_non_finite_layer_names_the_first_bad_layer_in_schema_order(server: ScriptableServer) -> None:
    model = make_mlp(seed=2)
    monitor = attach(model, None, server=server.address, run="provenance")
    for step in (1, 2):
        x, y = batch(step)
        model.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 2:
            model[4].weight.grad[0, 0] = math.inf  # the last Linear only (layer index 2)
            model[2].bias.grad[1] = math.nan  # and the middle one (layer index 1): it comes first
        monitor.step(loss)
    assert monitor.close(timeout=5)
    first, second = server.servicer.reports()
    assert first.non_finite == 0
    assert second.non_finite == pb.NON_FINITE_FLAG_GRADIENT  # finite loss, finite weights
    assert second.first_non_finite_layer == 1


def test_agent_full_stats_every_n_steps_only(server: ScriptableServer) -> None:
    model = make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="cadence", full_stats_interval=3)
    train(model, opt, monitor, 10)
    assert monitor.close(timeout=5)
    full = [r.step for r in server.servicer.reports() if r.HasField("layers")]
    assert full == [3, 6, 9]
    hello = server.servicer.of_kind("hello")[0].hello
    assert hello.full_stats_interval == 3
    assert list(hello.schema.names) == ["0", "2", "4"]
    assert list(hello.schema.module_types) == ["Linear", "Linear", "Linear"]
    assert list(hello.schema.param_counts) == [8 * 16 + 16, 16 * 16 + 16, 16 + 1]
    assert list(hello.schema.local_param_counts) == list(hello.schema.param_counts)  # plain tensors: all held here


def test_agent_grads_are_captured_before_zero_grad_with_an_optimizer(server: ScriptableServer) -> None:
    model = make_mlp(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="capture")
    train(model, opt, monitor, 3, set_grads_to_none_before_monitor_step=True)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert all(r.grad_sum_squares > 0 for r in reports)
    assert [r.optimizer_step for r in reports] == [1, 2, 3]
    assert [list(r.learning_rates) for r in reports] == [[0.05]] * 3


def test_agent_tensor_learning_rate_travels_with_the_batch(server: ScriptableServer) -> None:
    model = make_mlp(seed=5)
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": torch.tensor(0.01)}, {"params": params[2:], "lr": 0.5}])
    monitor = attach(model, opt, server=server.address, run="tensor-lr")
    train(model, opt, monitor, 2)
    assert monitor.close(timeout=5)
    for report in server.servicer.reports():
        assert list(report.learning_rates) == [pytest.approx(0.01), 0.5]


def test_agent_reports_the_tensor_learning_rate_each_step_used_while_a_scheduler_changes_it_in_place(
    server: ScriptableServer,
) -> None:
    # Schedulers fill_() a tensor rate in place after the step; the report must carry the rate of its step.
    model = make_mlp(seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.1))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with attach(model, opt, server=server.address, run="scheduled-tensor-lr") as monitor:
        for _ in range(5):
            train(model, opt, monitor, 1)
            scheduler.step()
        assert monitor.close(timeout=5)
    got = [r.learning_rates[0] for r in server.servicer.reports()]
    assert got == pytest.approx([0.1 * 0.5**k for k in range(5)])


# ---------------------------------------------------------------------- no host sync on the training thread


class _ScalarReads(TorchDispatchMode):
    """Records every op that reads a tensor value into Python (.item(), bool(), float(), ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _host_transfer_guard(users_own: tuple[object, ...] = ()) -> Iterator[list[str]]:
    """Flag Tensor.item/cpu/tolist/numpy/__bool__/__float__/__int__ called from agent code on this thread.

    `users_own`: code objects of the user's own calls that the agent merely wraps (GradScaler.step syncs by
    design); reads inside them are the user's, not the agent's."""
    training_thread = threading.get_ident()
    violations: list[str] = []
    names = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def guarded(name: str):  # type: ignore[no-untyped-def]
        original = originals[name]

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if threading.get_ident() == training_thread:
                frame = sys._getframe(1)
                while frame is not None:
                    if frame.f_code in users_own:
                        break
                    if frame.f_code.co_filename.startswith(AGENT_DIR):
                        violations.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
                        break
                    frame = frame.f_back
            return original(self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, guarded(name))
    try:
        yield violations
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_agent_training_thread_never_reads_tensor_values(server: ScriptableServer) -> None:
    model = make_mlp(seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = attach(model, opt, server=server.address, run="no-sync", full_stats_interval=2)
    with _host_transfer_guard() as violations, _ScalarReads() as reads:
        for step in range(1, 9):  # full and non-full steps, a NaN step included
            x, y = batch(step)
            if step == 7:
                x[0, 0] = math.nan
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.step(loss)
    assert violations == []
    assert reads.reads == []  # SGD and mse_loss do not sync either: any read would be the agent's
    assert monitor.close(timeout=5)
    assert len(server.servicer.reports()) == 8


def test_agent_follows_a_model_cast_after_attach(server: ScriptableServer) -> None:
    model = make_mlp(seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="cast", full_stats_interval=2)
    train(model, opt, monitor, 2)
    model.double()  # same Parameter objects, new dtype: the agent regroups instead of failing
    for step in (3, 4):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x.double()), y.double())
        opt.zero_grad()
        loss.backward()
        expected = [float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in m.parameters()])))
                    for m in model if isinstance(m, nn.Linear)]  # fmt: skip
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [r.step for r in reports] == [1, 2, 3, 4]
    np.testing.assert_allclose(_column(reports[3].layers, "grad_norm"), expected, rtol=1e-5)


def test_agent_training_thread_never_reads_tensor_values_with_accumulation_and_a_grad_scaler(
    server: ScriptableServer,
) -> None:
    model = make_mlp(seed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    monitor = attach(model, opt, server=server.address, run="no-sync-amp", grad_scaler=scaler,
                     grad_accumulation=True, full_stats_interval=2)  # fmt: skip
    with _host_transfer_guard(users_own=(torch.amp.GradScaler.step.__code__,)) as violations:
        for step in range(1, 7):
            for micro in range(3):
                x, y = batch(10 * step + micro)
                loss = nn.functional.mse_loss(model(x), y)
                scaler.scale(loss).backward()
                labels = (y > 0).long().reshape(-1)  # the label histogram is sync-free too
                if micro < 2:
                    monitor.step(loss, labels=labels)
            if step == 4:
                model[0].weight.grad[0, 0] = math.inf  # a skipped step
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            monitor.step(loss, labels=labels)
    assert violations == []
    assert monitor.close(timeout=5)
    reports = server.servicer.reports()
    assert [r.skipped_step for r in reports] == [False, False, False, True, False, False]
    assert [sum(np.frombuffer(r.label_histogram, "<f4")) for r in reports] == [0, 96, 0, 96, 0, 96]  # 3 × 32
    assert {r.micro_steps for r in reports} == {3}


def test_agent_min_max_and_update_ratio_match_reference(server: ScriptableServer) -> None:
    torch.manual_seed(9)
    # The middle Linear has 512 × 256 = 131072 weights: its update is measured on a strided sample (stride 2).
    model = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 1))
    linears = [m for m in model if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    monitor = attach(model, opt, server=server.address, run="minmax", full_stats_interval=1)
    expected = []
    for step in range(1, 4):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = _layer_values(linears)
        grads = [torch.cat([p.grad.reshape(-1).double() for p in m.parameters()]) for m in linears]
        opt.step()
        after = _layer_values(linears)
        expected.append({
            "grad_min": [float(g.min()) for g in grads],
            "grad_max": [float(g.max()) for g in grads],
            "weight_min": [float(w.min()) for w in after],
            "weight_max": [float(w.max()) for w in after],
            "update_ratio": [float((a - b).norm() / b.norm()) for a, b in zip(after, before, strict=True)],
        })  # fmt: skip
        monitor.step(loss)
    assert monitor.close(timeout=5)
    for report, ref in zip(server.servicer.reports(), expected, strict=True):
        for name in ("grad_min", "grad_max", "weight_min", "weight_max"):
            np.testing.assert_allclose(_column(report.layers, name), ref[name], rtol=1e-5, err_msg=name)
        ratio = _column(report.layers, "update_ratio")
        np.testing.assert_allclose(ratio[[0, 2]], np.array(ref["update_ratio"])[[0, 2]], rtol=1e-4)  # exact
        assert ratio[1] == pytest.approx(ref["update_ratio"][1], rel=0.05)  # sampled


def test_update_ratio_travels_on_its_own_cadence_between_full_steps(server: ScriptableServer) -> None:
    """Every step up to WARM_STEPS, then every EVERY_STEPS steps, whatever the full-statistics interval: between
    full steps in StepReport.update_ratio, on full steps in the layer columns; the same values either way."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = attach(
        model, opt, server=server.address, run="ratio-cadence", full_stats_interval=10, overhead_budget=0
    )  # full steps exactly every 10 (the budget would stretch them)
    expected = {}
    for step in range(1, 41):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        before = _layer_values([model[0], model[2]])
        opt.step()
        after = _layer_values([model[0], model[2]])
        expected[step] = [float((a - b).norm() / b.norm()) for a, b in zip(after, before, strict=True)]
        monitor.step(loss)
    assert monitor.close(timeout=5)
    carried = {}
    for report in server.servicer.reports():
        column = _column(report.layers, "update_ratio") if report.HasField("layers") else None
        if report.update_ratio:
            assert column is None or column.size == 0
            column = np.frombuffer(report.update_ratio, "<f4")
        if column is not None and column.size:
            carried[report.step] = column
    assert sorted(carried) == [*range(1, 17), 20, 24, 30, 32, 40]
    for step, column in carried.items():
        np.testing.assert_allclose(column, expected[step], rtol=1e-4, err_msg=f"step {step}")


def _layer_values(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Each module's parameters as one float64 vector (a layer's values, for reference update ratios)."""
    return [torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for m in modules]


def _host_log2_histogram(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64).reshape(-1)
    v = v[np.isfinite(v) & (v != 0)]
    exponent = np.floor(np.log2(np.abs(v))).astype(np.int64) + 1  # |x| in [2^(e-1), 2^e)
    return np.bincount(np.clip(exponent + 24, 0, 31), minlength=32).astype(np.float64)


def test_log2_histogram_bins_match_a_host_reference_at_the_edges() -> None:
    from gradwatch.agent.histogram import log2_histogram

    values = torch.tensor(
        [
            0.0,
            -0.0,
            1e-40,
            1e-30,
            2.0**-25,
            2.0**-24,
            0.75,
            -0.75,
            1.0,
            3.0,
            63.0,
            64.0,
            1e10,
            math.nan,
            math.inf,
            -math.inf,
        ]
    )  # fmt: skip  (1e-40: a subnormal float32)
    got = log2_histogram(values, torch.device("cpu")).numpy()
    np.testing.assert_array_equal(got, _host_log2_histogram(values.numpy()))
    assert got.sum() == 11 and got[0] == 3 and got[31] == 2  # under- and overflow bins; no zero, NaN or Inf


def test_agent_gradient_and_activation_histograms_match_reference(server: ScriptableServer) -> None:
    model = make_mlp(seed=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="histograms", full_stats_interval=1)
    outputs: dict[int, torch.Tensor] = {}
    for i, module in enumerate(model):
        module.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out.detach().clone()))
    x, y = batch(1)
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    grad_ref = [sum(_host_log2_histogram(p.grad.numpy()) for p in m.parameters()) for m in linears]
    opt.step()
    monitor.step(loss)
    assert monitor.close(timeout=5)
    (report,) = server.servicer.reports()
    got = _column(report.layers, "grad_log2_histogram").reshape(3, 32)
    np.testing.assert_array_equal(got, np.array(grad_ref))
    act_ref = [_host_log2_histogram(outputs[i].numpy()) for i in range(5)]
    got = np.frombuffer(report.activations.log2_histogram, dtype="<f4").reshape(5, 32)
    np.testing.assert_array_equal(got, np.array(act_ref))
