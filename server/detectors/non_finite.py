"""non_finite: a NaN or Inf in the loss, a gradient or a weight, and on which rank it started.

Rationale
---------
One NaN gradient poisons the weights at the next optimizer step and everything
after it; the loss may stay finite for a few steps (or be NaN-skipped by a scaler),
and Prometheus cannot alert on a NaN-valued gauge. So this detector needs no
threshold and no history: any report whose flags, loss, gradient norm or per-layer
columns show a non-finite value fires, for that rank and step, naming the
first layer when the agent or the columns know it (NaN provenance). It evaluates
every report, so nothing is sampled away. Mixed-precision loss scalers skip steps
with Inf gradients on purpose; a run that recovers stops being reported and the
alert resolves after `resolve_after` consecutive finite reports from that rank.

Origin across ranks
-------------------
In data-parallel training the gradient all-reduce copies one rank's NaN into every
rank's gradients, so every rank fires at the same step and "ranks [0, 1]" says
nothing about where to look. The agent's forward hooks say whether a rank's own
input, modules or loss were non-finite (`RankReport.origin`, the loss flag): such a
rank is an **origin**; a rank whose input, forward and loss were finite and whose
only non-finite values are gradients (or the weights they updated) **received** them
through the collective. It is a cross-rank detector for that reason: a rank's first
non-finite report of a step is held until every live rank has reported that step
(sync data parallelism sends them within milliseconds of each other) or for at most
`hold_s` seconds of server time (the 1 s tick), then the origin ranks fire first, so
the alert opens with the rank it started on, and the summaries name both sets. When
no rank's forward was non-finite the values arose in a backward pass or the
collective itself, which the forward hooks cannot place, and the summary says so.
A rank already firing fires again at once (the alert follows the latest step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.detectors.base import Clear, DetectorConfig, DetectorSpec, Finding, Fire
from gradwatch.server.detectors.batch import ReportBatch
from gradwatch.server.detectors.layerwise import CLEAR, FIRE, Latch
from gradwatch.server.ranktable import RankTable
from gradwatch.server.report import KIND_LOSS, RankReport
from gradwatch.server.settings import setting

__all__ = ["SPEC", "NonFiniteConfig", "NonFiniteDetector"]

#: Steps whose first non-finite reports may wait for their peers at once; older ones are judged without them.
MAX_PENDING_STEPS = 32


@dataclass(frozen=True)
class NonFiniteConfig(DetectorConfig):
    resolve_after: int = setting(
        20, doc="Consecutive finite reports from a rank before its part of the alert resolves.", ge=1
    )
    hold_s: float = setting(
        1.0,
        doc="Longest a rank's first non-finite report waits for the other ranks' reports of its step (seconds).",
        ge=0.0,
        le=60.0,
    )


class NonFiniteDetector:
    """Fires on any non-finite report, origin ranks first; clears after a streak of finite ones (per rank)."""

    def __init__(self, config: NonFiniteConfig) -> None:
        self._config = config
        self._latch = Latch(resolve_after=config.resolve_after)
        # step -> rank -> its first non-finite report of that step, waiting for the other ranks' reports.
        self._pending: dict[int, dict[int, RankReport]] = {}
        self._restless: set[int] = set()

    def observe(self, report: RankReport, ranks: RankTable) -> Sequence[Finding]:
        rank = report.rank
        findings: list[Finding] = []
        if not report.non_finite_kinds:
            if self._latch.judge(rank, False) == CLEAR:
                findings.append(Finding(rank, Clear(step=report.step)))
        elif self._latch.firing(rank):
            self._latch.judge(rank, True)
            findings.append(Finding(rank, self._fire(report, (), ()), report))
        else:
            self._pending.setdefault(report.step, {}).setdefault(rank, report)
        self._note(rank)
        findings += self._flush(ranks, now=None)
        return findings

    def plan_batch(self, batch: ReportBatch, ranks: RankTable) -> bool | None:
        """A batch (all finite, see server/detectors/batch.py) while no step is held: only its reports of ranks
        firing or counting towards a clear change anything (`observe_batch` judges those in order); with a step
        held it is fed one report at a time."""
        return None if self._pending else True

    def observe_batch(self, batch: ReportBatch, ranks: RankTable, plan: bool) -> list[tuple[int, Finding]]:
        """`observe` of each finite report, nothing held: judge(rank, False) of a rank at rest changes nothing
        (Latch.at_rest), so only the restless ranks' reports are judged, in the batch's order."""
        if not self._restless:
            return []
        found: list[tuple[int, Finding]] = []
        for index in np.flatnonzero(np.isin(batch.rank, list(self._restless))).tolist():
            rank = int(batch.rank[index])
            if self._latch.judge(rank, False) == CLEAR:
                found.append((index, Finding(rank, Clear(step=int(batch.step[index])))))
            self._note(rank)
        return found

    def _note(self, rank: int) -> None:
        """Keep `_restless`, the ranks whose latch is not at rest (firing, or a streak running)."""
        if self._latch.at_rest(rank):
            self._restless.discard(rank)
        else:
            self._restless.add(rank)

    def tick(self, ranks: RankTable, now: float) -> Sequence[Finding]:
        return self._flush(ranks, now=now)

    def _flush(self, ranks: RankTable, now: float | None) -> list[Finding]:
        """Judge every held step that all live ranks have reported, that waited hold_s, or that is too old."""
        findings: list[Finding] = []
        if not self._pending:
            return findings  # the usual report: nothing held, and no reason to look at the table
        live = ranks.joined & ~ranks.finished  # a rank yet to report its first step is waited for too
        reached = int(ranks.last_step[live].min()) if live.any() else None
        for step in sorted(self._pending):
            held = self._pending[step]
            waited = now is not None and now - min(r.received_at for r in held.values()) >= self._config.hold_s
            complete = reached is None or reached >= step
            if complete or waited or len(self._pending) > MAX_PENDING_STEPS:
                del self._pending[step]
                findings += self._judge_step(held)
        return findings

    def _judge_step(self, held: dict[int, RankReport]) -> list[Finding]:
        origins = tuple(sorted(r for r, report in held.items() if _forward_non_finite(report)))
        received = tuple(sorted(r for r in held if r not in origins))
        findings = []
        for rank in (*origins, *received):  # origins first: the alert opens with the rank it started on
            if self._latch.judge(rank, True) == FIRE:
                findings.append(Finding(rank, self._fire(held[rank], origins, received), held[rank]))
            self._note(rank)
        return findings

    def _fire(self, report: RankReport, origins: tuple[int, ...], received: tuple[int, ...]) -> Fire:
        summary = _summary(report) + _attribution(report.rank, held=(*origins, *received), origins=origins)
        return Fire(step=report.step, value=_bad_count(report), summary=summary, layer=report.layer_name)


def _forward_non_finite(report: RankReport) -> bool:
    """The rank's own input, a module's output or its loss was non-finite: the values started here."""
    return report.origin is not None or KIND_LOSS in report.non_finite_kinds


def _attribution(rank: int, held: tuple[int, ...], origins: tuple[int, ...]) -> str:
    """Where the rank's values came from, judged over the ranks whose first non-finite report was this step."""
    if not held:
        return ""
    if rank in origins:
        others = [r for r in held if r not in origins]
        if not others:
            return ""
        return f"; rank(s) {_ranks(others)} only received it through the gradient collective"
    if origins:
        return (
            f"; rank {rank}'s input, forward and loss were finite: it received the values through the gradient "
            f"collective from rank(s) {_ranks(origins)}"
        )
    return (
        f"; the input, forward and loss of rank(s) {_ranks(held)} were finite: the values arose in a backward pass "
        f"or the collective, which the forward hooks cannot place on one rank"
    )


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _bad_count(report: RankReport) -> float | None:
    """Non-finite elements in the implicated layer, when the columns carry counts."""
    if report.non_finite_layer is None:
        return None
    for column in ("grad_non_finite", "weight_non_finite"):
        counts = report.columns.get(column)
        if counts is not None and report.non_finite_layer < counts.size:
            value = float(counts[report.non_finite_layer])
            if value > 0:
                return value
    return None


def _summary(report: RankReport) -> str:
    kinds = list(report.non_finite_kinds)
    what = kinds[0] if len(kinds) < 2 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    where = f" first in layer {report.layer_name!r}" if report.layer_name is not None else ""
    origin = f"; it started in the {report.origin}" if report.origin is not None else ""
    return f"non-finite {what} on rank {report.rank} at step {report.step}{where}{origin}"


SPEC = DetectorSpec(
    name="non_finite",
    severity="critical",
    description="NaN or Inf in the loss, a gradient or a weight.",
    config_type=NonFiniteConfig,
    factory=lambda config: NonFiniteDetector(config),
    # A NaN makes gradients "explode", the loss jump and the updates blow up too: page once, for the cause.
    inhibits=("exploding_gradient", "loss_divergence", "loss_spike", "update_ratio", "input_not_normalized"),
    scope="run",
)
