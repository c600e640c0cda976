"""NaN provenance on generated module trees: the module the agent names is the one a from-scratch check names.

The models are programs drawn by hypothesis: Linear layers that can emit a non-finite value, contracting
activations (in place or not, one instance reused at several places, applied to a module's output or to a tensor
written since), containers that own a parameter and return their child's output as it is, a view of it, a slice
of it or their own input, in-place writes between modules (a residual add that can bring a non-finite value, a
clean-up that removes one, a masked write), views and functional copies between modules, one or two forwards per
step, early flushes, full-statistics reports. The reference: hooks stored on the modules (test only) that record,
as each call returns, whether its output is all finite; the expected name is the first module, in order of first
call over the step, with a non-finite output in any call. And the view check behind "an output made of elements of
the last output": sound on generated view chains of one base.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from agent_support import Emitter, ScriptableServer  # noqa: E402
from gradwatch.agent import activations  # noqa: E402
from gradwatch.agent.monitor import attach  # noqa: E402
from gradwatch.v1 import gradwatch_pb2 as pb  # noqa: E402

WIDTH = 6
STEPS = 5
#: Activation instances a model draws from (an op names one by index, so an instance can be called in many places).
ACTIVATIONS = (
    lambda: nn.ReLU(), lambda: nn.ReLU(inplace=True), lambda: nn.LeakyReLU(0.2, inplace=True), lambda: nn.Tanh(),
    lambda: nn.GELU(), lambda: nn.Hardtanh(-2.0, 2.0, inplace=True), lambda: nn.SiLU(inplace=True),
    lambda: nn.ELU(inplace=True), lambda: nn.Sigmoid(),
)  # fmt: skip
#: What a container returns: its child's output itself, a same-shape view of it, its first rows (a slice), a
#: reshaped view (flattened and back), or its own input (the child's output dropped).
WRAP_MODES = ("same", "view", "rows", "reshape", "input")
#: Functional code between modules: in-place add (a residual; the poisoned step adds the poison), in-place
#: clean-up, in-place masked write, a same-shape view, a transposed-twice view, an out-of-place add.
BETWEEN = ("add_", "clean_", "masked_", "view", "tt", "add")


class Wrap(nn.Module):
    """A container that owns a parameter (so it is a watched layer) and returns what `mode` says."""

    def __init__(self, child: nn.Module, mode: str) -> None:
        super().__init__()
        self.child = child
        self.mode = mode
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.child(x)
        if self.mode == "same":
            return out
        if self.mode == "view":
            return out.view(out.shape)
        if self.mode == "rows":
            return out[:2]
        if self.mode == "reshape":
            return out.view(-1).view(out.shape)
        return x


class Program(nn.Module):
    """Runs `ops`: ("emit", i), ("act", k), ("wrap", i) (modules by index) and ("between", kind, i)."""

    def __init__(self, ops: list[tuple[Any, ...]], pool: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.acts = nn.ModuleList(ACTIVATIONS[k]() for k in pool)
        self.layers = nn.ModuleList()
        self.ops: list[tuple[Any, ...]] = []
        for op in ops:
            if op[0] == "emit":
                self.layers.append(Emitter(WIDTH))
                self.ops.append(("layer", len(self.layers) - 1))
            elif op[0] == "wrap":
                inner: nn.Module = Emitter(WIDTH) if op[2] is None else self.acts[op[2] % len(self.acts)]
                self.layers.append(Wrap(inner, op[1]))
                self.ops.append(("layer", len(self.layers) - 1))
            else:
                self.ops.append(op)
        self.added: dict[int, float] = {}  # op position -> value the in-place or functional add brings, this step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for position, op in enumerate(self.ops):
            if op[0] == "layer":
                h = self.layers[op[1]](h)
            elif op[0] == "act":
                h = self.acts[op[1] % len(self.acts)](h)
            elif op[1] == "add_":
                h.add_(torch.full_like(h, self.added.get(position, 0.0)))
            elif op[1] == "add":
                h = h + self.added.get(position, 0.0)
            elif op[1] == "clean_":
                h.nan_to_num_(0.0, 0.0, 0.0)
            elif op[1] == "masked_":
                h.masked_fill_(h > 1e30, 1.0)
            elif op[1] == "view":
                h = h.view(h.shape)
            else:
                h = h.t().t()
        return h


def _emitters(model: Program) -> list[Emitter]:
    return [m for m in model.modules() if isinstance(m, Emitter)]


def _reference(model: Program) -> tuple[list[Any], list[tuple[str, bool]]]:
    """Test-only hooks on every module the agent watches: (name, all finite) as each call returns."""
    seen: list[tuple[str, bool]] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) or isinstance(module, activations.ACTIVATION_TYPES):

            def hook(m: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                if torch.is_grad_enabled():
                    seen.append((name, bool(torch.isfinite(out).all())))

            handles.append(module.register_forward_hook(hook))
    return handles, seen


@st.composite
def programs(draw: st.DrawFn) -> tuple[list[tuple[Any, ...]], list[int]]:
    pool = draw(st.lists(st.integers(0, len(ACTIVATIONS) - 1), min_size=1, max_size=3))
    ops: list[tuple[Any, ...]] = [("emit",)]
    for _ in range(draw(st.integers(1, 9))):
        kind = draw(st.sampled_from(("emit", "act", "act", "wrap", "between", "between")))
        if kind == "emit":
            ops.append(("emit",))
        elif kind == "act":
            ops.append(("act", draw(st.integers(0, 2))))
        elif kind == "wrap":
            ops.append(("wrap", draw(st.sampled_from(WRAP_MODES)), draw(st.sampled_from((None, 0, 1, 2)))))
        else:
            ops.append(("between", draw(st.sampled_from(BETWEEN))))
    return ops, pool


@settings(max_examples=60, deadline=None)
@given(
    program=programs(),
    poison_step=st.integers(1, STEPS - 1),
    poison_at=st.integers(0, 20),
    value=st.sampled_from((float("nan"), float("inf"), float("-inf"))),
    interval=st.sampled_from((1, 3, 100)),
    calls_bound=st.sampled_from((2, 3, activations.PENDING_CALLS)),
    forwards=st.sampled_from(((1,), (0, 1), (1, 0))),
    sum_alone=st.sampled_from((0, activations.SUM_ALONE_BYTES)),
)
# A reused activation called first before the poisoned layer: the activation comes first in forward order.
@example(program=([("emit",), ("act", 0), ("emit",), ("act", 0)], [0]), poison_step=1, poison_at=1, value=float("nan"),
         interval=100, calls_bound=activations.PENDING_CALLS, forwards=(1,), sum_alone=0)  # fmt: skip
# A residual add brings the value between a layer and the activation applied to its (same) output tensor.
@example(program=([("emit",), ("between", "add_"), ("act", 0)], [0]), poison_step=2, poison_at=1, value=float("inf"),
         interval=100, calls_bound=activations.PENDING_CALLS, forwards=(1,), sum_alone=0)  # fmt: skip
# A later call of a reused activation, written in place after it returns every step: learned on the first report.
@example(program=([("emit",), ("act", 0), ("emit",), ("between", "add"), ("act", 0), ("between", "add_")], [0]),
         poison_step=2, poison_at=3, value=float("nan"), interval=100, calls_bound=activations.PENDING_CALLS,
         forwards=(1,), sum_alone=0)  # fmt: skip
def test_named_module_equals_a_from_scratch_check_on_generated_trees(
    program: tuple[list[tuple[Any, ...]], list[int]], poison_step: int, poison_at: int, value: float, interval: int,
    calls_bound: int, forwards: tuple[int, ...], sum_alone: int,
) -> None:  # fmt: skip
    """`poison_at` picks an emitter or an add among the program's ops; `forwards`: 1 where the poisoned step
    poisons that forward (two forwards: gradient accumulation); `sum_alone` 0: every kept output summed alone."""
    model = Program(*program)
    emitters = _emitters(model)
    adds = [p for p, op in enumerate(model.ops) if op[0] == "between" and op[1] in ("add_", "add")]
    targets: list[Any] = [*emitters, *adds]
    target = targets[poison_at % len(targets)]
    expected: list[str | None] = []
    saved = activations.PENDING_CALLS, activations.SUM_ALONE_BYTES
    activations.PENDING_CALLS = calls_bound  # early flushes, several per forward
    activations.SUM_ALONE_BYTES = sum_alone
    handles, seen = _reference(model)
    try:
        with ScriptableServer() as server:
            monitor = attach(model, None, server=server.address, run="trees", full_stats_interval=interval,
                             overhead_budget=0)  # fmt: skip
            for step in range(1, STEPS + 1):
                seen.clear()
                for poisons in forwards:
                    poisoned = step == poison_step and poisons
                    for emitter in emitters:
                        emitter.poison = value if poisoned and emitter is target else None
                    model.added = {target: value} if poisoned and isinstance(target, int) else {}
                    model(torch.randn(4, WIDTH))  # no backward: in-place writes after tanh are fine
                model.zero_grad()
                monitor.step()
                broken = {name for name, finite in seen if not finite}
                expected.append(next((name for name, _ in seen if name in broken), None))
            assert monitor.close(timeout=5)
            names = list(server.servicer.of_kind("hello")[0].hello.activation_schema.names)
            got = [names[r.first_non_finite_module] if r.non_finite & pb.NON_FINITE_FLAG_ACTIVATION else None
                   for r in server.servicer.reports()]  # fmt: skip
    finally:
        activations.PENDING_CALLS, activations.SUM_ALONE_BYTES = saved
        for handle in handles:
            handle.remove()
    assert got == expected


def _apply(t: torch.Tensor, ops: list[tuple[str, int]]) -> torch.Tensor:
    """A chain of view operations (each skipped where it does not apply to the tensor's shape)."""
    for name, k in ops:
        if t.dim() == 0:
            break
        d = k % t.dim()
        n = t.shape[d]
        if name == "slice" and n > 1:
            t = t.narrow(d, k % n, max(1, n - k % n - 1))
        elif name == "step" and n > 1:
            t = t.select(d, 0).unsqueeze(d) if k % 3 == 0 else t[(slice(None),) * d + (slice(None, None, 2),)]
        elif name == "t" and t.dim() >= 2:
            t = t.transpose(d, (d + 1) % t.dim())
        elif name == "flat" and t.is_contiguous():
            t = t.view(-1)
        elif name == "split" and t.dim() == 1 and n % 2 == 0:
            t = t.view(2, n // 2)
        elif name == "expand":
            t = t.unsqueeze(0).expand(2, *t.shape)
        elif name == "strided":  # two slots anywhere in the storage, possibly outside `t`
            offset, stride = t.storage_offset() + k % 2, k % 3
            if offset + stride < t.untyped_storage().nbytes() // t.element_size():
                t = t.as_strided((2,), (stride,), offset)
    return t


VIEW_OPS = st.lists(st.tuples(st.sampled_from(("slice", "step", "t", "flat", "split", "expand", "strided")),
                              st.integers(0, 7)), max_size=4)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), kept_ops=VIEW_OPS, out_ops=VIEW_OPS,
       from_kept=st.booleans(), reinterpret=st.booleans())  # fmt: skip
def test_an_output_taken_as_part_of_the_last_one_has_only_its_elements(
    shape: list[int], kept_ops: list[tuple[str, int]], out_ops: list[tuple[str, int]], from_kept: bool,
    reinterpret: bool,
) -> None:  # fmt: skip
    """`_within(x, t)` (an output implied by the last one) only where every element of `x` is an element of `t`:
    the base holds each storage slot's own index, so the values are the slots. Views of the base or of `t`,
    slices, steps, transposes, expands, `as_strided` (reaching slots outside `t`), a dtype reinterpretation."""
    base = torch.arange(float(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
    t = _apply(base, kept_ops)
    x = _apply(t if from_kept else base, out_ops)
    if reinterpret and x.is_contiguous() and x.numel():
        x = x.view(torch.int64)
    if activations._within(x, t):
        assert x.dtype == t.dtype
        assert set(x.flatten().tolist()) <= set(t.flatten().tolist())
