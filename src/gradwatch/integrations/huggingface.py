"""Hugging Face Transformers: a TrainerCallback that monitors the model a `Trainer` trains.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[GradwatchCallback(server="gradwatch:50051")])

Contract
- At `on_train_begin` it attaches to the model and the (unwrapped) optimizer, with rank, world size and
  local rank from the TrainingArguments; the run id defaults to `args.run_name` (else GRADWATCH_RUN, else
  attach's default).
- The loss: the Trainer does not hand it to callbacks, so a forward hook (a process-wide one filtered to the
  model, gradwatch.agent.dispatch: nothing is stored on the model) keeps the `loss` of each training
  forward's output (a model called with labels returns one); `on_step_end`, once per optimizer step, reports
  it on the Trainer's own scale, the value the Trainer logs as `loss` for that step: the sum over the step's
  micro-batches when the forward was given `num_items_in_batch` (the model then normalised each micro-batch's
  loss by the whole step's token count), else their mean. A model whose loss is computed outside its forward
  (`compute_loss_func`) is reported without a loss; everything else is unaffected.
- Gradient norms from the Trainer's own pass: the Trainer measures (and, with `max_grad_norm` > 0, clips) its
  gradients on every optimizer step through `Accelerator.clip_grad_norm_`. While a callback trains, that method
  runs accelerate's default path with `gradwatch`'s per-gradient norms kept (agent/clip.py `clip_one_mesh_`: the
  same total, the same clipping, step for step), so the agent reads no gradient for its norm column. Paths that
  clip their own way (FSDP, DeepSpeed, XLA, DTensor gradients, a norm other than 2, an accelerate without the
  mesh-aware path) call accelerate's method unchanged. The method is replaced on the class (the Trainer's
  Accelerator is not handed to callbacks) from `on_train_begin` to the last training callback's `on_train_end`,
  and it routes only while a callback is training. `trainer_norms=False` leaves accelerate alone (the agent then
  measures the gradients itself).
- `on_train_end` closes the monitor within `close_timeout_s`. With `on_alert="flag"` or `"raise"`, a
  critical alert sets `control.should_training_stop`.
- Any other keyword is a `gradwatch.attach` option, checked at `on_train_begin` (attach's ValueError).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from gradwatch.agent import dispatch
from gradwatch.agent.clip import clip_one_mesh_
from gradwatch.agent.monitor import Monitor, attach

__all__ = ["GradwatchCallback"]


class GradwatchCallback(TrainerCallback):  # type: ignore[misc]
    """Streams the trained model's health to a gradwatch server (see the module docstring)."""

    def __init__(self, *, close_timeout_s: float = 5.0, trainer_norms: bool = True, **options: Any) -> None:
        self._options = options
        self._close_timeout_s = close_timeout_s
        self._trainer_norms = trainer_norms
        self._losses: list[torch.Tensor] = []
        self._normalised = False  # the kept losses were divided by the step's num_items_in_batch
        self._watch: dispatch.Watch | None = None
        self.monitor: Monitor | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:  # fmt: skip
        if model is None:
            return
        options = dict(self._options)
        options.setdefault("rank", args.process_index)
        options.setdefault("world_size", args.world_size)
        options.setdefault("local_rank", max(0, args.local_process_index))
        if options.get("run") is None and getattr(args, "run_name", None):
            options["run"] = args.run_name
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        self.monitor = attach(model, inner if isinstance(inner, torch.optim.Optimizer) else None, **options)
        self._watch = dispatch.watch_module(model, post_kwargs=self._keep_loss)
        if self._trainer_norms:
            _route_clip(self)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None:
            return
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            stacked = torch.stack(losses)
            loss = stacked.sum() if self._normalised else stacked.mean()
        self.monitor.step(loss)
        if self.monitor.stop_requested:
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _unroute_clip(self)
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.remove()
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close(timeout=self._close_timeout_s)

    def _keep_loss(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._normalised = (kwargs or {}).get("num_items_in_batch") is not None
            self._losses.append(loss.detach().float().reshape(()))


# Accelerate's own clip for these: FSDP (its modules clip their shards), DeepSpeed (the engine clips), XLA.
_OWN_CLIP = frozenset({DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA})
#: The default path `clip_one_mesh_` follows step for step; an accelerate without it keeps its own method.
_MESH_AWARE = hasattr(Accelerator, "_clip_grad_norm_dtensor_aware")
_training: weakref.WeakSet[GradwatchCallback] = weakref.WeakSet()  # callbacks between train begin and end
_replaced: list[Callable[..., Any]] = [Accelerator.clip_grad_norm_]  # the method ours stands in for


def _route_clip(callback: GradwatchCallback) -> None:
    _training.add(callback)
    if Accelerator.clip_grad_norm_ is not _clip_grad_norm_:
        _replaced[0] = Accelerator.clip_grad_norm_
        Accelerator.clip_grad_norm_ = _clip_grad_norm_  # type: ignore[method-assign]


def _unroute_clip(callback: GradwatchCallback) -> None:
    _training.discard(callback)
    if not _training and Accelerator.clip_grad_norm_ is _clip_grad_norm_:
        Accelerator.clip_grad_norm_ = _replaced[0]  # type: ignore[method-assign]


def _clip_grad_norm_(self: Accelerator, parameters: Iterable[torch.Tensor], max_norm: float,
                     norm_type: float = 2) -> Any:  # fmt: skip
    """`Accelerator.clip_grad_norm_` (same arguments, same result) keeping the per-gradient norms of its default
    path for the agent (see the module docstring)."""
    original = _replaced[0]
    if not _training or not _MESH_AWARE or self.distributed_type in _OWN_CLIP or norm_type != 2:
        return original(self, parameters, max_norm, norm_type)
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or any(type(g) is not torch.Tensor for g in grads):  # DTensor or another subclass: accelerate's
        return original(self, parameters, max_norm, norm_type)
    self.unscale_gradients()
    return clip_one_mesh_(parameters, max_norm)
