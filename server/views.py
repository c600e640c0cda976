"""JSON-safe views of the store for /api/v1/runs and ServerApp.runs().

Every float is finite or None, so `json.dumps(..., allow_nan=False)` never fails.
Schemas are summarised (layer counts), not listed: a schema may hold 65 536 names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gradwatch.server.store import RankState, RunState

__all__ = [
    "EVENTS_IN_VIEW",
    "RANKS_IN_VIEW",
    "finite_or_none",
    "loss_view",
    "rank_view",
    "rank_views",
    "run_view",
    "saved_rank_views",
]

#: Most recent agent events included per run.
EVENTS_IN_VIEW = 10
#: Ranks listed in a run's view (the lowest first); /api/v1/runs/<run>/ranks pages through all of them.
RANKS_IN_VIEW = 64


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def run_view(run: RunState, firing: list[str], *, max_ranks: int = RANKS_IN_VIEW) -> dict[str, Any]:
    """One run as a dict, from a reader copy (RunStore.snapshot) or under the store lock. `firing`: its firing
    detectors; `max_ranks`: list only the lowest ranks (the run-level values still cover all of them, and
    /api/v1/runs/<run>/ranks pages through every one). O(ranks): the rank table's per-rank medians are taken
    once for all ranks."""
    saved = run.restored_summary  # restored from the database, no agent back yet
    connected = sum(1 for r in run.ranks.values() if r.open_streams > 0)
    if saved and "view" in saved:
        listed = (saved_rank_views(run) or [])[:max_ranks]
        return _restored_view(run, saved["view"], firing) | {"ranks": listed, "ranks_connected": connected}
    ranks = [run.ranks[r] for r in sorted(run.ranks)]
    loss = loss_view(ranks)
    norms = [r.last_grad_norm for r in ranks if r.last_grad_norm is not None]
    steps = [r.last_step for r in ranks if r.last_step is not None]
    events = list(run.events)[-EVENTS_IN_VIEW:]
    if saved:  # saved by an older version: step and loss only
        steps = [saved["step"]] if saved.get("step") is not None else []
        loss = {k: saved.get(k) for k in loss} | {"loss": saved.get("loss")}
    return {
        "run": run.run_id,
        "job_name": run.job_name,
        "world_size": run.world_size,
        "state": "finished" if run.finished else "active",
        "finished_at": run.finished_at,
        "first_seen": run.first_seen,
        "last_seen": run.last_seen,
        "protocol_version": run.protocol_version,
        "step": max(steps) if steps else None,
        **loss,
        "grad_norm_max": max(norms) if norms else None,
        "grad_norm_min": min(norms) if norms else None,
        "grad_norm_global": finite_or_none(run.global_grad_norm),
        "grad_norm_global_step": run.global_grad_norm_step,
        "skipped_steps": run.skipped_steps,
        "guard_skipped_steps": run.guard_skipped_steps,
        "guard_rollbacks": run.guard_rollbacks,
        "layers_exported": len(run.layer_names),
        "layers_dropped": len(run.dropped_layers),
        "non_finite_events": dict(run.non_finite_counts),
        "detector_triggers": dict(run.detector_triggers),
        "firing": sorted(firing),
        "ranks": rank_views(run, ranks[:max_ranks]),
        "ranks_total": len(ranks),
        "ranks_connected": connected,
        "restored": run.restored_summary is not None,
        "recent_events": [{**e, "wall_time": finite_or_none(e["wall_time"])} for e in events],
    }


def _restored_view(run: RunState, view: dict[str, Any], firing: list[str]) -> dict[str, Any]:
    """The view saved before a restart (gradwatch.server.persistence) with what is live now: state and firing
    (its ranks: saved_rank_views)."""
    return {
        **view,
        "state": "finished" if run.finished else "active",
        "finished_at": run.finished_at,
        "last_seen": run.last_seen,
        "firing": sorted(firing),
        "restored": True,
    }


def saved_rank_views(run: RunState) -> list[dict[str, Any]] | None:
    """Every rank's view as saved before a restart, by rank, none connected (no agent of the run is back);
    None for a live run. A database written before ranks were saved on their own gives its run view's ranks."""
    saved = run.restored_summary
    if not saved or "view" not in saved:
        return None
    ranks = saved["ranks"] if "ranks" in saved else saved["view"].get("ranks", [])
    return [{**r, "connected": False} for r in ranks]


def loss_view(ranks: list[RankState]) -> dict[str, Any]:
    """The loss as views show it: `loss` is the mean of the ranks' latest losses, None while any rank's latest
    loss is not finite; `loss_non_finite` then says how ("NaN", "+Inf", "-Inf"); `last_finite_loss` and
    `last_finite_loss_step` are the mean of the ranks' latest finite losses and the earliest of their steps."""
    finite = [r for r in ranks if r.last_loss is not None]
    bad = next((r.loss_non_finite for r in ranks if r.loss_non_finite is not None), None)
    last = math.fsum(r.last_loss for r in finite if r.last_loss is not None) / len(finite) if finite else None
    steps = [r.last_finite_loss_step for r in finite if r.last_finite_loss_step is not None]
    return {
        "loss": last if bad is None else None,
        "loss_non_finite": bad,
        "last_finite_loss": last,
        "last_finite_loss_step": min(steps) if steps else None,
    }


def rank_views(run: RunState, ranks: list[RankState]) -> list[dict[str, Any]]:
    """Views of `ranks` of `run` with what the cross-rank detectors see of each (replica group, pace)."""
    if not ranks:  # the run's pace needs medians over its rank table: none for a view that lists no rank
        return []
    timing = _rank_timing(run)
    return [rank_view(r) | timing(r.rank) for r in ranks]


def rank_view(rank: RankState) -> dict[str, Any]:
    return {
        "rank": rank.rank,
        "host": rank.host,
        "pid": rank.pid,
        "local_rank": rank.local_rank,
        "session_id": rank.session_id,
        "agent_version": rank.agent_version,
        "torch_version": rank.torch_version,
        "device_kind": rank.device_kind,
        "full_stats_interval": rank.full_stats_interval,
        "full_stats_interval_in_force": rank.full_stats_interval_in_force or rank.full_stats_interval,
        "over_budget": rank.over_budget,
        "layers": len(rank.schema.names),
        "step": rank.last_step,
        "last_report_at": rank.last_report_at,
        "last_heartbeat_at": rank.last_heartbeat_at,
        "loss": rank.last_loss if rank.loss_non_finite is None else None,
        "loss_non_finite": rank.loss_non_finite,
        "last_finite_loss": rank.last_loss,
        "last_finite_loss_step": rank.last_finite_loss_step,
        "grad_norm": rank.last_grad_norm,
        "step_duration": rank.last_step_duration,
        "reports": rank.ring.count,
        "connected": rank.open_streams > 0,
        "said_goodbye": rank.said_goodbye,
        "agent_dropped": dict(rank.dropped),
    }


def _rank_timing(run: RunState) -> Callable[[int], dict[str, Any]]:
    """rank -> what the cross-rank detectors see of it: its replica group and recent pace (server/ranktable.py)."""
    table = run.table
    groups, sizes = table.replica_group.tolist(), table.replica_group_size.tolist()
    step_time, pre_forward = table.step_time().tolist(), table.pre_forward_time().tolist()

    def timing(rank: int) -> dict[str, Any]:
        if rank >= table.size:
            return {}
        return {
            "replica_group": groups[rank],
            "replica_group_size": sizes[rank],
            "step_time_s": finite_or_none(step_time[rank]),
            "pre_forward_s": finite_or_none(pre_forward[rank]),
        }

    return timing
