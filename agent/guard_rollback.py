"""The guard's rollback: when skipping is not enough, put back the last known-good state.

Contract (policy "rollback"; every other policy makes this inert)
- Skip flags are read on the host a fixed number of optimizer steps after their step (`LAG`: 1 on the CPU,
  where the flag is already there; 2 elsewhere, when its copy has long landed), so every rank reads the same
  flags at the same step and rolls back together.
- Every `snapshot_every` optimizer steps a candidate snapshot of the parameters and optimizer state is copied
  to host memory (guard_state.SavedState, non-blocking from CUDA), when it fits `snapshot_budget_mb`. It
  becomes the known-good state once its own step's flag is read and says "applied".
- `rollback_after` skips within `rollback_window` steps trigger a rollback at the next step: the user's
  `restore_callback(step)` when given (it loads their checkpoint and returns the step it restored, or None
  when it could not), else the known-good snapshot. That step's update is skipped too (its gradients came
  from the state being abandoned), the skip history starts over, and for `lr_scale_steps` steps every rate is
  scaled by `lr_scale`. Each rollback is an event ("guard_rollback") and travels in the next report, where
  the server raises the guard_rollback alert; a trigger with nothing to restore is an event too.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable

import torch

from gradwatch.agent.guard_config import GuardSettings
from gradwatch.agent.guard_state import SavedState, state_bytes
from gradwatch.agent.snapshot import HostCopy, start_copy

__all__ = ["Rollback"]

logger = logging.getLogger("gradwatch.agent")


class Rollback:
    """Snapshots and the rollback trigger for one optimizer (see the module docstring)."""

    def __init__(
        self,
        settings: GuardSettings,
        optimizer: torch.optim.Optimizer,
        submit_event: Callable[[str, str, dict[str, str]], None],
        restore_callback: Callable[[int], int | None] | None,
        device: torch.device,
    ) -> None:
        self._settings = settings
        self._enabled = settings.policy == "rollback"
        self._optimizer = optimizer
        self._submit_event = submit_event
        self._callback = restore_callback
        self._lag = 1 if device.type == "cpu" else 2
        self._flags: collections.deque[tuple[int, HostCopy]] = collections.deque()
        self._skips: collections.deque[int] = collections.deque()  # optimizer steps of known skips
        self._candidate: SavedState | None = None
        self._good: SavedState | None = None
        self._over_budget_told = False
        self._restored: int | None = None
        self._cool_down = 0
        self.rollbacks = 0

    def before_step(self, step: int) -> bool:
        """Called before optimizer step `step` is judged; True when it rolled back (skip this step's update)."""
        if not self._enabled:
            return False
        self._read_flags(step)
        window = self._settings.rollback_window
        while self._skips and self._skips[0] <= step - window:
            self._skips.popleft()
        if len(self._skips) < self._settings.rollback_after:
            return False
        skips = len(self._skips)
        self._skips.clear()
        restored, source = self._restore(step)
        if restored is None:
            self._submit_event("guard_rollback_unavailable",
                               f"{skips} skipped steps but no known-good state to restore (no snapshot, no callback)",
                               {"skips": str(skips)})  # fmt: skip
            return False
        self.rollbacks += 1
        self._restored = restored
        # This step's update is skipped: the cool-down covers the `lr_scale_steps` steps after it.
        self._cool_down = self._settings.lr_scale_steps + 1 if self._settings.lr_scale != 1.0 else 0
        message = f"rolled back to step {restored} ({source}) after {skips} skipped steps"
        logger.warning("gradwatch: %s", message)
        self._submit_event("guard_rollback", message, {
            "restored_step": str(restored), "source": source, "skips": str(skips),
            "lr_scale": str(self._settings.lr_scale), "lr_scale_steps": str(self._settings.lr_scale_steps),
        })  # fmt: skip
        return True

    def after_step(self, step: int, reasons: torch.Tensor) -> None:
        """Optimizer step `step` is done (applied or undone): queue its flag, snapshot on schedule."""
        if not self._enabled:
            return
        if self._cool_down > 0:
            self._cool_down -= 1
        self._flags.append((step, start_copy([[reasons]])))
        if step % self._settings.snapshot_every != 0 or self._callback is not None:
            return
        size_mb = state_bytes(self._optimizer) / 2**20
        if size_mb > self._settings.snapshot_budget_mb:
            if not self._over_budget_told:
                self._over_budget_told = True
                budget = self._settings.snapshot_budget_mb
                message = f"a snapshot needs {size_mb:.0f} MiB, over the {budget:g} MiB budget: no rollback"
                self._submit_event("guard_snapshot_over_budget", message, {"size_mb": f"{size_mb:.1f}"})
            return
        self._candidate = SavedState.take(self._optimizer, step, to_cpu=True)

    def lr_factor(self) -> float:
        return self._settings.lr_scale if self._cool_down > 0 else 1.0

    def take_restored(self) -> int | None:
        restored, self._restored = self._restored, None
        return restored

    def _read_flags(self, step: int) -> None:
        while self._flags and self._flags[0][0] <= step - self._lag:
            flag_step, copy = self._flags.popleft()
            skipped = float(copy.to_numpy()[0]) > 0
            if skipped:
                self._skips.append(flag_step)
            candidate = self._candidate
            if candidate is not None and candidate.step == flag_step:
                self._candidate = None
                if not skipped:
                    self._good = candidate

    def _restore(self, step: int) -> tuple[int | None, str]:
        if self._callback is not None:
            return self._callback(step), "callback"
        good = self._good
        if good is None:
            return None, "snapshot"
        good.synchronize()
        good.restore()
        return good.step, "snapshot"
