"""guard_rollback: the agent's guard restored the last known-good state (skipping was not enough).

Rationale
---------
With `attach(..., guard="rollback")` the agent restores the weights and optimizer state of its last
known-good snapshot (or the user's checkpoint through their callback) after `rollback_after` skipped
updates within `rollback_window` steps (docs/guard.md). Training continues from an earlier state, so
the steps since then are lost work and the cause (bad data, too high a learning rate) is probably still
there: a warning with the step restored, counted in gradwatch_guard_rollbacks_total. It resolves after
`resolve_after` consecutive reports without a rollback.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Fire, Verdict, forget_rank
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "GuardRollbackConfig", "GuardRollbackDetector"]


@dataclass(frozen=True)
class GuardRollbackConfig(DetectorConfig):
    resolve_after: int = setting(
        100, doc="Consecutive reports without a rollback before a rank's part of the alert resolves.", ge=1
    )


class GuardRollbackDetector:
    """Fires on a report that says a rollback happened; clears after a streak of reports without one."""

    def __init__(self, config: GuardRollbackConfig) -> None:
        self._latch = Latch(resolve_after=config.resolve_after)

    def forget(self, rank: int) -> None:
        forget_rank(rank, self._latch)

    def observe(self, report: RankReport) -> Verdict | None:
        restored = report.guard_rolled_back_to
        kind = self._latch.judge(report.rank, restored is not None)
        if kind == FIRE and restored is not None:
            summary = (f"the guard rolled rank {report.rank} back at step {report.step}: weights and optimizer "
                       f"state restored from optimizer step {restored}")  # fmt: skip
            return Fire(step=report.step, value=float(restored), summary=summary)
        return Clear(step=report.step) if kind == CLEAR else None


SPEC = DetectorSpec(
    name="guard_rollback",
    severity="warning",
    description="The agent's guard restored the last known-good weights and optimizer state.",
    config_type=GuardRollbackConfig,
    factory=lambda config: GuardRollbackDetector(config),
)
