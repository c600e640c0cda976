"""stalled: a rank, or the whole run, stopped making progress while it should be training.

Rationale
---------
Hangs are the costliest silent failure of large jobs: a collective waiting for a rank
that died or took another branch, a deadlocked data loader, a frozen node. Nothing
errors; the job burns its allocation until a human looks. The agent's sender thread
keeps heart-beating while the training loop hangs, so liveness is not progress: a rank
is judged on when its *step* last advanced (a report, or a heartbeat saying the
training thread got further), against its own pace: stalled when

    now − last progress > max(floor_s, factor × its median recent step time)

The floor keeps fast-stepping jobs from paging on an ordinary pause (garbage
collection, a checkpoint, evaluation); the factor lets slow jobs take their time.
This is judged on the server's timer (`tick`), so it fires while nothing arrives.

Whole run or single ranks: in synchronous training one hung rank stops everyone at the
next collective, so usually every rank stalls together. The alert then names the
suspects: the ranks behind the others (the rest already reported the step the suspect
never finished and wait for it in the next collective), else the ranks whose frames
stopped altogether for `silent_after_s` (process frozen, dead or cut off); with no
such clue it names every rank ("the whole run stalled"). When only some ranks stall
while others still advance (progressed within half their threshold), it names those.
Ranks that said goodbye, and ranks that have not reported yet (still starting), are
not judged. Ranks ahead of the slowest one are judged from the later of their own last
progress and the moment the slowest rank last moved, so the ranks that waited for a
hung peer do not page once it recovers (they need a moment to get going again). The
Prometheus rule GradwatchRunStale (docs/runbooks/run_stale.md) stays as a coarse
backstop that needs no detector state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "StalledConfig", "StalledDetector"]


@dataclass(frozen=True)
class StalledConfig(DetectorConfig):
    floor_s: float = setting(
        300.0, doc="Never stalled before this many seconds without progress (evaluation, checkpoints).", gt=0.0
    )
    factor: float = setting(20.0, doc="... nor before factor × the rank's median recent step time.", gt=1.0)
    silent_after_s: float = setting(
        30.0, doc="A rank without any frame (not even a heartbeat) this long is named as frozen or dead.", gt=0.0
    )


class StalledDetector:
    """Judges every rank's time since its last progress on each tick (see module docstring)."""

    def __init__(self, config: StalledConfig) -> None:
        self._config = config
        self._firing = np.zeros(0, dtype=bool)
        self._lowest_step: int | None = None  # the lowest step of the live ranks, and when a tick saw it move
        self._lowest_step_at = float("-inf")

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        """Nothing to do per report: the table already holds the progress; the next tick judges (and clears)."""
        return ()

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        cfg = self._config
        if self._firing.size < ranks.size:
            self._firing = np.concatenate([self._firing, np.zeros(ranks.size - self._firing.size, dtype=bool)])
        live = ranks.live()
        lowest = int(ranks.last_step[live].min()) if live.any() else -1
        if lowest != self._lowest_step:
            if self._lowest_step is not None:  # a move, not the first look
                self._lowest_step_at = now
            self._lowest_step = lowest
        # A rank waiting in a collective for the slowest one starts its clock again when that one moves.
        gap = now - np.fmax(ranks.progress_at, self._lowest_step_at)
        with np.errstate(invalid="ignore"):
            threshold = np.fmax(cfg.floor_s, cfg.factor * ranks.step_time())  # fmax: NaN step time → floor
            stalled = live & (gap > threshold)
            silent = live & ((now - ranks.heard_at) > cfg.silent_after_s)
        firing, summary = self._judge(ranks, live, stalled, silent, gap, threshold)
        findings: list[Finding] = []
        for rank in np.flatnonzero(self._firing & ~firing):
            findings.append(Finding(int(rank), Clear(step=int(ranks.last_step[rank]))))
        for rank in np.flatnonzero(firing):
            findings.append(Finding(int(rank), Fire(step=int(ranks.last_step[rank]), value=float(gap[rank]),
                                                    summary=summary)))  # fmt: skip
        self._firing = firing
        return findings

    def _judge(self, ranks: RankTable, live: np.ndarray, stalled: np.ndarray, silent: np.ndarray, gap: np.ndarray,
               threshold: np.ndarray) -> tuple[np.ndarray, str]:  # fmt: skip
        """Which ranks to name, and the alert's sentence."""
        if not stalled.any():
            return stalled, ""
        steps = ranks.last_step[live]
        worst = int(np.argmax(np.where(stalled, gap, -np.inf)))
        pace = f"no progress for {gap[worst]:.0f} s, threshold {threshold[worst]:.0f} s"
        with np.errstate(invalid="ignore"):
            moving = live & ~(gap > threshold / 2)  # progressed within half their threshold: still training
        if moving.any():
            summary = (f"{ranks.describe(np.flatnonzero(stalled))} stalled at step {ranks.last_step[worst]} "
                       f"({pace}) while {int(moving.sum())} other rank(s) advance, now at step "
                       f"{int(ranks.last_step[moving].max())}")  # fmt: skip
            return stalled, summary
        # Nobody moves: the whole run is stuck (ranks not yet over their threshold soon will be).
        behind = stalled & (ranks.last_step == steps.min()) if steps.min() < steps.max() else np.zeros_like(stalled)
        if behind.any():
            summary = (f"the whole run stalled ({pace}): {ranks.describe(np.flatnonzero(behind))} stuck at step "
                       f"{int(steps.min())} while the other ranks finished step {int(steps.max())} and wait for "
                       "it, probably in a collective")  # fmt: skip
            return behind, summary
        frozen = stalled & silent
        if frozen.any() and not silent[live].all():
            summary = (f"the whole run stalled at step {int(steps.max())} ({pace}); "
                       f"{ranks.describe(np.flatnonzero(frozen))} also stopped sending heartbeats (process "
                       "frozen, dead or cut off): probably the cause")  # fmt: skip
            return frozen, summary
        summary = (
            f"the whole run stalled at step {int(steps.max())} ({pace}); its {int(live.sum())} ranks "
            f"({ranks.describe(np.flatnonzero(live), limit=4)}) are at the same step, none is behind"
        )
        return stalled, summary


SPEC = DetectorSpec(
    name="stalled",
    severity="critical",
    description="A rank or the whole run stopped making training progress (a hang).",
    config_type=StalledConfig,
    factory=lambda config: StalledDetector(config),
    # A stalled run also has no throughput and makes every waiting rank look slow: page once, for the hang.
    inhibits=("throughput_drop", "straggler"),
    scope="run",
    observes=False,
)
