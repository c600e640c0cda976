"""PyTorch Lightning: the callback in a real Trainer with a tiny local model (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from gradwatch.agent import clip as clip_module  # noqa: E402
from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.losses: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def test_lightning_callback_reports_once_per_optimizer_step_with_accumulation(server: ScriptableServer) -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=8)
    module = _Tiny()
    callback = GradwatchCallback(server=server.address, run="lightning", full_stats_interval=2)
    trainer = pl.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", callbacks=[callback],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    assert callback.monitor is None  # closed at the end of fit
    reports = server.servicer.reports()
    assert [(r.step, r.optimizer_step, r.micro_steps) for r in reports] == [(i, i, 2) for i in range(1, 5)]
    for report, pair in zip(reports, zip(module.losses[::2], module.losses[1::2], strict=True), strict=True):
        assert report.loss == pytest.approx(sum(pair) / 2, rel=1e-5)  # the mean over the accumulated batches
    assert [r.HasField("layers") for r in reports] == [False, True, False, True]
    hello = server.servicer.of_kind("hello")[0].hello
    assert list(hello.schema.names) == ["net.0", "net.2"] and hello.world_size == 1


class _Recording(_Tiny):
    """Records the gradient norm the optimizer applies: after Lightning's clipping, just before the update."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[float] = []

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        nn.functional.mse_loss(self.net(x), y)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:  # fmt: skip
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.applied.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_lightning_callback_reports_the_gradients_the_optimizer_applies(
    server: ScriptableServer, accumulate: int, clip: float | None, tmp_path: Path
) -> None:
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(3)) * 3
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    module = _Recording()
    callback = GradwatchCallback(server=server.address, run="lightning-grads", full_stats_interval=2)
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=accumulate, gradient_clip_val=clip,
                         val_check_interval=2 * accumulate, limit_val_batches=2, num_sanity_val_steps=0,
                         accelerator="cpu", callbacks=[callback], logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    clip_module._latest[0] = {}
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    # Clipping went through gradwatch.clip_grad_norm_ (it keeps its norms for the agent), and only during fit.
    assert bool(clip_module.offered()) == (clip is not None)
    assert "clip_grad_by_norm" not in vars(trainer.precision_plugin)
    assert list(tmp_path.rglob("*.ckpt"))  # Lightning's checkpoints of the attached module were written
    reports = server.servicer.reports()
    assert len(module.applied) == 6 and [r.optimizer_step for r in reports] == list(range(1, 7))
    reported = [r.grad_sum_squares**0.5 for r in reports]
    assert reported == pytest.approx(module.applied, rel=1e-4)
    if clip is not None:
        assert max(reported) <= clip * (1 + 1e-4)  # what the optimizer applied: clipped
