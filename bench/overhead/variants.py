"""What each benchmark variant does around one training step.

A variant opens a session on the model before each timed block and closes it after: gradwatch attaches and
closes a Monitor (a fresh budget controller each block, settled by untimed warm-up steps), wandb.watch and
wandb.unwatch, and so on. A session may wrap forward and backward in a context (`around`) and act after the
optimizer step (`after`). Cadences count steps from the session's start, as wandb.watch's own counter does
(it restarts at each watch), so with timed blocks of a multiple of N steps every comparator acts steps/N times
per block.

Comparators are optional packages (the `bench` extra): `available()` names what is missing, and the bench
skips that variant with that line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import gradwatch
from gradwatch.agent.config import AgentConfig

__all__ = ["CADENCE", "VARIANTS", "BenchContext", "Session", "Variant"]

CADENCE = AgentConfig().full_stats_interval  # gradwatch's default full-statistics interval: every comparator's N
CLOSE_TIMEOUT_S = 10.0


@dataclass
class BenchContext:
    """What sessions share in one bench process: the gradwatch server, a scratch folder, the device and
    precision the models train in, the model's key."""

    server: str
    workdir: pathlib.Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    model_key: str = ""
    shared: dict[str, Any] = field(default_factory=dict)  # per-process comparator state (wandb run, writer)
    server_pid: int | None = None  # the gradwatch server's process, whose CPU time the rounds read
    clip: float | None = None  # the loop clips gradients to this norm (Session.clip_fn) after backward


