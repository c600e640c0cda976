"""NaN provenance from one multi-tensor reduction per forward: exact against a reference taken when each module
returns, under in-place writes after modules, early flushes and full-statistics steps; and a constant number of
device operations per ordinary step whatever the model's size."""

from __future__ import annotations

import collections
from typing import Any

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from agent_support import Emitter, ScriptableServer  # noqa: E402
from gradwatch.agent import activations  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.agent.update_cadence import WARM_STEPS, update_due  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

WIDTH = 8
#: What follows each block's module, every step: nothing, an in-place add of a functional tensor (a residual),
#: an in-place ReLU module, an in-place clean-up (nan_to_num_), an in-place masked write.
AFTER = ("none", "add_", "relu_", "clean_", "masked_")


class _Chain(nn.Module):
    def __init__(self, after: list[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Emitter(WIDTH) for _ in after)
        self.relus = nn.ModuleList(nn.ReLU(inplace=True) for _ in after)
        self.after = after
        self.added: dict[int, float] = {}  # block -> value written in place after it, this step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (block, kind) in enumerate(zip(self.blocks, self.after, strict=True)):
            h = block(h)
            if kind == "add_":
                h.add_(torch.full_like(h, self.added.get(i, 0.0)) * 0.5)
            elif kind == "relu_":
                h = self.relus[i](h)
            elif kind == "clean_":
                h.nan_to_num_(0.0, 0.0, 0.0)
            elif kind == "masked_":
                h.masked_fill_(h > 1e30, 1.0)
        return h


def _reference(model: _Chain) -> tuple[list[Any], list[tuple[str, bool]]]:
    """Hooks stored on the modules that record, when each returns, whether its output is all finite."""
    seen: list[tuple[str, bool]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Emitter | nn.ReLU):

            def hook(m: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                if torch.is_grad_enabled():
                    seen.append((name, bool(torch.isfinite(out).all())))

            handles.append(module.register_forward_hook(hook))
    return handles, seen


@settings(max_examples=30, deadline=None)
@given(
    after=st.lists(st.sampled_from(AFTER), min_size=2, max_size=5),
    poison_step=st.integers(1, 4),
    poison_block=st.integers(0, 4),
    poison_kind=st.sampled_from(("emit", "after")),
    value=st.sampled_from((float("nan"), float("inf"), float("-inf"))),
    interval=st.sampled_from((1, 3, 100)),
    calls_bound=st.sampled_from((2, 3, activations.PENDING_CALLS)),
    forwards=st.sampled_from(((0,), (0, 1), (1, 0), (1, 1))),
)
# Two forwards per step with early flushes: the learning report kept nothing at the end of its first forward, so an
# ordinary report's second forward once counted on from the first's calls and flushed after the in-place write.
@example(after=["add_", "add_"], poison_step=2, poison_block=0, poison_kind="after", value=float("nan"), interval=3,
         calls_bound=2, forwards=(0, 1))  # fmt: skip
def test_first_non_finite_module_matches_a_reference_taken_when_modules_return(
    after: list[str], poison_step: int, poison_block: int, poison_kind: str, value: float, interval: int,
    calls_bound: int, forwards: tuple[int, ...],
) -> None:  # fmt: skip
    """`forwards`: the forwards of each step (two: gradient accumulation), 1 where the poisoned step poisons it."""
    poison_block %= len(after)
    if poison_kind == "after" and after[poison_block] != "add_":
        poison_kind = "emit"  # only a block followed by an in-place add every step can have a value added after it
    model = _Chain(after)
    expected: list[str | None] = []
    saved_bound = activations.PENDING_CALLS
    activations.PENDING_CALLS = calls_bound  # early flushes, several per forward
    handles, seen = _reference(model)
    try:
        with ScriptableServer() as server:
            monitor = attach(model, None, server=server.address, run="provenance", full_stats_interval=interval,
                             overhead_budget=0)  # fmt: skip
            for step in range(1, 6):
                seen.clear()
                for poisons in forwards:
                    poisoned = step == poison_step and poisons
                    model.blocks[poison_block].poison = value if poisoned and poison_kind == "emit" else None
                    model.added = {poison_block: value} if poisoned and poison_kind == "after" else {}
                    model(torch.randn(4, WIDTH)).sum().backward()
                model.zero_grad()
                monitor.step()
                # The agent names the first module, in order of first call, with a non-finite output in any call.
                broken = {name for name, finite in seen if not finite}
                expected.append(next((name for name, _ in seen if name in broken), None))
            assert monitor.close(timeout=5)
            names = list(server.servicer.of_kind("hello")[0].hello.activation_schema.names)
            got = [names[r.first_non_finite_module] if r.non_finite & pb.NON_FINITE_FLAG_ACTIVATION else None
                   for r in server.servicer.reports()]  # fmt: skip
    finally:
        activations.PENDING_CALLS = saved_bound
        for handle in handles:
            handle.remove()
    assert got == expected


def test_an_output_written_in_place_is_reduced_when_its_module_returns_from_then_on() -> None:
    """A write after a module that first happens on an ordinary step: that step still reports the non-finite
    value (named at the written module), and from the next step on the module is reduced when it returns, so a
    value written after it is named at the module that emitted it."""
    model = _Chain(["none", "none", "none"])
    writes = {"on": False}
    original = model.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = model.blocks[0](x)
        if writes["on"]:
            h.add_(float("nan"))  # born after blocks.0 returned; blocks.1 is the first to emit it
        return model.blocks[2](model.blocks[1](h))

    model.forward = forward  # type: ignore[method-assign]
    with ScriptableServer() as server:
        monitor = attach(model, None, server=server.address, run="dynamic", full_stats_interval=100,
                         overhead_budget=0)  # fmt: skip
        for step in range(1, 5):
            writes["on"] = step >= 3
            model(torch.randn(4, WIDTH)).sum().backward()
            monitor.step()
        assert monitor.close(timeout=5)
        names = list(server.servicer.of_kind("hello")[0].hello.activation_schema.names)
        reports = server.servicer.reports()
    model.forward = original  # type: ignore[method-assign]
    got = [names[r.first_non_finite_module] if r.non_finite & pb.NON_FINITE_FLAG_ACTIVATION else None
           for r in reports]  # fmt: skip
    assert got == [None, None, "blocks.0", "blocks.1"]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _mlp(modules: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) if i % 2 == 0 else nn.ReLU() for i in range(modules)])


