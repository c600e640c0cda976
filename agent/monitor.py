"""The public agent: `attach()` and `Monitor`.

    monitor = attach(model, optimizer, run="my-run", server="localhost:50051")
    for batch in data:
        loss = loss_fn(model(batch.x), batch.y)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        monitor.step(loss)
    monitor.close()

Contract
- `attach()` is loud: a bad argument, option or environment value raises ValueError naming it and the
  accepted values (see config.py for every option and its GRADWATCH_* variable).
- After that the monitor is silent: `step()` and the optimizer hooks never raise into the training loop
  (internal errors go to errors.report), never wait for the device or the network, and use bounded memory.
- Gradients are read in an optimizer step pre-hook when an optimizer is given (final there: after the DDP
  all-reduce, and still present if zero_grad() runs before step()), else in `step()`; weights after the
  optimizer step (post-hook), else in `step()`. Learning rates come from optimizer.param_groups.
- `step()` stacks everything for one report into one device tensor and hands it to the sender thread;
  full per-layer statistics go out every `full_stats_interval` steps, and on every step while a FULL_STATS
  command from the server is in force.
- Attach after the model is built, moved to its device and wrapped or sharded (DDP, FSDP2): the layer
  schema is fixed at attach.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from typing import Any

try:
    import torch
except ImportError as exc:  # the agent uses the training environment's torch; it is not our dependency
    raise ImportError("gradwatch.attach needs PyTorch in the training environment (pip install torch)") from exc

from gradwatch import _version
from gradwatch.agent import errors, process
from gradwatch.agent.config import AgentConfig, kill_switch_on, resolve_config
from gradwatch.agent.counters import Counters
from gradwatch.agent.fold import LayerFold
from gradwatch.agent.hooks import OptimizerTap, learning_rates
from gradwatch.agent.items import AgentIdentity, EventItem, ReportItem
from gradwatch.agent.schema import LayerSchema, build_layout
from gradwatch.agent.snapshot import start_copy
from gradwatch.agent.stats import StatsEngine
from gradwatch.agent.vector import VectorLayout

__all__ = ["Monitor", "NoopMonitor", "attach"]

logger = logging.getLogger("gradwatch.agent")

DEFAULT_CLOSE_TIMEOUT_S = 5.0


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run: str | None = None,
    server: str | None = None,
    **options: Any,
) -> Monitor:
    """Start monitoring `model` (and `optimizer`); returns a Monitor, or a NoopMonitor when disabled.

    Options (keywords; each also from its GRADWATCH_* environment variable, see config.py): server, run,
    job_name, full_stats_interval, enabled, replay_buffer_size, queue_size, heartbeat_interval_s,
    welcome_timeout_s, exit_flush_timeout_s, retry (a RetryPolicy), rank, world_size, local_rank.
    GRADWATCH_DISABLED=1 returns a NoopMonitor before anything else is read (and grpc is never imported).
    Raises ValueError on a bad model, optimizer, option or environment value.
    """
    if kill_switch_on():
        return NoopMonitor()
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"gradwatch: model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"gradwatch: optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
        )
    config = resolve_config({"run": run, "server": server, **options})
    if not config.enabled:
        return NoopMonitor(config)
    if process.forked_from_agent_process():
        logger.warning(
            "gradwatch: attach() in a forked child of a monitored process is a no-op (gRPC is not "
            "fork-safe); attach in a spawned process instead"
        )
        return NoopMonitor(config)
    return Monitor(model, optimizer, config)


class Monitor:
    """Streams training-health statistics of one model to a gradwatch server. Create with `attach()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: AgentConfig,
        *,
        channel_factory: Any = None,
    ) -> None:
        """Hook the optimizer and start the sender thread. `channel_factory(target) -> grpc.Channel` is a
        seam for tests and custom credentials; the default is a plaintext channel."""
        process.prefer_no_grpc_fork_handlers()  # must come before grpc's first import
        from gradwatch.agent.sender import Sender  # grpc is imported only for an enabled monitor

        self._config = config
        self._engine = StatsEngine(build_layout(model))
        self._schema = self._engine.layout.schema
        self._optimizer = optimizer
        self._counters = Counters()
        self._session_id = uuid.uuid4().hex
        self._step_count = 0
        self._last_step_at: float | None = None
        self._agent_time_s = 0.0
        self._fold = LayerFold.of(self._engine.layout)
        self._vector_layouts: dict[tuple[bool, int], VectorLayout] = {}
        self._full_until = 0
        self._command: tuple[int, int, str] = (0, 0, "")  # written by the sender thread only
        self._command_seen = 0
        self._upcoming_full: bool | None = None  # decided at the first computation for the next step
        self._closed = False
        self._inert = False
        self._close_result = False
        if config.world_size > 1 and config.run_id == f"{socket.gethostname()}-{os.getpid()}":
            logger.warning(
                "gradwatch: no run id for a %d-rank job: set GRADWATCH_RUN (or run=) to the same value on "
                "every rank, or launch with torchrun",
                config.world_size,
            )
        identity = AgentIdentity(
            run_id=config.run_id,
            job_name=config.job_name,
            rank=config.rank,
            world_size=config.world_size,
            local_rank=config.local_rank,
            host=socket.gethostname(),
            pid=os.getpid(),
            session_id=self._session_id,
            agent_version=_version.__version__,
            torch_version=str(torch.__version__),
            device_kind=self._engine.layout.device.type,
            full_stats_interval=config.full_stats_interval,
            schema=self._schema,
        )
        kwargs = {} if channel_factory is None else {"channel_factory": channel_factory}
        self._sender = Sender(config, identity, self._counters, self._on_command, **kwargs)
        self._sender.start()  # first: if the thread cannot start, attach() raises with nothing hooked
        self._tap = None if optimizer is None else OptimizerTap(optimizer, self._engine, self._begin_step, self._spent)
        process.track(self)

    # ------------------------------------------------------------------ identity

    @property
    def run_id(self) -> str:
        return self._config.run_id

    @property
    def rank(self) -> int:
        return self._config.rank

    @property
    def world_size(self) -> int:
        return self._config.world_size

    @property
    def local_rank(self) -> int:
        return self._config.local_rank

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def step_count(self) -> int:
        """Number of `step()` calls so far (the step number of the last report)."""
        return self._step_count

    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def schema(self) -> LayerSchema:
        """The layers in wire order (names, module types, parameter counts)."""
        return self._schema

    @property
    def exit_flush_timeout_s(self) -> float:
        return self._config.exit_flush_timeout_s

    # ------------------------------------------------------------------ training-thread API

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Report one training step (call once per iteration, after optimizer.step()).

        `loss` may be a tensor (detached here; never read on this thread), a number, or None. Never raises,
        blocks or syncs with the device.
        """
        if self._inert or self._closed:
            return
        started = time.perf_counter()
        try:
            self._report(loss, started)
        except Exception as exc:
            errors.report(exc, "step")
        finally:
            self._agent_time_s += time.perf_counter() - started

    def event(self, kind: str, message: str = "", **attributes: str) -> None:
        """Record an agent event (e.g. "checkpoint_saved") on the server's timeline. Never raises."""
        if self._inert or self._closed:
            return
        try:
            self._submit_event(kind, message, attributes)
        except Exception as exc:
            errors.report(exc, "event")

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        """Remove the hooks, send Goodbye, deliver what is left; True if the server acknowledged everything.

        Never blocks longer than `timeout` seconds. Idempotent: later calls return the first result.
        """
        return self._close(timeout, "closed")

    def _close(self, timeout: float, reason: str) -> bool:
        if self._inert:
            return False
        if self._closed:
            return self._close_result
        self._closed = True
        try:
            if self._tap is not None:
                self._tap.remove()
            self._close_result = self._sender.close(timeout, self._step_count, reason)
        except Exception as exc:
            errors.report(exc, "close")
        finally:
            process.untrack(self)
        return self._close_result

    def counters(self) -> dict[str, Any]:
        """Sent, acknowledged and dropped (by reason) frames, internal errors (process-wide), reconnects and
        the stream state ("idle", "connecting", "ready", "backoff", "down", "closed")."""
        return self._counters.snapshot(errors.counts(), self._sender.queued())

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self._close(DEFAULT_CLOSE_TIMEOUT_S, "closed" if exc_type is None else "exception")

    # ------------------------------------------------------------------ internals

    def _report(self, loss: torch.Tensor | float | None, started: float) -> None:
        full = self._begin_step()
        self._upcoming_full = None
        self._step_count += 1
        step = self._step_count
        duration = 0.0 if self._last_step_at is None else started - self._last_step_at
        self._last_step_at = started
        grads, weights, rates = self._tap.take() if self._tap is not None else (None, None, None)
        if grads is None:  # no optimizer, or it did not step since the last report
            grads = self._engine.compute("grad", full)
        if weights is None:
            weights = self._engine.compute("weight", full)
        if rates is None:
            rates = learning_rates(self._optimizer, self._engine.layout.device)
        lr_values, lr_slots, lr_tensors = rates

        loss_value = math.nan
        if isinstance(loss, torch.Tensor):
            loss_t = loss.detach()
            if loss_t.numel() != 1:  # per-sample losses: report their mean
                loss_t = loss_t.float().mean()
            device = self._engine.layout.device
            loss_0d = loss_t.reshape(()).to(device=device, dtype=torch.float32, non_blocking=True)
        else:
            if loss is not None:
                loss_value = float(loss)
            loss_0d = self._engine.zero()

        # The one stack of this report: every value above is a 0-d tensor on the same device.
        vector = torch.stack([loss_0d, *grads, *weights, *lr_tensors])
        item = ReportItem(
            step=step,
            wall_time=time.time(),
            step_duration_s=duration,
            has_loss=loss is not None,
            loss_in_vector=isinstance(loss, torch.Tensor),
            loss=loss_value,
            learning_rates=lr_values,
            tensor_lr_slots=lr_slots,
            optimizer_step=0 if self._tap is None else self._tap.steps,
            agent_time_s=self._agent_time_s + (time.perf_counter() - started),
            layout=self._vector_layout(full, len(lr_tensors)),
            fold=self._fold,
            values=start_copy(vector),
        )
        # What remains of this call is counted in the next report (step() adds the full call time).
        self._agent_time_s = -(time.perf_counter() - started)
        self._counters.reports += 1
        self._sender.submit(item)

    def _begin_step(self) -> bool:
        """Fix, for step `step_count + 1`, whether it is a full-statistics step and which parameter layout it
        uses: whichever of the pre-hook, post-hook or step() computes first for it decides, so all agree."""
        if self._upcoming_full is None:
            layout = self._engine.layout
            if self._engine.refresh() is not layout:
                self._fold = LayerFold.of(self._engine.layout)
                self._vector_layouts.clear()
            self._upcoming_full = self._is_full_step(self._step_count + 1)
        return self._upcoming_full

    def _vector_layout(self, full: bool, num_tensor_lrs: int) -> VectorLayout:
        key = (full, num_tensor_lrs)
        layout = self._vector_layouts.get(key)
        if layout is None:
            layout = self._vector_layouts[key] = VectorLayout(len(self._engine.layout.params), full, num_tensor_lrs)
        return layout

    def _is_full_step(self, step: int) -> bool:
        token, steps, reason = self._command  # one read of a tuple the sender swaps whole: no lock needed
        if token != self._command_seen:
            self._command_seen = token
            self._full_until = self._step_count + steps
            self._submit_event(
                "cadence_changed",
                f"full statistics for {steps} steps",
                {"full_stats_steps": str(steps), "reason": reason},
            )
        return step % self._config.full_stats_interval == 0 or step <= self._full_until

    def _spent(self, seconds: float) -> None:
        """Hook time counts as the agent's time on the training thread."""
        self._agent_time_s += seconds

    def _submit_event(self, kind: str, message: str, attributes: dict[str, str]) -> None:
        item = EventItem(
            kind=kind,
            step=self._step_count,
            wall_time=time.time(),
            message=message,
            attributes={str(k): str(v) for k, v in attributes.items()},
        )
        self._counters.events += 1
        self._sender.submit(item)

    def _on_command(self, steps: int, reason: str) -> None:
        """Sender thread: a FULL_STATS command. Swap the whole tuple; the training thread picks it up."""
        self._command = (self._command[0] + 1, steps, reason)

    def _become_inert_after_fork(self) -> None:
        self._inert = True
        self._sender.mark_forked()
        if self._tap is not None:
            self._tap.remove()

    def _close_at_exit(self, deadline: float) -> None:
        self._close(max(0.0, deadline - time.monotonic()), "exit")


class NoopMonitor(Monitor):
    """What `attach()` returns when the agent is disabled: the same API, doing nothing (grpc never imported)."""

    def __init__(self, config: AgentConfig | None = None) -> None:
        # No super().__init__(): there is nothing to hook, start or connect.
        self._config = config or AgentConfig()
        self._step_count = 0

    @property
    def session_id(self) -> str:
        return ""

    @property
    def schema(self) -> LayerSchema:
        return LayerSchema((), (), ())

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        self._step_count += 1

    def event(self, kind: str, message: str = "", **attributes: str) -> None:
        return None

    def _close(self, timeout: float, reason: str) -> bool:
        return True

    def counters(self) -> dict[str, Any]:
        counters = Counters()
        counters.stream_state = "disabled"
        return counters.snapshot({}, 0)