class Session:
    """One timed block's instrumentation. The base class is the bare training loop (no agent)."""

    clip_fn = staticmethod(torch.nn.utils.clip_grad_norm_)  # the loop's clip (with --clip)

    def around(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()

    def after(self, loss: torch.Tensor) -> None:
        return None

    def close(self) -> dict[str, Any]:
        """Remove the instrumentation; returns what the variant knows about itself (for the JSON)."""
        return {}


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    warm: bool = False  # untimed warm-up steps after opening (gradwatch: connect, settle the budget controller)

    def warm_steps(self, requested: int) -> int:
        """How many of the requested warm-up steps this variant runs after each open."""
        return requested if self.warm else 0

    def available(self) -> str | None:
        """None when the variant can run, else why not (shown as a skip line)."""
        return None

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        return Session()

    def shutdown(self, ctx: BenchContext) -> None:
        """Once at the end of the bench (finish a wandb run, close a writer)."""
        return None


# ---------------------------------------------------------------------- gradwatch


class _GradwatchSession(Session):
    clip_fn = staticmethod(gradwatch.clip_grad_norm_)  # the drop-in: the agent's norms come from the clip

    def __init__(self, monitor: gradwatch.Monitor) -> None:
        self._monitor = monitor

    def after(self, loss: torch.Tensor) -> None:
        self._monitor.step(loss)

    def close(self) -> dict[str, Any]:
        state = agent_state(self._monitor)
        state["acknowledged"] = self._monitor.close(timeout=CLOSE_TIMEOUT_S)
        counters = self._monitor.counters()
        state["reports"] = counters["reports"]
        state["dropped"] = sum(counters["dropped"].values())
        return state


def agent_state(monitor: gradwatch.Monitor) -> dict[str, Any]:
    """The agent's own view of its cost: the overhead budget controller's interval in force, whether the
    every-step signals alone exceed the budget, and its estimated share of step time. The controller is
    internal to the Monitor (agent/budget.py); its reports carry the same interval and flag to the server."""
    budget = getattr(monitor, "_budget", None)
    return {
        "interval": getattr(budget, "interval", None),
        "over_budget": getattr(budget, "over_budget", None),
        "estimate": getattr(budget, "estimate", None),
        "budget": monitor.config.overhead_budget,
    }


@dataclass(frozen=True)
class GradwatchVariant(Variant):
    options: tuple[tuple[str, object], ...] = ()
    warm: bool = True

    def warm_steps(self, requested: int) -> int:
        """All of them with the budget controller on (it decides after its first 10 reports); with it off, one
        full-statistics period is enough to connect and run the first full step."""
        if dict(self.options).get("overhead_budget", 1.0) == 0:
            return min(requested, CADENCE)
        return requested

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        run = f"bench-{os.getpid()}-{ctx.model_key}-{self.key}"
        return _GradwatchSession(gradwatch.attach(model, optimizer, run=run, server=ctx.server, **dict(self.options)))


# ---------------------------------------------------------------------- the every-step kernels alone


class _FloorSession(Session):
    """The device work gradwatch's defaults must do on every step, with none of its Python: the gradient norms
    (one foreach launch in an optimizer step pre-hook), the float32 sum of the model's input and of the output
    of every module that owns parameters (the provenance sums; activation modules are left out, as gradwatch
    skips those applied directly to the previous module's output), and a copy of the loss. The results are
    kept until the next step, as the agent keeps them until its sender thread reads them. No thread, no
    server, no bookkeeping: the floor any implementation of the exact every-step signals pays."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._kept: list[object] = []
        self._pending: list[torch.Tensor] = []
        self._handles = [optimizer.register_step_pre_hook(self._norms), model.register_forward_pre_hook(self._input)]
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_hook(self._output))

    def _norms(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        self._pending += torch._foreach_norm(grads, 2.0) if grads else []

    def _input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.is_floating_point() and torch.is_grad_enabled():
            self._pending.append(x.detach().sum(dtype=torch.float32))

    def _output(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point() and torch.is_grad_enabled():
            self._pending.append(output.detach().sum(dtype=torch.float32))

    def after(self, loss: torch.Tensor) -> None:
        self._kept = [loss.detach().clone(), self._pending]
        self._pending = []

    def close(self) -> dict[str, Any]:
        for handle in self._handles:
            handle.remove()
        return {}


@dataclass(frozen=True)
class FloorVariant(Variant):
    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        return _FloorSession(model, optimizer)


# ---------------------------------------------------------------------- wandb.watch (offline)


class _WandbSession(Session):
    def __init__(self, wandb: Any, model: nn.Module) -> None:
        self._wandb, self._model = wandb, model
        self._steps = 0
        wandb.watch(model, log="all", log_freq=CADENCE)

    def after(self, loss: torch.Tensor) -> None:
        # wandb.watch adds its histograms to the pending history row; a log() call commits the row. Committing
        # only at the cadence is the least a training loop must do for the histograms to be recorded.
        self._steps += 1
        if self._steps % CADENCE == 0:
            self._wandb.log({"loss": loss.item()})

    def close(self) -> dict[str, Any]:
        self._wandb.unwatch(self._model)
        return {}


@dataclass(frozen=True)
class WandbVariant(Variant):
    def available(self) -> str | None:
        if importlib.util.find_spec("wandb") is None:
            return "wandb is not installed (pip install 'gradwatch[bench]')"
        return None

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        if "wandb" not in ctx.shared:
            ctx.shared["wandb"] = _start_wandb(ctx.workdir / "wandb")
        return _WandbSession(ctx.shared["wandb"][0], model)

    def shutdown(self, ctx: BenchContext) -> None:
        if "wandb" in ctx.shared:
            ctx.shared.pop("wandb")[1].finish()


def _start_wandb(folder: pathlib.Path) -> tuple[Any, Any]:
    """One offline wandb run for the whole bench: no login, no network, every file under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        os.environ[name] = str(folder)
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    import wandb

    run = wandb.init(
        mode="offline", dir=str(folder), project="gradwatch-bench", settings=wandb.Settings(console="off", silent=True)
    )
    return wandb, run


# ---------------------------------------------------------------------- TensorBoard histograms


class _TensorBoardSession(Session):
    logged = 0  # histogram sets written by all sessions

    def __init__(self, writer: Any, model: nn.Module, prefix: str) -> None:
        self._writer, self._prefix = writer, prefix
        self._params = list(model.named_parameters())
        self._steps = 0

    def after(self, loss: torch.Tensor) -> None:
        self._steps += 1
        if self._steps % CADENCE:
            return
        _TensorBoardSession.logged += 1
        step = _TensorBoardSession.logged  # the writer's global step: increasing across blocks
        for name, param in self._params:
            self._writer.add_histogram(f"{self._prefix}/{name}", param.detach(), step)
            if param.grad is not None:
                self._writer.add_histogram(f"{self._prefix}/{name}.grad", param.grad, step)


@dataclass(frozen=True)
class TensorBoardVariant(Variant):
    def available(self) -> str | None:
        if importlib.util.find_spec("tensorboard") is None:
            return "tensorboard is not installed (pip install 'gradwatch[bench]')"
        return None

    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        if "tensorboard" not in ctx.shared:
            from torch.utils.tensorboard import SummaryWriter

            ctx.shared["tensorboard"] = SummaryWriter(log_dir=str(ctx.workdir / "tensorboard"))
        return _TensorBoardSession(ctx.shared["tensorboard"], model, ctx.model_key)

    def shutdown(self, ctx: BenchContext) -> None:
        if "tensorboard" in ctx.shared:
            ctx.shared.pop("tensorboard").close()


# ---------------------------------------------------------------------- torch.autograd.detect_anomaly


class _AnomalySession(Session):
    def around(self) -> contextlib.AbstractContextManager[object]:
        return torch.autograd.detect_anomaly()  # its default check_nan=True: every backward output is checked


@dataclass(frozen=True)
class AnomalyVariant(Variant):
    def open(self, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: BenchContext) -> Session:
        return _AnomalySession()


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("none", "no agent"),
        GradwatchVariant("gradwatch", "gradwatch, defaults"),
        GradwatchVariant(
            "gradwatch-full",
            "gradwatch, full stats every step",
            options=(("full_stats_interval", 1), ("overhead_budget", 0.0)),
        ),
        GradwatchVariant("gradwatch-nohooks", "gradwatch, no forward hooks", options=(("forward_hooks", False),)),
        GradwatchVariant("gradwatch-guard", 'gradwatch, guard="skip"', options=(("guard", "skip"),)),
        GradwatchVariant(
            "gradwatch-fixed",
            f"gradwatch, full every {CADENCE}, no budget",
            options=(("full_stats_interval", CADENCE), ("overhead_budget", 0.0)),
        ),
        WandbVariant("wandb", f"wandb.watch all, log_freq {CADENCE}"),
        TensorBoardVariant("tensorboard", f"TensorBoard histograms /{CADENCE}"),
        AnomalyVariant("anomaly", "torch detect_anomaly"),
        FloorVariant("floor", "every-step kernels only (no agent)"),
    )
}
