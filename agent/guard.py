"""The spike and NaN guard: do not apply an optimizer update whose loss or gradient norm is bad.

    monitor = attach(model, optimizer, guard="skip")
    loss.backward()
    monitor.observe_loss(loss)     # optional: lets the guard judge the loss too (before the step)
    optimizer.step()
    monitor.step(loss)

Contract
- Judged in the optimizer's step pre-hook, on the device: the step is bad when the loss (the mean of the
  `observe_loss` calls since the last optimizer step; none given: not judged) or the global gradient norm is
  non-finite, or, after `warmup` judged steps, exceeds its window's median by `threshold` robust standard
  deviations and by `min_excess` of the median. Only accepted steps enter the windows. Under torch.distributed
  one SUM all-reduce carries each rank's share of the squared global gradient norm (guard_norm.py: exact for
  DDP, FSDP2 and HSDP shards), its loss flags and the rollback flag; every rank then judges the same global norm
  against the same window history, so every rank decides the same and replicas and shards never diverge.
- A bad step leaves the weights and the optimizer state (moments, step counts) exactly as before it. How
  (`mechanism`, "auto" picks the first that applies):
    found_inf  fused optimizers (fused=True): the flag goes to the kernel as `optimizer.found_inf`, the same
               path torch.amp.GradScaler uses; no copy, no sync (state the kernel creates on the very first
               step starts at zero, which is what a fresh state is).
    host       parameters on the CPU: the flag is read at once (free there); a bad step's parameters and
               state are copied before the update and put back after it. Good steps copy nothing.
    restore    other devices: every step copies the parameters and state (one foreach copy into kept
               buffers: memory and bandwidth of one more copy of the optimizer's tensors) and a bad step is
               undone with a device-side where (no sync). State off the device (Adam's CPU step counters)
               is fixed from the flag at the next step, from its non-blocking copy (an event wait).
  The optimizer's first guarded step uses `host` whatever the mechanism (one read of the flag, which waits
  for the device once): that step creates the optimizer state, and a fused kernel told to skip it would leave
  e.g. SGD's momentum buffers uninitialised; `host` removes state a skipped first step created.
- A step the GradScaler skips (Inf/NaN scaled gradients) is the scaler's, not the guard's: not counted, not
  pushed into the windows. With gradient accumulation the guard judges each optimizer step once.
- `take()` gives the report its reason flags (0-d, on the device; 0: the update was applied). With the
  rollback policy, rollback.py restores the last good state after `rollback_after` skips.
Failures inside the hooks go to errors.report: the step then goes ahead unguarded, never blocked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from gradwatch.agent import errors
from gradwatch.agent.guard_config import GuardSettings
from gradwatch.agent.guard_norm import GradNorm, SharedNorms
from gradwatch.agent.guard_rollback import Rollback
from gradwatch.agent.guard_state import SavedState, WhereRestore
from gradwatch.agent.guard_window import HostWindow, RobustWindow
from gradwatch.agent.hooks import has_closure
from gradwatch.agent.snapshot import HostCopy, read_all, read_now, start_copy

__all__ = ["REASONS", "Guard", "check_setup", "pick_mechanism", "reason_names"]

logger = logging.getLogger("gradwatch.agent")

#: Reason bits of a skipped step, as the report carries them (StepReport.guard_skip_reasons).
REASONS = {1: "loss_non_finite", 2: "grad_non_finite", 4: "loss_spike", 8: "grad_spike", 16: "rolled_back"}


def reason_names(bits: int) -> list[str]:
    return [name for bit, name in REASONS.items() if bits & bit]


class Guard:
    """Optimizer hooks that skip bad updates (see the module docstring)."""

    def __init__(
        self,
        settings: GuardSettings,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        world_size: int,
        submit_event: Callable[[str, str, dict[str, str]], None],
        restore_callback: Callable[[int], int | None] | None = None,
        add_agent_time: Callable[[float], None] = lambda seconds: None,
        plain_replication: int | None = None,
    ) -> None:
        """`plain_replication`: ranks holding each plain (non-DTensor) gradient (default: the world)."""
        self.settings = settings
        self._optimizer = optimizer
        self._device = device
        self._world_size = world_size
        self._add_agent_time = add_agent_time
        distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
        replication = world_size if plain_replication is None else plain_replication
        self._norm = GradNorm(optimizer, device, distributed=distributed, plain_replication=replication)
        # Made once here: a tensor built from a Python list on an accelerator is a host-to-device copy that waits.
        self._bit_values = torch.tensor([float(bit) for bit in REASONS], device=device)
        self.unjudged_steps = 0  # optimizer.step(closure) calls: applied without a verdict
        #: The last verdict's global gradient norm (0-d, unscaled; NaN before the first) and reason flags
        #: (0-d, 0: applied), on the device; kept for inspection (reading them on the host syncs).
        self.judged_grad_norm = torch.full((), math.nan)
        self.last_reasons = torch.zeros(())
        self.mechanism = pick_mechanism(settings.mechanism, optimizer, device)
        self._loss_window = RobustWindow(settings.window, device)
        self._norm_window = RobustWindow(settings.window, device)
        self._host_verdict = self.mechanism == "host"
        self._host_windows = (HostWindow(settings.window), HostWindow(settings.window))
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._judged = 0
        self.optimizer_steps = 0
        self._reasons: torch.Tensor | None = None  # this step's flags, for the report
        self._saved: SavedState | None = None  # host mechanism: the bad step's state
        self._where = WhereRestore(optimizer, device) if self.mechanism == "restore" else None
        self._where_pending: HostCopy | None = None  # restore: the flag on its way to host memory
        self._own_found_inf = False
        self._stated = False  # the optimizer's first guarded step (it creates the state) is done
        self._step_mechanism = self.mechanism
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._lr_saved: list[Any] | None = None
        self.rollback = Rollback(settings, optimizer, submit_event, restore_callback, device)
        self._active = True
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------------ training thread

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """This micro step's loss, given before optimizer.step() (a per-sample loss counts by its mean)."""
        t = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        t = (t.float().mean() if t.numel() != 1 else t.reshape(())).to(self._device, torch.float32)
        self._loss_sum = t if self._loss_sum is None else self._loss_sum + t
        self._loss_count += 1

    def share_norms(self, shared: SharedNorms) -> None:
        """Judge the per-parameter gradient norms the agent's optimizer tap computes in the same step
        (`OptimizerTap.step_grad_norms`) instead of a second pass over the gradients (guard_norm.py)."""
        self._norm.shared = shared

    @property
    def shared_norm_steps(self) -> int:
        """Optimizer steps judged from the tap's norms (see share_norms)."""
        return self._norm.shared_steps

    def take(self) -> tuple[torch.Tensor | None, int | None]:
        """(reason flags of the last optimizer step since the previous call, or None; the step a rollback
        restored since then, or None); then forget them."""
        reasons, self._reasons = self._reasons, None
        # A loss the optimizer never judged (the GradScaler skipped the step) is not carried to the next one.
        self._loss_sum, self._loss_count = None, 0
        return reasons, self.rollback.take_restored()

    def remove(self) -> None:
        self._active = False
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    # ------------------------------------------------------------------ hooks

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        with errors.guarded("guard_pre_hook", self._add_agent_time):
            self._reasons = None  # until decided below: a failure leaves the step unguarded
            self._settle_previous()
            if has_closure(args, kwargs):  # its gradients come inside the step, after this hook: not judged
                self._reasons, self._step_mechanism = None, "unjudged"
                self.unjudged_steps += 1
                if self.unjudged_steps == 1:
                    logger.warning(
                        "gradwatch: guard: optimizer.step(closure) computes its gradients after the "
                        "guard's hook; such steps are applied unjudged (counted: guard.unjudged_steps)"
                    )
                return
            rolled_back = self.rollback.before_step(self.optimizer_steps + 1)
            if self._host_verdict:  # CPU: the values are in host memory; Python beats a dozen tiny kernels
                bits = self._decide_host(rolled_back)
                self._reasons = self.last_reasons = torch.full((), float(bits))
                self._saved = SavedState.take(optimizer) if bits else None
                self._step_mechanism, self._stated = "host", True
                self._scale_lr(True)
                return
            reasons = self._decide(rolled_back)
            bad = reasons > 0
            self._reasons = self.last_reasons = reasons
            mechanism = self.mechanism
            if not self._stated:  # the first step creates the state: put it back exactly, one read of the flag
                mechanism, self._stated = "host", True
            if mechanism == "found_inf":
                existing = getattr(optimizer, "found_inf", None)
                flag = bad.to(torch.float32)
                optimizer.found_inf = flag if existing is None else torch.maximum(existing, flag.to(existing.device))
                self._own_found_inf = existing is None
            elif mechanism == "host":
                if read_now(bad):
                    self._saved = SavedState.take(optimizer)
            else:
                assert self._where is not None
                self._where.before()
            self._bad = bad
            self._step_mechanism = mechanism
            self._scale_lr(True)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._active:
            return
        with errors.guarded("guard_post_hook", self._add_agent_time):
            self.optimizer_steps += 1
            self._scale_lr(False)
            mechanism = self._step_mechanism
            if mechanism == "found_inf":
                if self._own_found_inf and hasattr(optimizer, "found_inf"):
                    del optimizer.found_inf
                self._own_found_inf = False
            elif mechanism == "host":
                saved, self._saved = self._saved, None
                if saved is not None:
                    saved.restore()
            elif self._where is not None and self._reasons is not None and self._where.after(self._bad):
                # Queued behind this step's kernels (non-blocking, with an event): by the next step's pre-hook
                # it has usually landed, and waiting for it never waits for the next step's forward/backward.
                self._where_pending = start_copy([[self._bad.to(torch.float32)]])
            if self._reasons is not None:
                self.rollback.after_step(self.optimizer_steps, self._reasons)

    # ------------------------------------------------------------------ internals

    def _settle_previous(self) -> None:
        """restore mechanism: the host part of the previous bad step (one read of a landed flag)."""
        pending, self._where_pending = self._where_pending, None
        if pending is not None and self._where is not None:
            self._where.settle(float(pending.to_numpy()[0]) > 0)

    def _decide(self, rolled_back: bool) -> torch.Tensor:
        """The step's reason flags (0-d float32 on the device), the same on every rank."""
        s, device = self.settings, self._device
        zero = torch.zeros((), device=device)
        loss, judged_loss = zero, False
        if self._loss_sum is not None and s.judge_loss:
            loss, judged_loss = self._loss_sum / self._loss_count, True
        self._loss_sum, self._loss_count = None, 0
        self._mark_start((self._loss_window, self._norm_window))
        spikes_on = self._judged >= s.warmup
        limits = (s.threshold, s.min_excess, s.min_rise)
        scaler_found = getattr(self._optimizer, "found_inf", None)
        scaler_found = scaler_found.to(device, torch.float32) if isinstance(scaler_found, torch.Tensor) else None
        # This rank's loss flags and norm share; summed over ranks by one all-reduce (norm² shares add up to
        # the global norm², flags to "some rank saw it"): every rank then holds the same values.
        rank_flags = [
            ~torch.isfinite(loss) if judged_loss else zero.bool(),
            loss > self._loss_window.threshold(*limits) if judged_loss and spikes_on else zero.bool(),
        ]
        local = torch.stack([self._norm.share(), *rank_flags, torch.full((), float(rolled_back), device=device)])
        local = local.to(torch.float32)
        if scaler_found is not None:  # the scaler skips this step itself: not the guard's skip
            local[1:3] *= scaler_found <= 0
        summed = self._all_reduce(local)
        norm = summed[0].sqrt()
        scale = getattr(self._optimizer, "grad_scale", None)  # fused + GradScaler: gradients are still scaled
        if isinstance(scale, torch.Tensor):
            norm = norm / scale.to(device, torch.float32)
        self.judged_grad_norm = norm
        # From the same summed norm and the same window history on every rank: the same flags everywhere.
        grad_flags = torch.stack([
            ~torch.isfinite(norm) if s.judge_grad_norm else zero.bool(),
            norm > self._norm_window.threshold(*limits) if s.judge_grad_norm and spikes_on else zero.bool(),
        ]).to(torch.float32)  # fmt: skip
        if scaler_found is not None:
            grad_flags = grad_flags * (scaler_found <= 0)
        flags = torch.stack([summed[1], grad_flags[0], summed[2], grad_flags[1], summed[3]]) > 0
        reasons = (flags.to(torch.float32) * self._bit_values).sum()
        keep = (reasons > 0) | (~torch.isfinite(norm))
        if scaler_found is not None:
            keep = keep | (scaler_found > 0)
        if judged_loss:
            self._loss_window.push(loss, keep)
        self._norm_window.push(norm, keep)
        self._judged += 1
        return reasons

    def _decide_host(self, rolled_back: bool) -> int:
        """`_decide` for CPU parameters, on the host: the same rules, reason bits as an int."""
        s = self.settings
        loss, judged_loss = math.nan, False
        if self._loss_sum is not None and s.judge_loss:
            loss, judged_loss = read_now(self._loss_sum) / self._loss_count, True
        self._loss_sum, self._loss_count = None, 0
        loss_window, norm_window = self._host_windows
        self._mark_start(self._host_windows)
        spikes_on = self._judged >= s.warmup
        limits = (s.threshold, s.min_excess, s.min_rise)
        rank_flags = [
            judged_loss and not math.isfinite(loss),
            judged_loss and spikes_on and loss > loss_window.threshold(*limits),
        ]
        flags_here = torch.tensor([*rank_flags, rolled_back], dtype=torch.float32)
        local = torch.cat([self._norm.share().reshape(1), flags_here])
        square, loss_bad, loss_spike, rolled = read_all(self._all_reduce(local))
        norm = math.sqrt(square)
        self.judged_grad_norm = torch.tensor(norm)
        flags = [
            loss_bad > 0,
            s.judge_grad_norm and not math.isfinite(norm),
            loss_spike > 0,
            s.judge_grad_norm and spikes_on and norm > norm_window.threshold(*limits),
            rolled > 0,
        ]
        bits = sum(bit for bit, flag in zip(REASONS, flags, strict=True) if flag)
        if not bits and math.isfinite(norm):
            if judged_loss:
                loss_window.push(loss)
            norm_window.push(norm)
        self._judged += 1
        return bits

    def _mark_start(self, windows: tuple[RobustWindow, RobustWindow] | tuple[HostWindow, HostWindow]) -> None:
        if self._judged == self.settings.warmup:
            for window in windows:
                window.mark_start()

    def _all_reduce(self, local: torch.Tensor) -> torch.Tensor:
        """`local` summed over every rank (one collective; itself outside torch.distributed)."""
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
        return local

    def _scale_lr(self, entering: bool) -> None:
        """During a rollback's cool-down, scale every rate for the step only (a scheduler's value is kept)."""
        if entering:
            factor = self.rollback.lr_factor()
            if factor == 1.0:
                return
            self._lr_saved = [group["lr"] for group in self._optimizer.param_groups]
            for group in self._optimizer.param_groups:
                lr = group["lr"]
                group["lr"] = lr * factor if not isinstance(lr, torch.Tensor) else lr.clone().mul_(factor)
            return
        saved, self._lr_saved = self._lr_saved, None
        if saved is not None:
            for group, lr in zip(self._optimizer.param_groups, saved, strict=True):
                group["lr"] = lr


