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
- After that the monitor is silent: `step()` and the hooks never raise into the training loop (internal
  errors go to errors.report), never wait for the device or the network, and use bounded memory. The one
  exception is opt-in: with `on_alert="raise"`, `step()` raises TrainingAlert once after a critical alert
  for the run (actions.py).
- Gradients are read in an optimizer step pre-hook when an optimizer is given (final there: after the DDP
  all-reduce, and still present if zero_grad() runs before step()), else in `step()`; weights after the
  optimizer step (post-hook), else in `step()`. Learning rates come from optimizer.param_groups.
- `step()` stacks everything for one report into one device tensor and hands it to the sender thread;
  full per-layer statistics go out every `full_stats_interval` steps (stretched by the overhead budget,
  budget.py), and on every step while a FULL_STATS command from the server is in force. Forward hooks
  (activations.py) add activation, input and label statistics and NaN provenance.
- Attach after the model is built, moved to its device and wrapped or sharded (DDP, FSDP2): the layer
  schema and the replica group (replica.py: which ranks must hold identical weights) are fixed at attach.
- Cross-rank signals: an exact checksum of the parameters (stats.py), compared across replicas by the server,
  taken on its own cadence (checksum_cadence.py: within 50 steps or 30 s, whatever the budget) and on full
  steps. The update ratio |Δw|/|w| has a cadence of its own too (update_cadence.py: every step up to step 16,
  then every 8 steps, and full steps); every report carries the time to the step's first forward pass (timing.py).
- Gradient accumulation (`grad_accumulation=True`): a `step()` after which the optimizer has not stepped
  (nor the watched GradScaler) is a micro step: its loss joins the next report, which carries the mean loss
  and `micro_steps`; statistics go out once per optimizer step (after MAX_MICRO_STEPS calls without one, a
  warning, and every call reports: the optimizer was replaced).
- Nothing is stored on the model or the optimizer: the hooks are process-wide ones filtered to them
  (dispatch.py), so copies, pickles, traced and exported programs carry no agent; attach() on a model that
  already has an open monitor closes that one first (with a warning).
- Mixed precision: pass `grad_scaler=` (a torch.amp.GradScaler) and a step the scaler skips because of
  Inf/NaN scaled gradients is reported with `skipped_step` and the scale (amp.py), so the server does not
  mistake it for a NaN or an explosion.
- Guard (opt-in, `guard="skip"` or `"rollback"`, guard.py): an optimizer update whose loss (given to
  `observe_loss()` before `optimizer.step()`) or gradient norm is non-finite or a spike is not applied, and
  the report says so. Autopsy: `step(loss, batch_ids=..., sample_losses=...)` sends the batch's ids and its
  top-k samples by loss with the report (autopsy.py), so alerts and incidents can name them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any

try:
    import torch
except ImportError as exc:  # the agent uses the training environment's torch; it is not our dependency
    raise ImportError("gradwatch.attach needs PyTorch in the training environment (pip install torch)") from exc

from gradwatch import _version
from gradwatch.agent import errors, process
from gradwatch.agent.actions import AlertActions, AlertNotice
from gradwatch.agent.activations import ActivationTap
from gradwatch.agent.amp import check_grad_scaler
from gradwatch.agent.api import DEFAULT_CLOSE_TIMEOUT_S, Monitor
from gradwatch.agent.assembly import ReportAssembler
from gradwatch.agent.autopsy import build_tail, check_batch_ids
from gradwatch.agent.budget import BudgetController
from gradwatch.agent.checksum_cadence import ChecksumCadence
from gradwatch.agent.config import AgentConfig, kill_switch_on, resolve_config
from gradwatch.agent.counters import Counters
from gradwatch.agent.guard import Guard, check_setup
from gradwatch.agent.items import AgentIdentity, EventItem, ReportItem
from gradwatch.agent.replica import replica_group
from gradwatch.agent.schema import ROOT_LAYER_NAME, LayerSchema, build_layout, data_parallel_size
from gradwatch.agent.stats import StatsEngine
from gradwatch.agent.timing import ForwardClock
from gradwatch.agent.update_cadence import update_due

__all__ = ["AgentMonitor", "Monitor", "NoopMonitor", "attach"]

