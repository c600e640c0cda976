"""The Hugging Face Trainer's own gradient-norm pass feeds the agent: while a GradwatchCallback trains,
`Accelerator.clip_grad_norm_` returns and clips exactly as accelerate's, keeps its per-gradient norms, and the
agent reads no gradient for its norm column."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from clip_support import MAX_NORMS, PARAM_SPECS, POISON, SCALES, make_params  # noqa: E402
from gradwatch.agent import clip, stats  # noqa: E402
from gradwatch.agent.schema import build_layout  # noqa: E402
from gradwatch.agent.stats import StatsEngine  # noqa: E402
from gradwatch.integrations import huggingface  # noqa: E402
from gradwatch.integrations.huggingface import GradwatchCallback  # noqa: E402


@pytest.fixture(scope="module")
def accelerator() -> Any:
    return accelerate.Accelerator(cpu=True)


@contextlib.contextmanager
def _routing() -> Iterator[None]:
    """The state between a callback's on_train_begin and on_train_end."""
    callback = GradwatchCallback()
    huggingface._route_clip(callback)
    try:
        yield
    finally:
        huggingface._unroute_clip(callback)
    assert accelerate.Accelerator.clip_grad_norm_ is huggingface._replaced[0]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(nan=7.0), b.nan_to_num(nan=7.0))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    specs=PARAM_SPECS,
    max_norm=MAX_NORMS,
    norm_type=st.sampled_from((2, 2.0, 1.0, math.inf)),
    scale=SCALES,
    poison=POISON,
)
def test_the_routed_clip_returns_and_clips_exactly_as_accelerate(
    accelerator: Any, seed: int, specs: list[tuple[tuple[int, ...], torch.dtype, bool]],
    max_norm: float, norm_type: float, scale: float, poison: int | None,
) -> None:  # fmt: skip
    ours, theirs = make_params(seed, specs, scale, poison), make_params(seed, specs, scale, poison)
    before = [None if p.grad is None else p.grad.clone() for p in ours]
    clip._latest[0] = {}

    def call(function: Any, params: list[nn.Parameter]) -> Any:
        try:
            return function(accelerator, (p for p in params), max_norm, norm_type)  # the Trainer passes a generator
        except Exception as exc:  # torch refuses some inputs (an empty tensor's inf-norm): so must we
            return exc

    with _routing():
        assert accelerate.Accelerator.clip_grad_norm_ is huggingface._clip_grad_norm_
        got = call(accelerate.Accelerator.clip_grad_norm_, ours)
    want = call(huggingface._replaced[0], theirs)
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
        return
    assert _same(got, want)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert _same(a.grad, b.grad) and a.grad._version == b.grad._version  # scaled exactly when theirs was
    offer = clip.offered()
    if norm_type != 2 or all(g is None for g in before):  # accelerate's own path: nothing kept
        assert offer == {}
        return
    for p, grad in zip(ours, before, strict=True):
        if p.grad is None or p.grad.dtype == torch.float16:
            assert p.grad is None or id(p.grad) not in offer
            continue
        norm, coefficient, ref, version = offer[id(p.grad)]
        assert ref() is p.grad and version == p.grad._version
        assert _same(norm, torch._foreach_norm([grad], 2.0)[0])
        if max_norm == math.inf:
            assert coefficient is None  # not scaled: the norms are the applied gradients' as they are
        else:
            assert _same(coefficient, torch.clamp(max_norm / (want + 1e-6), max=1.0))


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("max_norm", [0.05, math.inf])
def test_the_agent_reads_no_gradient_after_the_routed_clip(accelerator: Any, max_norm: float) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = StatsEngine(build_layout(model, 1))
    model(torch.randn(5, 6)).square().sum().mul(100).backward()
    with _routing():
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
    with _Ops() as ops:
        norms = engine.compute("grad", False)
    assert not [n for n in ops.names if "norm" in n]  # no pass over the gradients
    assert ops.names.count("_foreach_mul.Tensor") == (0 if max_norm == math.inf else 1)
    after = [torch.linalg.vector_norm(p.grad) for p in model.parameters()]
    torch.testing.assert_close(norms, after, rtol=1e-6, atol=0)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


class _Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) * 4

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.x[i].sum().reshape(1) * 3}


def _train(tmp_path: Path, max_grad_norm: float, callback: GradwatchCallback | None) -> tuple[_Tiny, list[float]]:
    model = _Tiny()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=8, learning_rate=0.05,
        max_grad_norm=max_grad_norm, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="steps",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, run_name="hf-clip", seed=5,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   callbacks=[callback] if callback else [])  # fmt: skip
    trainer.train()
    return model, [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]


@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])  # clipping, and the Trainer's unclipped norm (max_norm inf)
def test_a_trainer_with_the_callback_trains_exactly_as_without_and_the_agent_uses_its_norms(
    tmp_path: Path, max_grad_norm: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[bool] = []
    measured = stats._clipped_norms

    def spy(grads: list[torch.Tensor]) -> list[torch.Tensor] | None:
        result = measured(grads)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(stats, "_clipped_norms", spy)
    plain_model, plain_norms = _train(tmp_path / "plain", max_grad_norm, None)
    assert not taken  # no agent, no routing
    with ScriptableServer() as server:
        callback = GradwatchCallback(server=server.address, overhead_budget=0)
        model, norms = _train(tmp_path / "watched", max_grad_norm, callback)
        reports = server.servicer.reports()
    assert accelerate.Accelerator.clip_grad_norm_ is huggingface._replaced[0]  # put back at the end of training
    # The Trainer clipped (or only measured) exactly as without gradwatch: same logged norms, same weights.
    assert norms == plain_norms and len(norms) == 5
    if max_grad_norm:
        assert max(norms) > max_grad_norm  # it did clip
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
    # Every optimizer step's gradient norms came from the Trainer's pass, and they are the applied gradients'.
    assert taken and all(taken) and len(reports) == 5
    applied = [min(n, max_grad_norm) if max_grad_norm else n for n in norms]
    assert [r.grad_sum_squares**0.5 for r in reports] == pytest.approx(applied, rel=1e-4)