def check_setup(wanted: str, optimizer: torch.optim.Optimizer, device: torch.device, *, grad_scaler: Any,
                sharded: bool) -> None:  # fmt: skip
    """ValueError at attach() for a guard that cannot work here (see pick_mechanism). Sharded (FSDP2) with a
    GradScaler and a non-fused optimizer: the scaler finds Inf/NaN per shard and skips optimizer.step() on
    those ranks only, so the guard's all-reduce inside the step would wait for ranks that never enter it."""
    pick_mechanism(wanted, optimizer, device)
    if sharded and grad_scaler is not None and not optimizer.defaults.get("fused"):
        raise ValueError(
            "gradwatch: guard with a GradScaler on sharded (FSDP2) parameters needs a fused optimizer "
            "(fused=True): the scaler skips optimizer.step() on some ranks only, and the guard's all-reduce in "
            "the step would wait for the others"
        )


def pick_mechanism(wanted: str, optimizer: torch.optim.Optimizer, device: torch.device) -> str:
    """The mechanism for `wanted` ("auto" or a name); ValueError when it cannot work for this optimizer."""
    fused = bool(optimizer.defaults.get("fused"))
    if wanted == "found_inf" and not fused:
        raise ValueError("gradwatch: guard.mechanism=found_inf needs a fused optimizer (fused=True)")
    if wanted == "host" and device.type != "cpu":
        raise ValueError("gradwatch: guard.mechanism=host reads the flag at once: CPU parameters only")
    if wanted != "auto":
        return wanted
    return "found_inf" if fused else "host" if device.type == "cpu" else "restore"