logger = logging.getLogger("gradwatch.agent")

#: With grad_accumulation: this many step() calls in a row without an optimizer step mean the optimizer given to
#: attach() no longer steps (replaced mid-run): warn once and report every step from then on.
MAX_MICRO_STEPS = 256

#: id(model) -> (the model, its open Monitor), both weak: attach() on a model that already has an open monitor
#: (a notebook cell run again) closes the old one first, so a model never carries two sets of hooks.
_attached: dict[int, tuple[weakref.ref[torch.nn.Module], weakref.ref[AgentMonitor]]] = {}


def _replace_previous(model: torch.nn.Module) -> None:
    entry = _attached.pop(id(model), None)
    previous = entry[1]() if entry is not None and entry[0]() is model else None
    if previous is not None and not previous._closed and not previous._inert:
        logger.warning(
            "gradwatch: attach() on a model that is already attached (run %r, session %s): closing the earlier "
            "monitor first, so the model is watched once; call monitor.close() before attaching again",
            previous.run_id,
            previous.session_id,
        )
        previous._close(DEFAULT_CLOSE_TIMEOUT_S, "replaced")


def attach(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    run: str | None = None,
    server: str | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    alert_callback: Callable[[AlertNotice], object] | None = None,
    rollback_callback: Callable[[int], int | None] | None = None,
    **options: Any,
) -> Monitor:
    """Start monitoring `model` (and `optimizer`); returns a Monitor, or a NoopMonitor when disabled.

    Options (keywords; each also from its GRADWATCH_* environment variable, see config.py): server, servers,
    token, token_file, tls, tls_ca_file, tls_client_cert_file, tls_client_key_file, run, job_name,
    full_stats_interval, enabled, replay_buffer_size, queue_size, heartbeat_interval_s, welcome_timeout_s,
    exit_flush_timeout_s, grad_accumulation, retry (a RetryPolicy), rank, world_size, local_rank,
    overhead_budget, on_alert, guard. `grad_scaler`: the torch.amp.GradScaler that steps `optimizer`, if any.
    `alert_callback(notice)`: called at the next step() after a critical alert for the run (actions.py).
    `rollback_callback(step)`: with guard policy "rollback", restores the user's last good checkpoint and
    returns the optimizer step it holds (None: nothing restored); without it the guard keeps CPU snapshots.
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
    if grad_scaler is not None:
        check_grad_scaler(grad_scaler, optimizer)
    if alert_callback is not None and not callable(alert_callback):
        raise ValueError(f"gradwatch: alert_callback must be callable, got {type(alert_callback).__name__}")
    if rollback_callback is not None and not callable(rollback_callback):
        raise ValueError(f"gradwatch: rollback_callback must be callable, got {type(rollback_callback).__name__}")
    config = resolve_config({"run": run, "server": server, **options})
    if not config.enabled:
        return NoopMonitor(config)
    if config.guard.enabled and optimizer is None:
        raise ValueError("gradwatch: guard needs the optimizer whose updates it guards: attach(model, optimizer, ...)")
    if process.forked_from_agent_process():
        logger.warning(
            "gradwatch: attach() in a forked child of a monitored process is a no-op (gRPC is not "
            "fork-safe); attach in a spawned process instead"
        )
        return NoopMonitor(config)
    return AgentMonitor(model, optimizer, config, grad_scaler=grad_scaler, alert_callback=alert_callback,
                   rollback_callback=rollback_callback)  # fmt: skip


class AgentMonitor(Monitor):
    """Streams training-health statistics of one model to a gradwatch server. Create with `attach()`."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        config: AgentConfig,
        *,
        channel_factory: Any = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        alert_callback: Callable[[AlertNotice], object] | None = None,
        rollback_callback: Callable[[int], int | None] | None = None,
    ) -> None:
        """Hook the optimizer and start the sender thread. `channel_factory(target) -> grpc.Channel` is a
        seam for tests and custom credentials; the default follows the config (transport.py): plaintext, or
        TLS when `tls` or a `tls_*` file is set."""
        _replace_previous(model)
        process.prefer_no_grpc_fork_handlers()  # must come before grpc's first import
        from gradwatch.agent.collectives import HEARTBEAT_S, CollectiveTracker  # imports the wire contract
        from gradwatch.agent.sender import Sender  # grpc is imported only for an enabled monitor
        from gradwatch.agent.transport import Transport

        transport = Transport(config)  # reads the TLS and token files: a bad one raises here, loudly
        self._config = config
        self._engine = StatsEngine(build_layout(model, data_parallel_size(model, config.world_size)))
        self._schema = self._engine.layout.schema
        self._model_ref = weakref.ref(model)
        self._param_ids: set[int] | None = {id(p) for p in model.parameters()}
        device = self._engine.layout.device
        if config.guard.enabled and optimizer is not None:
            sharded = self._engine.layout.has_dtensor and config.world_size > 1
            check_setup(config.guard.mechanism, optimizer, device, grad_scaler=grad_scaler, sharded=sharded)
        self._counters = Counters()
        self._session_id = uuid.uuid4().hex
        self._step_count = 0
        self._last_step_at: float | None = None
        self._agent_time_s = 0.0
        self._budget = BudgetController(config.overhead_budget, config.full_stats_interval)
        self._actions = AlertActions(config.on_alert, alert_callback)
        self._full_until = 0
        self._last_full_step = 0  # the latest step decided to be a full-statistics one
        self._command: tuple[int, int, str] = (0, 0, "")  # written by the sender thread only
        self._command_seen = 0
        self._upcoming_full: bool | None = None  # decided at the first computation for the next step
        self._cadence = ChecksumCadence()
        self._upcoming_checksum = False  # decided with _upcoming_full
        self._upcoming_update = False  # likewise
        self._closed = False
        self._inert = False
        self._micro_steps = 0  # step() calls in a row that only accumulated (grad_accumulation)
        self._close_result = False
        if config.world_size > 1 and config.run_id == f"{socket.gethostname()}-{os.getpid()}":
            logger.warning(
                "gradwatch: no run id for a %d-rank job: set GRADWATCH_RUN (or run=) to the same value on "
                "every rank, or launch with torchrun",
                config.world_size,
            )
        activations: ActivationTap | None = None
        if config.forward_hooks:  # named before the sender starts (Hello carries them), hooked after
            layer_names = {"" if name == ROOT_LAYER_NAME else name for name in self._schema.names}
            activations = ActivationTap(model, layer_names, self._begin_step, self._spent)
        identity = AgentIdentity.of(
            config,
            session_id=self._session_id,
            agent_version=_version.__version__,
            torch_version=str(torch.__version__),
            device_kind=self._engine.layout.device.type,
            schema=self._schema,
            activations=activations,
            replica_group=replica_group(model, self._engine.layout, config.rank, config.world_size),
        )
        # Hang localisation and between-collective times (collectives.py): before the sender, which carries them.
        self._collectives = CollectiveTracker(model, enabled=config.track_collectives, comm_hook=config.ddp_comm_hook)
        kwargs: dict[str, Any] = {
            "on_alert": self._on_alert,
            "channel_factory": channel_factory if channel_factory is not None else transport.channel,
            "target": transport.target,
            "metadata": transport.metadata,
        }
        if self._collectives.active:
            kwargs.update(progress=self._collectives.progress, heartbeat_s=HEARTBEAT_S)
        self._sender = Sender(config, identity, self._counters, self._on_command, **kwargs)
        self._sender.start()  # first: if the thread cannot start, attach() raises with nothing hooked
        # Before the optimizer tap: the guard's post-hook undoes a bad update before the tap reads the weights.
        self._guard: Guard | None = None
        if config.guard.enabled and optimizer is not None:
            self._guard = Guard(config.guard, optimizer, device, world_size=config.world_size,
                                submit_event=self._submit_event, restore_callback=rollback_callback,
                                add_agent_time=self._spent,
                                plain_replication=self._engine.layout.plain_replication)  # fmt: skip
        self._batch_ids: Any = None
        self._sample_losses: list[torch.Tensor] = []
        self._collectives.install(model)
        self._assembler = ReportAssembler(self._engine, optimizer, activations, grad_scaler, self._begin_step,
                                          self._spent, self._checksum_due, self._update_due)  # fmt: skip
        tap = self._assembler.optimizer_tap
        if self._guard is not None and tap is not None:  # one gradient norm pass per step, not two
            self._guard.share_norms(tap.step_grad_norms)
        # forward_hooks=False promises no hooks on the model: then no pre-forward time either.
        self._forward_clock = ForwardClock(model) if config.forward_hooks else None
        if activations is not None:
            activations.install()
        process.track(self)
        _attached[id(model)] = (weakref.ref(model), weakref.ref(self))
        for key in [key for key, (ref, _) in _attached.items() if ref() is None]:
            del _attached[key]

    # ------------------------------------------------------------------ identity

    @property
    def session_id(self) -> str:
        return self._session_id

    @property
    def step_count(self) -> int:
        """Reports so far: `step()` calls (optimizer steps with grad_accumulation); the last report's step."""
        return self._step_count

    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def schema(self) -> LayerSchema:
        """The layers in wire order (names, module types, parameter counts)."""
        return self._schema

    # ------------------------------------------------------------------ training-thread API

    def step(
        self,
        loss: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        *,
        batch_ids: Any = None,
        sample_losses: torch.Tensor | None = None,
    ) -> None:
        """Report one training step (call once per iteration, after optimizer.step()).

        `loss` may be a tensor (detached here; never read on this thread), a number, or None. Never raises,
        blocks or syncs with the device. With `grad_accumulation`, a call after which the optimizer did not
        step only adds its loss to the next report. `labels` (integer class labels of the batch) feed the
        class histogram of full-statistics reports. Autopsy: `batch_ids` (a sequence of ints or strings, or an
        integer tensor: the ids of this batch's examples) and `sample_losses` (per-example losses, e.g. from
        reduction="none") travel with the report, the latter as its top-k by loss (guard setting top_k,
        default 8); a bad value is counted as an internal error and dropped.
        """
        if self._inert or self._closed:
            return
        with errors.guarded("step", self._spent) as guarded:
            if batch_ids is not None or sample_losses is not None:
                self._add_autopsy(batch_ids, sample_losses)
            self._assembler.add(loss, labels)
            if not self._assembler.is_micro_step(self._config.grad_accumulation and self._micro_steps >= 0):
                if self._micro_steps > 0:
                    self._micro_steps = 0
                self._report(guarded.started)
            else:
                self._micro_steps += 1
                if self._micro_steps >= MAX_MICRO_STEPS:
                    self._micro_steps = -1  # from now on every step() reports
                    logger.warning(
                        "gradwatch: %d monitor.step() calls without a step of the optimizer given to attach() (was "
                        "it replaced?); reporting every step from now on. Attach again with the new optimizer "
                        "to fold gradient accumulation into optimizer steps.",
                        MAX_MICRO_STEPS,
                    )
                    self._report(guarded.started)  # with the losses accumulated so far
        self._actions.poll()  # may raise TrainingAlert, when attached with on_alert="raise"

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """With the guard: this micro step's loss, given after backward() and before optimizer.step(), so the
        guard judges the loss as well as the gradient norm. Never raises or syncs; without a guard a no-op."""
        if self._inert or self._closed or self._guard is None:
            return
        with errors.guarded("observe_loss"):
            self._guard.observe_loss(loss)

    @property
    def guard(self) -> Guard | None:
        """The guard (attach(guard=...)), else None."""
        return self._guard

    @property
    def stop_requested(self) -> bool:
        """True once a critical alert arrived for this run, when attached with on_alert="flag" or "raise":
        poll it to checkpoint and stop. Set by the sender thread as soon as the server's command arrives."""
        return self._actions.stop_requested

    @property
    def last_alert(self) -> AlertNotice | None:
        """The latest critical alert the server sent for this run (any on_alert mode), else None."""
        return self._actions.last_alert

    def event(self, kind: str, message: str = "", **attributes: str) -> None:
        """Record an agent event (e.g. "checkpoint_saved") on the server's timeline. Never raises."""
        if self._inert or self._closed:
            return
        with errors.guarded("event"):
            self._submit_event(kind, message, attributes)

    @contextlib.contextmanager
    def pause(self, reason: str = "paused") -> Iterator[None]:
        """Declare a pause in training (`with monitor.pause("checkpoint"): save(...)`): while it lasts, this
        rank's idleness (and its peers' waiting for it) is not a hang. Never raises."""
        self._collectives.pause(str(reason))
        try:
            yield
        finally:
            self._collectives.resume()

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
            self._assembler.remove()
            if self._guard is not None:
                self._guard.remove()
            if self._forward_clock is not None:
                self._forward_clock.remove()
            self._collectives.close()
            self._close_result = self._sender.close(timeout, self._step_count, reason)
        except Exception as exc:
            errors.report(exc, "close")
        finally:
            process.untrack(self)
        return self._close_result

    def counters(self) -> dict[str, Any]:
        """Sent, acknowledged and dropped (by reason) frames, internal errors (process-wide), reconnects and
        the stream state ("idle", "connecting", "ready", "unresponsive" (ready, but written frames have waited
        over ACK_OVERDUE_S = 10 s for an acknowledgement: a stopped or wedged server), "backoff", "down",
        "closed")."""
        return self._counters.snapshot(errors.counts(), self._sender.queued())

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self._close(DEFAULT_CLOSE_TIMEOUT_S, "closed" if exc_type is None else "exception")

    # ------------------------------------------------------------------ internals

    def _report(self, started: float) -> None:
        full = self._begin_step()
        checksum = self._upcoming_checksum
        self._upcoming_full = None
        if full and self._param_ids is not None:
            self._check_parameters()
        self._step_count += 1
        duration = 0.0 if self._last_step_at is None else started - self._last_step_at
        self._cadence.observe(duration)
        pre_forward = None if self._forward_clock is None else self._forward_clock.take(self._last_step_at)
        self._last_step_at = started
        self._collectives.on_step()
        part = self._assembler.assemble(full, checksum, self._tail_builder())
        item = ReportItem(
            step=self._step_count,
            wall_time=time.time(),
            step_duration_s=duration,
            agent_time_s=self._agent_time_s + (time.perf_counter() - started),
            payload=part,
            full_stats_interval=self._budget.interval,
            over_budget=self._budget.over_budget,
            pre_forward_s=pre_forward,
            between_collectives_s=self._collectives.take_between(),
        )
        self._observe_cost(full, item.agent_time_s, duration)
        # What remains of this call is counted in the next report (step() adds the full call time).
        self._agent_time_s = -(time.perf_counter() - started)
        self._counters.reports += 1
        self._sender.submit(item)

    def _check_parameters(self) -> None:
        """Full steps: warn once when the model's parameters are no longer those of attach() (a parametrization
        such as weight_norm, a replaced layer): the statistics keep covering the parameters of attach()."""
        model = self._model_ref()
        if model is None or {id(p) for p in model.parameters()} == self._param_ids:
            return
        self._param_ids = None  # once
        logger.warning(
            "gradwatch: the model's parameters changed after attach() (a parametrization such as weight_norm, or "
            "a replaced layer); statistics cover the parameters it had at attach(). Attach after changing the "
            "model to watch the new ones."
        )

    def _add_autopsy(self, batch_ids: Any, sample_losses: torch.Tensor | None) -> None:
        """Keep this call's batch ids and per-example losses for the next report (micro steps add up)."""
        ids = check_batch_ids(batch_ids)
        if ids is not None:
            if isinstance(ids, tuple) and isinstance(self._batch_ids, tuple):
                ids = self._batch_ids + ids
            elif isinstance(ids, torch.Tensor) and isinstance(self._batch_ids, torch.Tensor):
                ids = torch.cat([self._batch_ids, ids])
            self._batch_ids = ids
        if sample_losses is not None:
            if not isinstance(sample_losses, torch.Tensor):
                raise TypeError(f"sample_losses must be a tensor, got {type(sample_losses).__name__}")
            self._sample_losses.append(sample_losses.detach().reshape(-1))

    def _tail_builder(self) -> Callable[[int], Any] | None:
        """The guard and autopsy part of this report (autopsy.py), or None when there is neither."""
        guard, ids, losses = self._guard, self._batch_ids, self._sample_losses
        if guard is None and ids is None and not losses:
            return None
        self._batch_ids, self._sample_losses = None, []
        reasons, rolled_back_to = guard.take() if guard is not None else (None, None)
        top_k = self._config.guard.top_k
        device = self._engine.layout.device
        joined = None if not losses else losses[0] if len(losses) == 1 else torch.cat(losses)
        return lambda offset: build_tail(offset, reasons, guard is not None, rolled_back_to, ids, joined, top_k, device)

    def _observe_cost(self, full: bool, agent_s: float, step_s: float) -> None:
        """Feed the overhead budget. Every report says the interval in force (StepReport.full_stats_interval,
        over_budget); a change is logged here too, rarely (hysteresis), never as an extra frame."""
        interval = self._budget.observe(full, agent_s, step_s)
        if interval is not None:
            logger.info(
                "gradwatch: full statistics every %d steps to stay within the %.2g overhead budget%s",
                interval,
                self._config.overhead_budget,
                " (the every-step signals alone exceed it)" if self._budget.over_budget else "",
            )

    def _begin_step(self) -> bool:
        """Fix, for step `step_count + 1`, whether it is a full-statistics step and which parameter layout it
        uses: whichever of the pre-hook, post-hook or step() computes first for it decides, so all agree."""
        if self._upcoming_full is None:
            layout = self._engine.layout
            if self._engine.refresh() is not layout:
                self._assembler.layout_changed()
            self._upcoming_full = self._is_full_step(self._step_count + 1)
            self._upcoming_checksum = self._upcoming_full or self._cadence.due(self._step_count + 1)
            self._upcoming_update = self._upcoming_full or update_due(self._step_count + 1)
        return self._upcoming_full

    def _checksum_due(self) -> bool:
        """Whether step `step_count + 1` takes the parameter checksum (its own cadence, checksum_cadence.py)."""
        self._begin_step()
        return self._upcoming_checksum

    def _update_due(self) -> bool:
        """Whether step `step_count + 1` measures the update ratio (its own cadence, update_cadence.py)."""
        self._begin_step()
        return self._upcoming_update

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
        # Steps since the last full one, not `step % interval`: an interval that changes (the budget controller)
        # never brings two full steps close together.
        full = step - self._last_full_step >= self._budget.interval or step <= self._full_until
        if full:
            self._last_full_step = step
        return full

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

    def _on_alert(self, command: Any) -> None:
        """Sender thread: a COMMAND_KIND_ALERT for this run."""
        notice = AlertNotice(command.detector, command.severity, int(command.step), int(command.rank), command.reason)
        self._actions.deliver(notice)

    def _on_command(self, steps: int, reason: str) -> None:
        """Sender thread: a FULL_STATS command. Swap the whole tuple; the training thread picks it up."""
        self._command = (self._command[0] + 1, steps, reason)

    def _become_inert_after_fork(self) -> None:
        self._inert = True
        self._sender.mark_forked()
        self._collectives.close()
        self._assembler.remove()
        if self._forward_clock is not None:
            self._forward_clock.remove()

    def _close_at_exit(self, deadline: float) -> None:
        self._close(max(0.0, deadline - time.monotonic()), "exit")


