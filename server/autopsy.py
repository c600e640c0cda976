"""Autopsy: what an alert of a bad step says about the batch that caused it.

Contract: `autopsy_of(detector, report, verdict)` is called on the ingest thread for every rank-scope
verdict. For a Fire of a detector in AUTOPSY_DETECTORS (a spike, a NaN, a skipped update) whose report
carries batch ids or top samples (monitor.step(batch_ids=..., sample_losses=...)), it returns the
autopsy (step, rank, first layer, batch ids, top samples by loss, highest first) and the Fire with one
sentence naming them added to its summary; otherwise (None, verdict). Bounded: the report's own bounds
(validate.py) and at most SUMMARY_IDS ids in the sentence.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from gradwatch.server.detectors.base import Fire, Verdict
from gradwatch.server.report import RankReport

__all__ = ["AUTOPSY_DETECTORS", "autopsy_of"]

AUTOPSY_DETECTORS = frozenset(
    {"non_finite", "loss_spike", "exploding_gradient", "loss_divergence", "guard_skip", "guard_rollback"}
)
SUMMARY_IDS = 8


def autopsy_of(
    detector: str, report: RankReport, verdict: Verdict
) -> tuple[dict[str, Any] | None, Verdict]:
    if not isinstance(verdict, Fire) or detector not in AUTOPSY_DETECTORS:
        return None, verdict
    if not report.batch_ids and not report.top_samples:
        return None, verdict
    top: list[dict[str, Any]] = [
        {"id": i, "loss": loss if math.isfinite(loss) else None, "finite": math.isfinite(loss), "index": index}
        for i, loss, index in report.top_samples
    ]
    autopsy = {
        "step": report.step,
        "rank": report.rank,
        "layer": report.layer_name,
        "batch_ids": list(report.batch_ids),
        "top_samples": top,
    }
    parts = []
    if report.batch_ids:
        shown = ", ".join(report.batch_ids[:SUMMARY_IDS])
        more = f" and {len(report.batch_ids) - SUMMARY_IDS} more" if len(report.batch_ids) > SUMMARY_IDS else ""
        parts.append(f"batch ids {shown}{more}")
    if top:
        named = ", ".join(f"{t['id']} ({_loss(t['loss'])})" for t in top[:SUMMARY_IDS])
        parts.append(f"top samples by loss on rank {report.rank}: {named}")
    return autopsy, dataclasses.replace(verdict, summary=f"{verdict.summary}; {'; '.join(parts)}")


def _loss(value: float | None) -> str:
    return "non-finite" if value is None else f"{value:.4g}"
