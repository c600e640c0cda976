"""Everything users do to a model or optimizer works the same with gradwatch attached.

The matrix: each operation runs on a freshly trained model without the agent and on the same model trained
with the agent attached; both must end alike (the same exception type, or outputs equal within float
tolerance), copies must carry no agent, and the attached original must go on reporting (a training step
after the operation is reported; agent internal errors re-raise in tests, conftest.py). Separate tests cover
what needs more than one model: compile counters, spawned Hogwild workers, a process without gradwatch, GANs,
attach twice, leaks.
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import pickle
import subprocess
import sys
import textwrap
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from agent_support import ScriptableServer, batch  # noqa: E402
from gradwatch.agent import dispatch  # noqa: E402
from gradwatch.agent.activations import ActivationTap  # noqa: E402
from gradwatch.agent.monitor import Monitor, attach  # noqa: E402

Operation = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], Any]


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


class Net(nn.Module):
    """A user-defined model (torch.compile skips frames inside torch.nn, so a bare Sequential compiles nothing
    under `module.compile()`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 2.0


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               monitor: Monitor | None = None) -> torch.Tensor:  # fmt: skip
    x, y = batch(step)
    loss = nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if monitor is not None:
        monitor.step(loss)
    return loss.detach()


# ---------------------------------------------------------------------- operations


