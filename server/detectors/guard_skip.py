"""guard_skip: the agent's guard did not apply an optimizer update (a loss or gradient spike, or a NaN).

Rationale
---------
With `attach(..., guard="skip")` the agent judges every optimizer step on the device and leaves the
weights and optimizer state untouched when the loss or the global gradient norm is non-finite or far
above its recent window (docs/guard.md). The run keeps going, so nothing pages; but a skip is never
silent: each one is counted (gradwatch_guard_skipped_steps_total) and this warning opens an incident
whose flight-recorder window shows the step, and whose autopsy names the batch ids and the samples with
the highest loss on that rank, when the training loop passes them to monitor.step(). Every rank decides
the same, so ranks join one alert. It resolves after `resolve_after` consecutive applied updates.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["SPEC", "GuardSkipConfig", "GuardSkipDetector", "skip_reasons"]

_REASONS = (
    (pb.GUARD_SKIP_REASON_LOSS_NON_FINITE, "non-finite loss"),
    (pb.GUARD_SKIP_REASON_GRAD_NON_FINITE, "non-finite gradient norm"),
    (pb.GUARD_SKIP_REASON_LOSS_SPIKE, "loss spike"),
    (pb.GUARD_SKIP_REASON_GRAD_SPIKE, "gradient-norm spike"),
    (pb.GUARD_SKIP_REASON_ROLLED_BACK, "rolled back"),
)


def skip_reasons(bits: int) -> list[str]:
    """Human names of GuardSkipReason bits."""
    return [name for bit, name in _REASONS if bits & bit]


@dataclass(frozen=True)
class GuardSkipConfig(DetectorConfig):
    resolve_after: int = setting(
        50, doc="Consecutive reports with the update applied before a rank's part of the alert resolves.", ge=1
    )


class GuardSkipDetector:
    """Fires on every report whose update the guard skipped; clears after a streak of applied ones."""

    def __init__(self, config: GuardSkipConfig) -> None:
        self._latch = Latch(resolve_after=config.resolve_after)

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch)

    def observe(self, report: RankReport) -> Verdict | None:
        bits = report.guard_skip_reasons
        kind = self._latch.judge(report.rank, bool(bits))
        if kind == FIRE:
            why = ", ".join(skip_reasons(bits)) or "unknown reason"
            summary = f"the guard skipped the optimizer update of step {report.step} on rank {report.rank} ({why})"
            return Fire(step=report.step, value=float(bits), summary=summary, layer=report.layer_name)
        return Clear(step=report.step) if kind == CLEAR else None


SPEC = DetectorSpec(
    name="guard_skip",
    severity="warning",
    description="The agent's guard did not apply an optimizer update (spike or non-finite loss or gradient).",
    config_type=GuardSkipConfig,
    factory=lambda config: GuardSkipDetector(config),
)
