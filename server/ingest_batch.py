"""The aggregator's batch path: relayed compact reports of one run applied as arrays (ARCHITECTURE.md, "Two tiers").

Contract
--------
* `apply_columns(ingestor, run, rank, sessions, states, columns, now)` applies reports of relayed sessions of `run`
  (`rank[i]`, `sessions[i]`, `states[i]`: report i's rank, Session and RankState), already checked
  (server/relay_sessions.py) and not yet applied, with the effects of `Ingestor.apply` on each in turn: the rank
  table, the ranks' rings and latest values, the run's counters and global gradient norm, the flight recorder, and
  every cross-rank detector (their `plan_batch` / `observe_batch`, server/detectors/batch.py); per-rank detectors
  ran on the relay.
* It takes the batch only when that is sure to give what one report at a time gives: every report finite (no
  non-finite flag, loss or gradient norm), the run still the one held, and every cross-rank detector able to
  plan the batch. Otherwise it changes nothing and returns None: the caller applies the reports one at a time.
* Not reproduced report by report (nothing any alert depends on): the flight recorder's rows of a batch are
  appended before its findings open an incident, and ALERT commands queued during a batch go out with it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from gradwatch.server.detectors.batch import ReportBatch
from gradwatch.server.relay_columns import (
    HAS_BETWEEN,
    HAS_CHECKSUM,
    HAS_LOSS,
    HAS_PRE_FORWARD,
    HAS_SHARE,
    OVER_BUDGET,
    SKIPPED_STEP,
    Columns,
)
from gradwatch.server.store import RING_DTYPE
from gradwatch.v1 import gradwatch_pb2 as pb

if TYPE_CHECKING:
    from gradwatch.server.ingest import Ingestor
    from gradwatch.server.store import RunState

__all__ = ["apply_columns"]


def apply_columns(ingestor: Ingestor, run: RunState, rank: np.ndarray, sessions: np.ndarray, states: np.ndarray,
                  columns: Columns, now: float) -> list[tuple[int, pb.Command]] | None:  # fmt: skip
    """Apply the reports (see the module docstring); the commands for their ranks, or None (nothing applied)."""
    started = time.perf_counter()
    flags = columns.flags
    has_loss = (flags & HAS_LOSS) != 0
    skipped = (flags & SKIPPED_STEP) != 0
    gss = columns.grad_sum_squares
    with np.errstate(invalid="ignore"):
        if (columns.non_finite != 0).any() or (has_loss & ~np.isfinite(columns.loss)).any() or (
            ~np.isfinite(gss) & ~skipped).any():  # fmt: skip
            return None
    step = columns.step.astype(np.int64)
    batch = ReportBatch(rank=rank, step=step, loss=np.where(has_loss, columns.loss, np.nan), has_loss=has_loss,
                        step_duration_s=columns.step_duration_s, param_checksum=columns.param_checksum,
                        has_checksum=(flags & HAS_CHECKSUM) != 0, received_at=now)  # fmt: skip
    store = ingestor._store
    commands: list[tuple[int, pb.Command]] = []
    with ingestor._lock:
        if not store.touch(run):
            return None
        plans = _plans(ingestor, run, batch)
        if plans is None:
            return None
        shares = ((flags & HAS_SHARE) != 0) & ~skipped & (rank < run.world_size)
        with store.lock:
            share_plan = run.plan_grad_shares(step[shares], rank[shares]) if shares.any() else None
        if shares.any() and share_plan is None:
            return None
        with np.errstate(invalid="ignore"):
            grad_norm = np.where(skipped | ~(gss >= 0), np.nan, np.sqrt(np.abs(gss)))
        rows = np.empty(len(step), dtype=RING_DTYPE)
        rows["step"], rows["wall_time"], rows["received_at"], rows["loss"] = step, columns.wall_time, now, batch.loss
        rows["grad_norm"], rows["step_duration"], rows["flags"] = grad_norm, columns.step_duration_s, columns.non_finite
        extras = list(zip(columns.full_stats_interval.tolist(), ((flags & OVER_BUDGET) != 0).tolist(), strict=True))
        pre_forward = np.where((flags & HAS_PRE_FORWARD) != 0, columns.pre_forward_s, np.nan)
        with store.lock:
            store.record_rows(run, rank, rows, states, extras)
            run.table.report_many(rank, step, columns.step_duration_s, pre_forward, now)
            run.skipped_steps += int(skipped.sum())
            run.guard_skipped_steps += int((columns.guard_skip_reasons != 0).sum())
            if share_plan is not None:
                run.add_grad_shares(share_plan, rank[shares], columns.grad_global_share[shares])
            between = (flags & HAS_BETWEEN) != 0
            if between.any():
                run.table.collectives.between_many(rank[between], columns.between_collectives_s[between])
        if ingestor._on_rows is not None:
            ingestor._on_rows(run, rank, states, sessions, rows)
        for spec, detector, plan in plans:
            try:
                with store.lock:
                    found = detector.observe_batch(batch, run.table, plan)
            except Exception:
                ingestor._detector_failed(spec)
                continue
            for index, finding in found:
                sender = states[index]
                commands += [(sender.rank, c) for c in ingestor._apply_finding(run, sender, spec, finding)]
        if ingestor._pending:
            for r in np.unique(rank).tolist():
                commands += [(r, c) for c in ingestor._pending.pop((run.run_id, r), ())]
        ingestor.batched += len(step)
    ingestor._stats.applied_many("report", len(step), time.perf_counter() - started)
    return commands


def _plans(ingestor: Ingestor, run: RunState, batch: ReportBatch) -> list[tuple[Any, Any, Any]] | None:
    """Every cross-rank detector's plan for the batch (None: one of them needs the reports one at a time)."""
    plans = []
    for spec, detector in ingestor._detectors_for(run.run_id).pairs:
        if spec.scope != "run" or not spec.observes:
            continue  # per-rank detectors ran on the relay; tick-only ones read the rank table on ticks
        planner = getattr(detector, "plan_batch", None)
        if planner is None:
            return None
        with ingestor._store.lock:
            plan = planner(batch, run.table)
        if plan is None:
            return None
        plans.append((spec, detector, plan))
    return plans

