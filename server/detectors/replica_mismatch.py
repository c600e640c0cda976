"""replica_mismatch: data-parallel replicas whose parameters should be bit-identical after a step, but are not.

Rationale
---------
Replicas of a data-parallel job apply the same all-reduced gradient with the same
optimizer to the same starting weights, so after every step they hold bit-identical
parameters. When they do not, something corrupted one silently (a flipped bit in
device memory, a faulty core computing wrong values: "silent data corruption"), or a
replica desynchronised (a missed all-reduce, a rank restored from another checkpoint,
non-deterministic code that DDP does not cover). Training continues and the replicas
drift apart; the loss may look fine for a long while.

What is compared: on full-statistics steps each agent sends an exact checksum of its
parameters after the optimizer step, the wrapping 64-bit integer sum of the bit
patterns of every element, computed on the device (`StepReport.param_checksum`);
integer addition is exact and order-independent, so replicas agree to the bit and any
single flipped bit changes the sum. Each Hello names the rank's replica group (the
ranks holding the same values: DDP's data-parallel group, or for FSDP2/HSDP the ranks
along the mesh's Replicate dimensions that hold the same shard); only members of one
group are compared, at the same step, once every member has sent it. A pure FSDP shard
has no replica and is never compared. Ranks whose checksum differs from the group's
majority fire at once (an exact comparison has no noise); with no majority (two
replicas) every member differing from another is named. Checksums are compared at
the agent's checksum cadence (within 50 steps or 30 s, agent/checksum_cadence.py) and
on full-statistics steps: a flip in the lowest bits of a weight that the next
updates round away before the next comparison leaves identical replicas, and is not
(and need not be) reported. A rank clears when a later
comparison of its group agrees `resolve_after` times in a row (after a resync).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.batch import ReportBatch
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import RankReport
from gradwatch.server.settings import setting

__all__ = ["PENDING_COMPARISONS", "SPEC", "ReplicaMismatchConfig", "ReplicaMismatchDetector"]

#: (group, step) comparisons waiting for the other replicas' checksums; the oldest are dropped beyond this.
PENDING_COMPARISONS = 256


@dataclass(frozen=True)
class ReplicaMismatchConfig(DetectorConfig):
    resolve_after: int = setting(
        1, doc="Agreeing comparisons of its replica group in a row before a mismatched rank clears.", ge=1
    )


class ReplicaMismatchDetector:
    """Compares the parameter checksums of the replicas of each group at the same step."""

    def __init__(self, config: ReplicaMismatchConfig) -> None:
        self._config = config
        self._pending: collections.OrderedDict[tuple[int, int], dict[int, int]] = collections.OrderedDict()
        self._agree_streak: dict[int, int] = {}  # replica group -> agreeing comparisons in a row
        self._firing: dict[int, set[int]] = {}  # replica group -> mismatched ranks

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        if report.param_checksum is None or report.rank >= ranks.size:
            return ()
        return self._checksum(report.rank, report.step, report.param_checksum, ranks)

    def plan_batch(self, batch: ReportBatch, ranks: RankTable) -> bool:
        return True  # a report with a checksum is fed one at a time (they come every 50 steps or so)

    def observe_batch(self, batch: ReportBatch, ranks: RankTable, plan: bool) -> list[tuple[int, Finding]]:
        """`observe` for every report of the batch (see server/detectors/batch.py)."""
        findings: list[tuple[int, Finding]] = []
        for i in np.flatnonzero(batch.has_checksum & (batch.rank < ranks.size)).tolist():
            found = self._checksum(int(batch.rank[i]), int(batch.step[i]), int(batch.param_checksum[i]), ranks)
            findings += [(i, f) for f in found]
        return findings

    def _checksum(self, rank: int, step: int, checksum: int, ranks: RankTable) -> Sequence[Finding]:
        size = int(ranks.replica_group_size[rank])
        if size < 2:
            return ()
        group = int(ranks.replica_group[rank])
        key = (group, step)
        sums = self._pending.get(key)
        if sums is None:
            sums = self._pending[key] = {}
            while len(self._pending) > PENDING_COMPARISONS:
                self._pending.popitem(last=False)
        sums[rank] = checksum
        if len(sums) < size:
            return ()
        del self._pending[key]
        return self._compare(group, step, sums, ranks)

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        return ()  # judged when a group's comparison is complete

    def _compare(self, group: int, step: int, sums: dict[int, int], ranks: RankTable) -> Sequence[Finding]:
        members = np.fromiter(sums, dtype=np.int64, count=len(sums))
        values = np.fromiter(sums.values(), dtype=np.uint64, count=len(sums))
        distinct, counts = np.unique(values, return_counts=True)
        firing = self._firing.setdefault(group, set())
        if distinct.size == 1:
            streak = self._agree_streak[group] = self._agree_streak.get(group, 0) + 1
            if firing and streak >= self._config.resolve_after:
                cleared, self._firing[group] = sorted(firing), set()
                return [Finding(r, Clear(step=step)) for r in cleared]
            return ()
        self._agree_streak[group] = 0
        top = int(np.argmax(counts))
        if counts[top] * 2 > members.size:
            majority = distinct[top]
            odd = members[values != majority]
            reference = f"{int(majority):#018x} on the other {int(counts[top])} replicas"
        else:  # no majority (e.g. two replicas): every member is suspect
            odd = members
            reference = "no majority: " + ", ".join(f"{int(v):#018x}" for v in distinct[:4])
        findings = []
        for rank in np.sort(odd):
            firing.add(int(rank))
            summary = (
                f"parameters of {ranks.describe(np.array([rank]))} differ from its replicas after step {step}: "
                f"checksum {int(sums[int(rank)]):#018x} vs {reference} (replica group of {members.size} ranks "
                f"led by rank {group}): silent data corruption or a desynchronised replica"
            )
            findings.append(Finding(int(rank), Fire(step=step, value=None, summary=summary)))
        return findings


SPEC = DetectorSpec(
    name="replica_mismatch",
    severity="critical",
    description="Data-parallel replicas whose parameters should be bit-identical differ (silent data corruption).",
    config_type=ReplicaMismatchConfig,
    factory=lambda config: ReplicaMismatchDetector(config),
    scope="run",
    needs=("param_checksum",),
)