class NoopMonitor(Monitor):
    """What `attach()` returns when the agent is disabled: the same API, doing nothing (grpc never imported)."""

    def __init__(self, config: AgentConfig | None = None) -> None:
        self._config = config or AgentConfig()
        self._step_count = 0

    @property
    def step_count(self) -> int:
        return self._step_count

    @property
    def config(self) -> AgentConfig:
        return self._config

    @property
    def session_id(self) -> str:
        return ""

    @property
    def stop_requested(self) -> bool:
        return False

    @property
    def last_alert(self) -> AlertNotice | None:
        return None

    @property
    def schema(self) -> LayerSchema:
        return LayerSchema((), (), ())

    def step(self, loss: torch.Tensor | float | None = None, labels: torch.Tensor | None = None, *,
             batch_ids: Any = None, sample_losses: torch.Tensor | None = None) -> None:  # fmt: skip
        self._step_count += 1

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        return None

    @property
    def guard(self) -> Guard | None:
        return None

    def event(self, kind: str, message: str = "", **attributes: str) -> None:
        return None

    @contextlib.contextmanager
    def pause(self, reason: str = "paused") -> Iterator[None]:
        yield

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool:
        return True

    def counters(self) -> dict[str, Any]:
        counters = Counters()
        counters.stream_state = "disabled"
        return counters.snapshot({}, 0)

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        return None
