"""Provenance of an incident: what went wrong first, in step order, from the window the recorder kept.

Contract: `layer_onset(rank, entries, layer_names, alert_step)` finds the first full-statistics report where a
layer's gradient norm went non-finite or above ANOMALY_FACTOR × its median before the alert (vectorised over
layers); `provenance_chain(alert, rows, onsets, run_alerts)` orders those onsets with each rank's first
non-finite report, its gradient-norm anomalies and the run's alerts. Pure functions of numpy arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gradwatch.server.alerts import Alert
from gradwatch.v1 import gradwatch_pb2 as pb

__all__ = ["ANOMALY_FACTOR", "layer_onset", "provenance_chain"]

#: A rank's gradient norm this many times its median before the alert is an anomaly in the provenance chain.
ANOMALY_FACTOR = 10.0

_FLAG_NAMES = (
    (pb.NON_FINITE_FLAG_INPUT, "input"),
    (pb.NON_FINITE_FLAG_ACTIVATION, "activation"),
    (pb.NON_FINITE_FLAG_LOSS, "loss"),
    (pb.NON_FINITE_FLAG_GRADIENT, "gradient"),
    (pb.NON_FINITE_FLAG_WEIGHT, "weight"),
)


def provenance_chain(
    alert: Alert, rows: list[tuple[int, np.ndarray]], onsets: list[dict[str, Any]], run_alerts: Iterable[Alert]
) -> list[dict[str, Any]]:
    """What went wrong first, in step order: non-finite values, gradient-norm anomalies of ranks and of
    layers (`onsets`), the run's alerts (`run_alerts`) up to a minute after this one."""
    chain: list[dict[str, Any]] = list(onsets)
    for rank, r in rows:
        bad = np.flatnonzero(r["flags"] != 0)
        if bad.size:
            flags = int(r["flags"][bad[0]])
            kinds = [name for bit, name in _FLAG_NAMES if flags & bit]
            chain.append(
                {
                    "step": int(r["step"][bad[0]]),
                    "rank": rank,
                    "kind": "non_finite",
                    "what": f"first non-finite {', '.join(kinds)} in the window",
                }
            )
        before = r["grad_norm"][r["step"] < alert.step]
        before = before[np.isfinite(before)]
        if before.size >= 5:
            median = float(np.median(before))
            spikes = np.flatnonzero(np.isfinite(r["grad_norm"]) & (r["grad_norm"] > ANOMALY_FACTOR * median))
            if spikes.size and median > 0:
                i = spikes[0]
                chain.append(
                    {
                        "step": int(r["step"][i]),
                        "rank": rank,
                        "kind": "grad_norm",
                        "what": f"gradient norm {r['grad_norm'][i]:.3g}, "
                        f"{_times(r['grad_norm'][i] / median)} its median {median:.3g}",
                    }
                )
    for other in run_alerts:
        if other.started_at <= alert.started_at + 60:
            where = f" in layer {other.layer}" if other.layer else ""
            chain.append(
                {
                    "step": other.step,
                    "rank": other.ranks[0] if other.ranks else None,
                    "kind": "alert",
                    "detector": other.detector,
                    "what": f"{other.detector} fired{where}: {other.summary}",
                }
            )
    chain.sort(key=lambda e: (e["step"], e["kind"] != "non_finite"))
    return chain


def layer_onset(
    rank: int,
    entries: Sequence[tuple[int, int, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    layer_names: tuple[str, ...],
    alert_step: int,
) -> dict[str, Any] | None:
    """The first full-statistics step where a layer's gradient norm went non-finite or above ANOMALY_FACTOR × its
    median before the alert, and which layer (non-finite first, then the largest ratio); vectorised over layers."""
    columns = [(e[1], e[2]["grad_norm"]) for e in entries if "grad_norm" in e[2]]
    if not columns:
        return None
    width = columns[-1][1].shape
    columns = [(step, values) for step, values in columns if values.shape == width]
    steps = np.array([step for step, _ in columns], dtype=np.int64)
    norms_NL = np.stack([values for _, values in columns]).astype(np.float64)  # N = reports, L = layers
    before = norms_NL[steps < alert_step]
    if len(before) < 3 or norms_NL.shape[1] == 0:
        return None
    with np.errstate(all="ignore"):
        median_L = np.nanmedian(np.where(np.isfinite(before), before, np.nan), axis=0)
        ratio_NL = norms_NL / median_L
    bad_NL = ~np.isfinite(norms_NL) | (np.nan_to_num(ratio_NL, nan=0.0) > ANOMALY_FACTOR)
    hits = np.flatnonzero(bad_NL.any(axis=1))
    if not hits.size:
        return None
    i = int(hits[0])
    score_L = np.where(~np.isfinite(norms_NL[i]), np.inf, np.nan_to_num(ratio_NL[i], nan=0.0, posinf=np.inf))
    layer = int(np.argmax(score_L))
    name = layer_names[layer] if layer < len(layer_names) else str(layer)
    value = norms_NL[i, layer]
    what = (
        f"layer {name} first abnormal: gradient norm {value:.3g}, {_times(ratio_NL[i, layer])} its median"
        if np.isfinite(value)
        else f"layer {name} first abnormal: non-finite gradient norm"
    )
    return {"step": int(steps[i]), "rank": rank, "kind": "layer", "layer": name, "what": what}


def _times(ratio: float) -> str:
    return f"{ratio:.0f}×" if ratio < 1e4 else f"{ratio:.2g}×"