def _roundtrip_pickle(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    return pickle.loads(pickle.dumps(model))


def _torch_save_model(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _deepcopy_optimizer(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    return copy.deepcopy(opt).state_dict()


def _pickle_optimizer(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    return pickle.loads(pickle.dumps(opt)).state_dict()


def _save_optimizer_state(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _swa(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    averaged = torch.optim.swa_utils.AveragedModel(model)
    train_step(model, opt, 50)
    averaged.update_parameters(model)
    return averaged


def _ema_copy(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    ema = copy.deepcopy(model).requires_grad_(False)
    train_step(model, opt, 51)
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 0.1)
    return ema


def _jit_trace(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    traced = torch.jit.trace(model, x)
    return traced.code, traced


def _jit_script(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    scripted = torch.jit.script(model)
    return scripted.code, scripted


def _export(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    exported = torch.export.export(model, (x,))
    return exported.graph_module.code, exported.module()


def _fx(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    traced = torch.fx.symbolic_trace(model)
    return traced.code, traced


def _onnx(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    pytest.importorskip("onnx")
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=False)
    import onnx

    graph = onnx.load_from_string(buffer.getvalue()).graph
    return [(node.op_type, list(node.input), list(node.output)) for node in graph.node]


def _cast(dtype: torch.dtype) -> Operation:
    def cast(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
        model.to(dtype)
        losses = [train_step_cast(model, opt, step, dtype) for step in range(60, 62)]
        return losses, model(x.to(dtype))

    return cast


def train_step_cast(model: nn.Module, opt: Any, step: int, dtype: torch.dtype) -> torch.Tensor:
    x, y = batch(step)
    loss = nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def _functional_call(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    params = {name: p.detach() * 0.5 for name, p in model.named_parameters()}
    return torch.func.functional_call(model, params, (x,))


def _vmap(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    return torch.func.vmap(model)(x.reshape(4, 8, 8))


def _func_grad(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    return sorted(grads.items())


def _checkpoint(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    from torch.utils.checkpoint import checkpoint

    model.zero_grad()
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _parametrize(kind: str) -> Operation:
    def apply(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
        from torch.nn.utils import parametrizations, prune

        if kind == "weight_norm":
            parametrizations.weight_norm(model[0])
        elif kind == "spectral_norm":
            parametrizations.spectral_norm(model[2])
        else:
            prune.l1_unstructured(model[0], "weight", amount=0.5)
        # The optimizer only knows the original parameters: train what it has, as a user's loop would.
        losses = [train_step(model, opt, step) for step in range(70, 72)]
        model.eval()  # spectral_norm's power iteration changes state in training mode
        return losses, model(x)

    return apply


def _eval_without_step(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    model.eval()
    with torch.no_grad():
        return [model(x) for _ in range(3)]


def _add_param_group(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    extra = nn.Linear(1, 1)
    opt.add_param_group({"params": extra.parameters(), "lr": 0.01})
    return [train_step(model, opt, step) for step in range(80, 83)]


def _state_dict_roundtrip(model: nn.Module, opt: Any, x: torch.Tensor) -> Any:
    fresh = make_model(seed=5)
    fresh.load_state_dict(model.state_dict())
    return fresh


OPERATIONS: dict[str, Operation] = {
    "pickle": _roundtrip_pickle,
    "torch_save_model": _torch_save_model,
    "deepcopy_model": lambda model, opt, x: copy.deepcopy(model),
    "deepcopy_optimizer": _deepcopy_optimizer,
    "pickle_optimizer": _pickle_optimizer,
    "save_state_dicts": _save_optimizer_state,
    "swa_averaged_model": _swa,
    "ema_deepcopy": _ema_copy,
    "jit_trace": _jit_trace,
    "jit_script": _jit_script,
    "export": _export,
    "fx_symbolic_trace": _fx,
    "onnx_export": _onnx,
    "half": _cast(torch.float16),
    "bfloat16": _cast(torch.bfloat16),
    "double": _cast(torch.float64),
    "functional_call": _functional_call,
    "vmap": _vmap,
    "func_grad": _func_grad,
    "checkpoint": _checkpoint,
    "weight_norm": _parametrize("weight_norm"),
    "spectral_norm": _parametrize("spectral_norm"),
    "prune": _parametrize("prune"),
    "eval_without_step": _eval_without_step,
    "add_param_group": _add_param_group,
    "load_state_dict": _state_dict_roundtrip,
}


def _outcome(operation: Operation, model: nn.Module, opt: Any, x: torch.Tensor) -> tuple[str, Any]:
    try:
        result = operation(model, opt, x)
        return "ok", (result, _materialise(result, x))
    except Exception as exc:  # compared across the two runs: the same exception type, or none
        return "raised", type(exc).__name__


def _modules_of(value: Any) -> list[nn.Module]:
    """Every module inside a result (a module, a ScriptModule, or tuples/lists of them)."""
    if isinstance(value, nn.Module):
        return list(value.modules())
    if isinstance(value, tuple | list):
        return [m for v in value for m in _modules_of(v)]
    return []


def _materialise(value: Any, x: torch.Tensor) -> Any:
    """A result as plain values, taken right after the operation (a traced module shares the original's
    parameters, which go on training): modules become their output on `x`, tensors detached copies."""
    if isinstance(value, nn.Module):
        dtype = next((p.dtype for p in value.parameters()), x.dtype)
        with torch.no_grad():
            hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in value.modules())
            return ["module", type(value).__name__, hooks, _materialise(value(x.to(dtype)), x)]
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _materialise(v, x) for key, v in value.items()}
    if isinstance(value, tuple | list):
        return [_materialise(v, x) for v in value]
    return value


def _assert_same(plain: Any, watched: Any) -> None:
    """Same structure and text; tensors equal within float tolerance."""
    if isinstance(plain, torch.Tensor):
        torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-6)
    elif isinstance(plain, dict):
        assert plain.keys() == watched.keys()
        for key in plain:
            _assert_same(plain[key], watched[key])
    elif isinstance(plain, list):
        assert len(plain) == len(watched)
        for a, b in zip(plain, watched, strict=True):
            _assert_same(a, b)
    else:
        assert watched == plain


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_operation_behaves_the_same_with_the_agent_attached(name: str, server: ScriptableServer) -> None:
    operation = OPERATIONS[name]
    x, _ = batch(99)
    results = {}
    for watched in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # momentum: optimizer state exists
        monitor = attach(model, opt, server=server.address, run=f"compat-{name}", full_stats_interval=2) \
            if watched else None  # fmt: skip
        for step in range(1, 4):
            train_step(model, opt, step, monitor)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[watched] = _outcome(operation, model, opt, x)
        assert not [w for w in caught if "gradwatch" in str(w.message)], [str(w.message) for w in caught]
        if monitor is not None:
            originals = set(model.modules())
            for module in _modules_of(results[watched][1][0] if results[watched][0] == "ok" else None):
                assert module in originals or not dispatch.is_watched(module)  # a copy carries no agent
            assert dispatch.is_watched(model) and dispatch.is_watched(opt)  # the original stays attached
            before = monitor.step_count
            model.to(torch.float32).train()
            train_step(model, opt, 90, monitor)
            assert monitor.step_count == before + 1
            assert monitor.close(timeout=5)
    assert results[True][0] == results[False][0], results
    if results[False][0] == "raised":
        assert results[True][1] == results[False][1]
    else:
        _assert_same(results[False][1][1], results[True][1][1])


# ---------------------------------------------------------------------- torch.compile


def _compile_counters(agent: bool, how: str, order: str, fullgraph: bool, address: str) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = None
    if agent and order == "attach_then_compile":
        monitor = attach(model, opt, server=address, run="compat-compile", full_stats_interval=2)
    if how == "torch.compile":
        compiled: nn.Module = torch.compile(model, fullgraph=fullgraph)
    else:
        model.compile(fullgraph=fullgraph)
        compiled = model
    if agent and order == "compile_then_attach":
        monitor = attach(model, opt, server=address, run="compat-compile", full_stats_interval=2)
    with warnings.catch_warnings(record=True) as caught:  # the filters in force, as a user's program has them
        losses = [train_step(compiled, opt, step, monitor) for step in range(1, 6)]
    if monitor is not None:
        assert monitor.step_count == 5
        assert monitor.close(timeout=5)
    torch._dynamo.reset()
    return {
        "graph_breaks": dict(counters["graph_break"]),
        "stats": dict(counters["stats"]),
        "recompiles": dict(counters["recompiles"]),
        "warnings": sorted({str(w.message)[:80] for w in caught}),
        "losses": losses,
    }


@pytest.mark.parametrize("fullgraph", [False, True])
@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compile_adds_no_graph_breaks_recompiles_or_warnings(
    how: str, order: str, fullgraph: bool, server: ScriptableServer
) -> None:
    plain = _compile_counters(False, how, order, fullgraph, server.address)
    watched = _compile_counters(True, how, order, fullgraph, server.address)
    assert plain["stats"]["unique_graphs"] >= 1  # it did compile
    losses = watched.pop("losses"), plain.pop("losses")
    assert watched == plain
    torch.testing.assert_close(losses[0], losses[1])


# ---------------------------------------------------------------------- copies elsewhere


def test_a_saved_attached_model_loads_where_gradwatch_cannot_be_imported(
    server: ScriptableServer, tmp_path: Any
) -> None:
    model = make_model()
    opt = torch.optim.Adam(model.parameters())
    monitor = attach(model, opt, server=server.address, run="compat-hidden", full_stats_interval=1)
    for step in range(1, 4):
        train_step(model, opt, step, monitor)
    torch.save(model, tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    with open(tmp_path / "model.pkl", "wb") as f:
        pickle.dump(model, f)
    x, _ = batch(7)
    torch.save(x, tmp_path / "x.pt")
    expected = model(x).detach()
    assert monitor.close(timeout=5)
    code = textwrap.dedent(
        """
        import importlib.abc, pickle, sys
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "gradwatch" or name.startswith("gradwatch."):
                    raise ImportError("gradwatch is hidden in this process")
        sys.meta_path.insert(0, Hide())
        import torch
        folder = sys.argv[1]
        model = torch.load(folder + "/model.pt", weights_only=False)
        with open(folder + "/model.pkl", "rb") as f:
            again = pickle.load(f)
        opt = torch.optim.Adam(model.parameters())
        opt.load_state_dict(torch.load(folder + "/opt.pt"))
        x = torch.load(folder + "/x.pt")
        assert torch.equal(model(x), again(x))
        torch.save(model(x).detach(), folder + "/out.pt")
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
        print(hooks, sorted(n for n in sys.modules if n.startswith("gradwatch")))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "[]"]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)


def test_hogwild_spawn_workers_train_the_shared_attached_model(server: ScriptableServer) -> None:
    from compat_support import hogwild_worker

    model = make_model()
    model.share_memory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compat-hogwild")
    train_step(model, opt, 1, monitor)
    before = [p.detach().clone() for p in model.parameters()]
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=hogwild_worker, args=(model, seed, 5, queue)) for seed in (1, 2)]
    for worker in workers:
        worker.start()
    results = sorted(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert results == [(1, [], 0), (2, [], 0)]  # the workers' models carried no agent and no hooks
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))  # shared memory
    train_step(model, opt, 2, monitor)
    assert monitor.step_count == 2
    assert monitor.close(timeout=5)


# ---------------------------------------------------------------------- one process, several models


def test_two_models_two_optimizers_gan_style(server: ScriptableServer) -> None:
    def run(agent: bool) -> list[torch.Tensor]:
        g, d = make_model(1), make_model(2)
        g_opt, d_opt = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
        monitors = []
        if agent:
            monitors = [attach(g, g_opt, server=server.address, run="compat-gan-g", full_stats_interval=2),
                        attach(d, d_opt, server=server.address, run="compat-gan-d", full_stats_interval=2)]  # fmt: skip
        for step in range(1, 5):
            x, _ = batch(step)
            fake = g(x).expand(-1, 8)
            d_loss = d(x).mean() - d(fake.detach()).mean()
            d_opt.zero_grad()
            d_loss.backward()
            d_opt.step()
            g_loss = d(fake).mean()
            g_opt.zero_grad()
            g_loss.backward()
            g_opt.step()
            for monitor, loss in zip(monitors, (g_loss, d_loss), strict=False):
                monitor.step(loss)
        for monitor in monitors:
            assert monitor.step_count == 4 and monitor.close(timeout=5)
        return [p.detach() for p in (*g.parameters(), *d.parameters())]

    torch.testing.assert_close(run(True), run(False))
    for run_id in ("compat-gan-g", "compat-gan-d"):
        sessions = [k for k in server.servicer.sessions if k[0] == run_id]
        (session,) = sessions
        reports = server.servicer.reports(session[2])
        assert [r.step for r in reports] == [1, 2, 3, 4]
        assert all(r.optimizer_step == r.step for r in reports)  # each monitor saw its own optimizer only


def test_attaching_twice_keeps_one_set_of_hooks_and_says_so(
    server: ScriptableServer, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = attach(model, opt, server=server.address, run="compat-twice")
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        second = attach(model, opt, server=server.address, run="compat-twice")
    assert [r.message for r in caplog.records if "already attached" in r.message]
    entry = dispatch._modules[id(model[0])]
    assert len(entry.post) == 1 and len(dispatch._optimizers[id(opt)].pre) == 1
    train_step(model, opt, 1, second)
    first.step(torch.tensor(1.0))  # the replaced monitor is closed: a no-op
    assert first.step_count == 0 and second.step_count == 1
    assert second.close(timeout=5)
    assert not dispatch.is_watched(model) and not dispatch.is_watched(opt)


def test_a_closed_monitor_does_not_keep_the_model_alive(server: ScriptableServer) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compat-leak")
    train_step(model, opt, 1, monitor)
    assert monitor.close(timeout=5)
    refs = [weakref.ref(model), weakref.ref(model[0])]
    del model, opt
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert monitor.step_count == 1
    assert not torch.nn.modules.module._has_any_global_hook()  # nothing of ours is left in torch either


def test_forwards_without_monitor_step_use_bounded_memory(server: ScriptableServer) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compat-eval", full_stats_interval=1)
    train_step(model, opt, 1, monitor)
    x, _ = batch(2)

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    for _ in range(20):  # grad mode on, no monitor.step(): e.g. an evaluation that forgot no_grad
        model(x)
    after_20 = live_tensors()
    for _ in range(200):
        model(x)
    assert live_tensors() <= after_20
    train_step(model, opt, 3, monitor)
    assert monitor.close(timeout=5)


def test_activation_checkpointing_counts_each_module_once() -> None:
    from torch.utils.checkpoint import checkpoint

    model = make_model()
    names = {"0", "2", "4"}
    for use_reentrant in (False, True):
        tap = ActivationTap(model, names, is_full=lambda: True, add_agent_time=lambda s: None)
        tap.install()
        x, _ = batch(1)
        x.requires_grad_(use_reentrant)  # reentrant checkpointing needs an input that requires grad
        outputs: dict[int, torch.Tensor] = {}
        for index, module in ((0, model[0]), (2, model[2])):
            module.register_forward_hook(
                lambda m, a, out, index=index, outputs=outputs: outputs.setdefault(index, out.detach())
            )
        checkpoint(model, x, use_reentrant=use_reentrant).sum().backward()
        capture = tap.take()
        tap.remove()
        for module in model.modules():
            module._forward_hooks.clear()
        if use_reentrant:  # the first pass runs without grad (not observed), the recomputation in backward
            assert capture is None
            continue
        assert capture is not None and capture.order == [0, 1, 2, 3, 4]
        for index, out in outputs.items():
            torch.testing.assert_close(capture.sums[index], out.sum())  # once, not twice


def test_a_parametrization_after_attach_is_named_once_and_training_goes_on(
    server: ScriptableServer, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compat-weight-norm", full_stats_interval=1)
    train_step(model, opt, 1, monitor)
    torch.nn.utils.parametrizations.weight_norm(model[0])
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for step in range(2, 6):
            train_step(model, opt, step, monitor)
    assert len([r for r in caplog.records if "parameters changed after attach" in r.message]) == 1
    assert monitor.step_count == 5
    assert monitor.close(timeout=5)


def test_two_processes_sharing_a_run_and_rank_are_never_merged(caplog: pytest.LogCaptureFixture) -> None:
    """Hogwild workers that attach with the same run and no ranks: the second session is refused with a
    warning naming the cause, and gets in once the first has ended; the server never mixes their reports."""
    from gradwatch.agent.config import RetryPolicy
    from server_support import start_app
    from wait_support import wait_until

    app = start_app()
    try:
        retry = RetryPolicy(rejected_backoff_s=0.3, initial_backoff_s=0.1)
        first_model, second_model = make_model(1), make_model(2)
        first_opt = torch.optim.SGD(first_model.parameters(), lr=0.05)
        second_opt = torch.optim.SGD(second_model.parameters(), lr=0.05)
        first = attach(first_model, first_opt, server=app.grpc_target, run="compat-shared", retry=retry)
        train_step(first_model, first_opt, 1, first)
        assert wait_until(lambda: first.counters()["acked"] == 1)
        with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
            second = attach(second_model, second_opt, server=app.grpc_target, run="compat-shared", retry=retry)
            for step in range(1, 4):
                train_step(second_model, second_opt, step, second)
            assert wait_until(lambda: second.counters()["rejections"] >= 1)
        assert [r for r in caplog.records if "already streaming from another process" in r.getMessage()]
        [run] = [r for r in app.runs() if r["run"] == "compat-shared"]
        assert run["ranks"][0]["reports"] == 1  # the first session's only
        assert first.close(timeout=5)
        assert second.close(timeout=10)  # let in once the first ended: nothing lost
        [run] = [r for r in app.runs() if r["run"] == "compat-shared"]
        assert run["ranks"][0]["reports"] == 4
    finally:
        app.stop(grace=0)


def test_a_replaced_optimizer_keeps_the_reports_and_their_gradients_right(server: ScriptableServer) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = attach(model, opt, server=server.address, run="compat-new-optimizer")
    train_step(model, opt, 1, monitor)
    replacement = torch.optim.Adam(model.parameters(), lr=1e-3)  # a second training phase
    norms = []
    for step in range(2, 5):
        x, y = batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        replacement.zero_grad()
        loss.backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
        replacement.step()
        monitor.step(loss)
    assert monitor.close(timeout=5)
    sessions = [k for k in server.servicer.sessions if k[0] == "compat-new-optimizer"]
    reports = server.servicer.reports(sessions[0][2])
    assert [r.step for r in reports] == [1, 2, 3, 4]
    assert [r.grad_sum_squares**0.5 for r in reports[1:]] == pytest.approx(norms, rel=1e-5)


def test_a_watched_grad_scaler_pickles_and_copies_without_the_agent(server: ScriptableServer) -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    monitor = attach(model, opt, server=server.address, run="compat-scaler", grad_scaler=scaler)
    x, y = batch(1)
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    monitor.step(torch.tensor(1.0))
    for copied in (pickle.loads(pickle.dumps(scaler)), copy.deepcopy(scaler)):
        assert type(copied.__dict__.get("step", copied.step).__self__) is torch.amp.GradScaler
        assert copied.state_dict() == scaler.state_dict()
        copied.scale(nn.functional.mse_loss(model(x), y)).backward()
        copied.step(opt)  # the copy's own step: works, and the agent does not see it
    assert monitor.step_count == 1
    assert monitor.close(timeout=5)
    assert "step" not in scaler.__dict__  # close() restored the watched scaler


def test_with_accumulation_a_replaced_optimizer_is_named_once_and_steps_are_reported(
    server: ScriptableServer, caplog: pytest.LogCaptureFixture
) -> None:
    from gradwatch.agent.monitor import MAX_MICRO_STEPS

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = attach(model, opt, server=server.address, run="compat-accumulate-replaced", grad_accumulation=True)
    train_step(model, opt, 1, monitor)
    replacement = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for step in range(MAX_MICRO_STEPS + 5):
            train_step(model, replacement, step, monitor)
    assert len([r for r in caplog.records if "without a step of the optimizer" in r.getMessage()]) == 1
    assert monitor.step_count == 1 + 1 + 5  # the first, the one that folded the long run, then one per step()
    assert monitor.close(timeout=5)