@pytest.mark.parametrize("modules", [10, 100])
def test_ordinary_steps_launch_a_constant_number_of_device_operations(modules: int) -> None:
    x, y = torch.randn(8, 16), torch.randn(8, 16)

    def step(model: nn.Module, opt: torch.optim.Optimizer, monitor: Any) -> collections.Counter[str]:
        with _Count() as count:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(loss)
        return count.ops

    model = _mlp(modules)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step(model, opt, None)
    bare = step(model, opt, None)
    with ScriptableServer() as server:
        monitor = attach(model, opt, server=server.address, run="ops", full_stats_interval=1000, overhead_budget=0)
        for _ in range(3):
            step(model, opt, monitor)
        update = step(model, opt, monitor)  # step 4: measures the update ratio (update_cadence.WARM_STEPS)
        for _ in range(5, WARM_STEPS + 1):
            step(model, opt, monitor)
        agent = step(model, opt, monitor)  # step 17: ordinary (no update ratio, no checksum, no full statistics)
        assert monitor.close(timeout=5)
    assert not update_due(WARM_STEPS + 1) and (WARM_STEPS + 1) % 2 == 1  # the checksum's interval is a power of 2
    added = agent.copy()
    added.subtract(bare)
    # Gradient norms (one foreach launch), the outputs' provenance (one foreach launch), the loss (detach, copy).
    assert sum(added.values()) <= 12, added
    assert +added == collections.Counter({"_foreach_norm": 2, "detach": 1, "_to_copy": 1}), added
    # An update-ratio step adds views of each parameter (no kernel) and a constant number of kernel launches.
    launched = update.copy()
    launched.subtract(bare)
    for view in ("detach", "view"):
        launched.pop(view, None)
    assert sum(launched.values()) <= 12, launched
