"""The incident window archive: which full-statistics entries an incident keeps, packed into one `.npz`.

Contract: `window_entries(columns, lo, hi, start)` picks a rank's entries for the window [lo, hi) of an alert at
report index `start` (plus older ones, so an incident always has per-layer statistics from before its alert);
`pack_window(parts, histogram_reports)` packs every rank's `RankPart` into the archive WINDOW_ARRAYS describes.
Runs on the recorder's writer thread, on copies: nothing here touches the recorder's live windows.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gradwatch.server.report import COLUMN_WIDTHS

__all__ = ["FULL_REPORTS_BEFORE", "WINDOW_ARRAYS", "RankPart", "pack_window", "window_entries"]

#: Full-statistics reports before the alert an incident holds at least, reaching back beyond the scalar window
#: (window_reports) when the cadence is sparser than that; only what the column memory budget still holds.
FULL_REPORTS_BEFORE = 2
#: Arrays of a window archive, per recorded rank R: `rR_rows` (ROW_DTYPE), `rR_steps` (int64 steps of the
#: full-statistics reports), `rR_g_<column>` (float32, reports × layers), `rR_a_<column>` (reports × modules);
#: histogram columns (`rR_g_grad_log2_histogram`, reports × layers × 32) are indexed by `rR_hist_steps`.
WINDOW_ARRAYS = ("rows", "steps", "hist_steps", "g_<column>", "a_<column>")


@dataclass(frozen=True, slots=True)
class RankPart:
    """One rank's share of an incident window: scalar rows (a copy) and column entries (immutable views)."""

    rank: int
    rows: np.ndarray
    entries: Sequence[tuple[int, int, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]
    start: int


def window_entries(
    columns: Iterable[tuple[int, int, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]], lo: int, hi: int, start: int
) -> list[tuple[int, int, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
    """The full-statistics entries of an incident: those in the window [lo, hi), and, when fewer than
    FULL_REPORTS_BEFORE of them precede the alert (the agent's overhead budget stretched its cadence), the latest
    older ones the recorder still holds: an incident always has per-layer statistics from before its alert."""
    kept = list(columns)
    inside = [e for e in kept if lo <= e[0] < hi]
    missing = FULL_REPORTS_BEFORE - sum(1 for e in inside if e[0] < start)
    older = [e for e in kept if e[0] < lo][-missing:] if missing > 0 else []
    return older + inside


def pack_window(parts: list[RankPart], histogram_reports: int) -> bytes:
    """The window archive (WINDOW_ARRAYS). Histogram columns (32 bins per layer, most of the bytes) are kept for
    the last `histogram_reports` full-statistics reports before the alert and every one after it."""
    arrays: dict[str, np.ndarray] = {}
    for part in parts:
        r, entries = part.rank, part.entries
        arrays[f"r{r}_rows"] = part.rows
        arrays[f"r{r}_steps"] = np.array([e[1] for e in entries], dtype=np.int64)
        before = [i for i, e in enumerate(entries) if e[0] < part.start]
        keep = set(before[len(before) - histogram_reports :] if histogram_reports else [])
        keep.update(i for i, e in enumerate(entries) if e[0] >= part.start)
        hist_entries = [e for i, e in enumerate(entries) if i in keep]
        arrays[f"r{r}_hist_steps"] = np.array([e[1] for e in hist_entries], dtype=np.int64)
        for prefix, layers, hist_layers in (
            ("g", [e[2] for e in entries], [e[2] for e in hist_entries]),
            ("a", [e[3] for e in entries], [e[3] for e in hist_entries]),
        ):
            for name in sorted({name for columns in layers for name in columns}):
                chosen = hist_layers if name in COLUMN_WIDTHS else layers
                stacked = _stack([columns.get(name) for columns in chosen])
                if stacked is not None:
                    arrays[f"r{r}_{prefix}_{name}"] = stacked
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return buffer.getvalue()


def _stack(values: list[np.ndarray | None]) -> np.ndarray | None:
    """Stack one column over reports; reports without it (or from another schema) become NaN rows."""
    shapes = [v.shape for v in values if v is not None]
    if not shapes:
        return None
    shape = shapes[-1]
    out = np.full((len(values), *shape), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None and v.shape == shape:
            out[i] = v
    return out
