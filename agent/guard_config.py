"""The guard's settings: policy, thresholds, mechanism and rollback, checked at attach (no torch import).

`attach(..., guard="skip")` (or "rollback", or "off"), or a mapping `{"policy": "skip", "threshold": 8, ...}`;
the same from `GRADWATCH_GUARD` (a policy name or a JSON object). Unknown keys, wrong types and out-of-range
values raise ValueError naming the key and the accepted values. docs/guard.md explains each default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

__all__ = ["MECHANISMS", "POLICIES", "GuardSettings", "check_guard", "parse_guard_env"]

POLICIES = ("off", "skip", "rollback")
#: auto: found_inf for fused optimizers, host on the CPU, restore elsewhere (guard.py says what each costs).
MECHANISMS = ("auto", "found_inf", "host", "restore")


@dataclass(frozen=True)
class GuardSettings:
    """One run's guard (see docs/guard.md)."""

    policy: str = "off"
    #: Accepted steps whose loss and gradient norm form the robust baseline.
    window: int = 128
    #: Steps judged before spikes count (non-finite values are judged from the first step).
    warmup: int = 32
    #: A value is a spike when it exceeds the window's median by `threshold` robust standard deviations
    #: (1.4826 × median absolute deviation) ...
    threshold: float = 6.0
    #: ... and by at least this fraction of the median (a flat window's tiny MAD alone is no evidence).
    min_excess: float = 0.25
    #: ... and by at least this fraction of the window's median at the end of the warm-up (the run's starting
    #: level): near convergence a loss of 0.002 against a median of 0.001 is no spike.
    min_rise: float = 0.1
    #: Judge the loss (given to monitor.observe_loss before optimizer.step()) and the global gradient norm.
    judge_loss: bool = True
    judge_grad_norm: bool = True
    mechanism: str = "auto"
    #: rollback: this many skips within `rollback_window` optimizer steps restore the last good state.
    rollback_after: int = 3
    rollback_window: int = 50
    #: In-memory CPU snapshot of the weights and optimizer state every this many optimizer steps ...
    snapshot_every: int = 100
    #: ... when it fits this many MiB (else only a user callback can roll back).
    snapshot_budget_mb: float = 2048.0
    #: After a rollback, multiply every learning rate by this for `lr_scale_steps` optimizer steps (1: off).
    lr_scale: float = 1.0
    lr_scale_steps: int = 0
    #: Samples named by loss in each report when monitor.step(sample_losses=...) is given.
    top_k: int = 8

    @property
    def enabled(self) -> bool:
        return self.policy != "off"


_INTS = {
    "window": 8,
    "warmup": 0,
    "rollback_after": 1,
    "rollback_window": 1,
    "snapshot_every": 1,
    "lr_scale_steps": 0,
    "top_k": 0,
}  # fmt: skip  (name: smallest accepted value)
_BOOLS = ("judge_loss", "judge_grad_norm")
_CHOICES = {"policy": POLICIES, "mechanism": MECHANISMS}
_MAX_TOP_K = 256
_MAX_WINDOW = 1 << 16


def check_guard(label: str, value: object) -> GuardSettings:
    """A policy name, a mapping of settings or a GuardSettings -> checked GuardSettings (ValueError otherwise)."""
    if isinstance(value, GuardSettings):
        value = {f.name: getattr(value, f.name) for f in fields(GuardSettings)}
    if isinstance(value, str):
        value = {"policy": value}
    if not isinstance(value, Mapping):
        raise ValueError(f"gradwatch: {label} must be one of {', '.join(POLICIES)} or a mapping of guard settings, "
                         f"got {value!r}")  # fmt: skip
    known = {f.name for f in fields(GuardSettings)}
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:
        raise ValueError(f"gradwatch: {label}: unknown guard setting(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join(sorted(known))}")  # fmt: skip
    checked: dict[str, object] = {}
    for name, item in value.items():
        key = f"{label}.{name}"
        if name in _CHOICES:
            if item not in _CHOICES[name]:
                raise ValueError(f"gradwatch: {key}={item!r} is invalid: expected one of {', '.join(_CHOICES[name])}")
        elif name in _BOOLS:
            if not isinstance(item, bool):
                raise ValueError(f"gradwatch: {key} must be true or false, got {item!r}")
        elif name in _INTS:
            if isinstance(item, bool) or not isinstance(item, int) or item < _INTS[name]:
                raise ValueError(f"gradwatch: {key} must be an integer >= {_INTS[name]}, got {item!r}")
        elif isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item) or item <= 0:
            raise ValueError(f"gradwatch: {key} must be a positive number, got {item!r}")
        checked[name] = item
    settings = GuardSettings(**checked)  # type: ignore[arg-type]
    if settings.window > _MAX_WINDOW:
        raise ValueError(f"gradwatch: {label}.window must be <= {_MAX_WINDOW}, got {settings.window}")
    if settings.top_k > _MAX_TOP_K:
        raise ValueError(f"gradwatch: {label}.top_k must be <= {_MAX_TOP_K}, got {settings.top_k}")
    if settings.lr_scale > 1.0:
        raise ValueError(f"gradwatch: {label}.lr_scale must be in (0, 1], got {settings.lr_scale}")
    if not settings.judge_loss and not settings.judge_grad_norm:
        raise ValueError(f"gradwatch: {label}: judge_loss and judge_grad_norm are both off: nothing to judge")
    return settings


def parse_guard_env(label: str, text: str) -> object:
    """GRADWATCH_GUARD: a policy name, or a JSON object of settings."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"gradwatch: {label} is not valid JSON: {exc}") from None
    return text
