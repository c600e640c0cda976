"""Hugging Face Trainer: the callback with a tiny locally built model (nothing downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from agent_support import ScriptableServer  # noqa: E402
from gradwatch.integrations.huggingface import GradwatchCallback  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.net(x)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
            self.losses.append(float(result["loss"].detach()))
        return result


class _Data(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.x[i].sum().sin().reshape(1)}


@pytest.fixture
def server() -> Iterator[ScriptableServer]:
    with ScriptableServer() as s:
        yield s


def test_huggingface_callback_reports_each_optimizer_step_with_its_mean_loss(
    server: ScriptableServer, tmp_path: Path
) -> None:
    model = _Tiny()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, run_name="hf-run",
    )  # fmt: skip
    callback = GradwatchCallback(server=server.address, full_stats_interval=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[callback])
    trainer.train()
    assert callback.monitor is None  # closed at the end of training
    reports = server.servicer.reports()
    assert [(r.step, r.optimizer_step) for r in reports] == [(i, i) for i in range(1, 5)]
    for report, pair in zip(reports, zip(model.losses[::2], model.losses[1::2], strict=True), strict=True):
        assert report.loss == pytest.approx(sum(pair) / 2, rel=1e-5)
    assert all(r.grad_sum_squares > 0 for r in reports)
    hello = server.servicer.of_kind("hello")[0].hello
    assert hello.run_id == "hf-run" and list(hello.schema.names) == ["net.0", "net.2"]


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(4))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        labels = self.ids[i].clone()
        labels[: int(i % 5)] = -100  # uneven token counts per sample: per-batch and per-step means differ
        return {"input_ids": self.ids[i], "labels": labels}


@pytest.mark.parametrize("accumulation", [1, 4])
def test_huggingface_callback_reports_the_loss_the_trainer_logs(
    server: ScriptableServer, tmp_path: Path, accumulation: int
) -> None:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)  # randomly initialised: nothing downloaded
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_strategy="steps", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, run_name=f"hf-gpt2-{accumulation}",
    )  # fmt: skip
    callback = GradwatchCallback(server=server.address, full_stats_interval=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[callback])
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    reports = server.servicer.reports()
    assert len(logged) == 3 and [r.step for r in reports] == [1, 2, 3]
    assert [r.loss for r in reports] == pytest.approx(logged, rel=1e-4)
