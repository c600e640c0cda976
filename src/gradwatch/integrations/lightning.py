"""PyTorch Lightning: a callback that monitors the LightningModule being fitted.

    trainer = pl.Trainer(callbacks=[GradwatchCallback(server="gradwatch:50051", run="my-run")])

Contract
- At `on_fit_start` it attaches to the LightningModule and the trainer's first optimizer, with rank, world
  size and local rank from the trainer, `grad_accumulation=True` when `accumulate_grad_batches` > 1, and the
  precision plugin's GradScaler when there is one (16-bit mixed precision), so skipped steps are reported.
- Gradients are those the optimizer applies: Lightning steps with `optimizer.step(closure)`, and the agent reads
  the gradients of a step with a closure after it ran (agent/hooks.py), i.e. after backward, accumulation and
  Lightning's gradient clipping, never the previous step's.
- When the trainer clips by norm (`gradient_clip_val`, algorithm "norm"), its precision plugin clips with
  `gradwatch.clip_grad_norm_` for the duration of fit (same arguments, same result as torch's, agent/clip.py): the
  agent takes its gradient norms from that pass instead of a second one. Plugins that clip their own way (their
  class overrides `clip_grad_by_norm`: FSDP, DeepSpeed) are left alone.
- Every training batch ends with `monitor.step(loss)` (the loss from the step's output, un-normalised
  when Lightning divided it by `accumulate_grad_batches`); at the end of fit (or on an exception) it closes
  the monitor within `close_timeout_s`.
- With `on_alert="flag"` or `"raise"`, a critical alert sets `trainer.should_stop`: Lightning stops at the
  end of the step, checkpoint callbacks included.
- Any other keyword is a `gradwatch.attach` option, checked at `on_fit_start` (attach's ValueError).
"""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision

from gradwatch.agent.clip import clip_grad_norm_
from gradwatch.agent.monitor import Monitor, attach

__all__ = ["GradwatchCallback"]


class GradwatchCallback(pl.Callback):
    """Streams the fitted module's training health to a gradwatch server (see the module docstring)."""

    def __init__(self, *, close_timeout_s: float = 5.0, **options: Any) -> None:
        super().__init__()
        self._options = options
        self._close_timeout_s = close_timeout_s
        self.monitor: Monitor | None = None
        self._clipping: Precision | None = None  # the plugin that clips with gradwatch.clip_grad_norm_

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = dict(self._options)
        options.setdefault("rank", trainer.global_rank)
        options.setdefault("world_size", trainer.world_size)
        options.setdefault("local_rank", trainer.local_rank)
        if trainer.accumulate_grad_batches > 1:
            options.setdefault("grad_accumulation", True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler):
            options.setdefault("grad_scaler", scaler)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor = attach(pl_module, optimizer, **options)
        plugin = trainer.precision_plugin
        if type(plugin).clip_grad_by_norm is Precision.clip_grad_by_norm and "clip_grad_by_norm" not in vars(plugin):
            plugin.clip_grad_by_norm = functools.partial(_clip_grad_by_norm, plugin)  # type: ignore[method-assign]
            self._clipping = plugin

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            loss = None
        elif trainer.accumulate_grad_batches > 1:  # Lightning hands over loss / accumulate_grad_batches
            loss = loss.detach() * trainer.accumulate_grad_batches
        self.monitor.step(loss)
        if self.monitor.stop_requested:
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        plugin, self._clipping = self._clipping, None
        if plugin is not None:
            vars(plugin).pop("clip_grad_by_norm", None)  # the class's method again
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close(timeout=self._close_timeout_s)


def _clip_grad_by_norm(plugin: Precision, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
    """`Precision.clip_grad_by_norm` with gradwatch's drop-in for torch's clip_grad_norm_."""
    clip_grad_norm_(plugin.main_params(optimizer), clip_val)
