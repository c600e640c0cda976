"""PyTorch Lightning: the callback in a real Trainer with a tiny local model (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
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
