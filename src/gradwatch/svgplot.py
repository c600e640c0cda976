"""Minimal inline-SVG plots for the incident report: line charts, a heatmap, paired histograms.

Plain Python and strings (no plotting library, no JavaScript), so a report opens offline in any browser and
the CLI needs nothing beyond numpy. Every plot is one `<svg class="plot">` element with a title; non-finite
values are never drawn as numbers: a line breaks there and a red tick marks the step.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["PALETTE", "bars", "heatmap", "line_chart"]

#: Line colours, one per series (ranks, statistics), colour-blind friendly (Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
BAD = "#d62728"
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 16, 28, 36
#: Viridis at five stops; cells interpolate between them.
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=float)


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3g}"


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{MARGIN_L}" y="17" font-size="13" font-weight="bold">{_esc(title)}</text>',
    ]


def line_chart(
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    title: str,
    y_label: str = "",
    log_y: bool = False,
    marker_x: float | None = None,
    width: int = 620,
    height: int = 240,
) -> str:
    """Lines of (label, x, y); `log_y` plots log10 of positive values; `marker_x` draws the alert step."""
    pw, ph = width - MARGIN_L - MARGIN_R, height - MARGIN_T - MARGIN_B
    xs_all = np.concatenate([np.asarray(x, dtype=float) for _, x, _ in series]) if series else np.zeros(0)
    ys = [np.asarray(y, dtype=float) for _, _, y in series]
    shown = [np.where(np.isfinite(y) & ((y > 0) if log_y else True), y, np.nan) for y in ys]
    shown = [np.log10(y, where=np.isfinite(y), out=np.full_like(y, np.nan)) if log_y else y for y in shown]
    finite = np.concatenate([y[np.isfinite(y)] for y in shown]) if shown else np.zeros(0)
    out = _open(width, height, title)
    if xs_all.size == 0 or finite.size == 0:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#777">no finite values</text>')
        return "".join(out) + "</svg>"
    x0, x1 = float(xs_all.min()), float(xs_all.max())
    y0, y1 = float(finite.min()), float(finite.max())
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return MARGIN_L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return MARGIN_T + (1 - (y - y0) / (y1 - y0)) * ph

    out.append(f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>')
    for i in range(5):
        yv = y0 + (y1 - y0) * i / 4
        label = _fmt(10**yv) if log_y else _fmt(yv)
        out.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{MARGIN_L - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        out.append(
            f'<text x="{sx(xv):.1f}" y="{MARGIN_T + ph + 14}" font-size="10" text-anchor="middle">{round(xv)}</text>'
        )
    out.append(f'<text x="{MARGIN_L + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">step</text>')
    if y_label:
        out.append(
            f'<text x="12" y="{MARGIN_T + ph / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {MARGIN_T + ph / 2})">{_esc(y_label)}</text>'
        )
    if marker_x is not None and x0 <= marker_x <= x1:
        mx = sx(marker_x)
        out.append(
            f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{MARGIN_T}" y2="{MARGIN_T + ph}" stroke="{BAD}" '
            f'stroke-dasharray="4 3"/><text x="{mx + 3:.1f}" y="{MARGIN_T + 10}" font-size="10" '
            f'fill="{BAD}">alert</text>'
        )
    legend_x = MARGIN_L + 8
    for k, ((label, x, _), y, raw) in enumerate(zip(series, shown, ys, strict=True)):
        colour = PALETTE[k % len(PALETTE)]
        x = np.asarray(x, dtype=float)
        path, pen = [], "M"
        for xv, yv in zip(x.tolist(), y.tolist(), strict=True):
            if math.isfinite(yv):
                path.append(f"{pen}{sx(xv):.1f},{sy(yv):.1f}")
                pen = "L"
            else:
                pen = "M"
        if path:
            out.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="1.6"/>')
        for xv in x[~np.isfinite(raw)].tolist():
            out.append(
                f'<line x1="{sx(xv):.1f}" x2="{sx(xv):.1f}" y1="{MARGIN_T}" y2="{MARGIN_T + 6}" '
                f'stroke="{BAD}" stroke-width="2"/>'
            )
        lx, ly = legend_x, MARGIN_T + 14
        legend_x += 24 + 6 * len(label)
        out.append(
            f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{colour}"/>'
            f'<text x="{lx + 13}" y="{ly - 4}" font-size="10">{_esc(label)}</text>'
        )
    return "".join(out) + "</svg>"


def _viridis(t: np.ndarray) -> list[str]:
    t = np.clip(t, 0, 1) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - lo)[:, None]
    rgb = _VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac
    return [f"#{int(r):02x}{int(g):02x}{int(b):02x}" for r, g, b in rgb.round()]


def heatmap(
    values: np.ndarray,
    *,
    rows: Sequence[str],
    steps: Sequence[int],
    title: str,
    marker_step: int | None = None,
    width: int = 620,
) -> str:
    """A rows × steps grid coloured by log10(value) (viridis); non-finite cells red, zeros black."""
    values = np.asarray(values, dtype=float)
    n_rows, n_cols = values.shape
    label_w = min(180, 8 + 6 * max((len(r) for r in rows), default=4))
    cell_h = max(6, min(18, 320 // max(n_rows, 1)))
    pw = width - label_w - MARGIN_R
    height = MARGIN_T + n_rows * cell_h + 52
    cell_w = pw / max(n_cols, 1)
    out = _open(width, height, title)
    positive = values[np.isfinite(values) & (values > 0)]
    lo, hi = (np.log10(positive.min()), np.log10(positive.max())) if positive.size else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    flat = values.reshape(-1)
    logs = np.log10(np.where(np.isfinite(flat) & (flat > 0), flat, 1.0))
    colours = _viridis((logs - lo) / span)
    for i in range(n_rows):
        y = MARGIN_T + i * cell_h
        out.append(
            f'<text x="{label_w - 4}" y="{y + cell_h * 0.75:.1f}" font-size="{min(10, cell_h)}" '
            f'text-anchor="end">{_esc(rows[i])}</text>'
        )
        for j in range(n_cols):
            v = values[i, j]
            colour = colours[i * n_cols + j] if np.isfinite(v) and v > 0 else (BAD if not np.isfinite(v) else "#222")
            out.append(
                f'<rect x="{label_w + j * cell_w:.1f}" y="{y}" width="{cell_w + 0.6:.1f}" '
                f'height="{cell_h}" fill="{colour}"/>'
            )
    base = MARGIN_T + n_rows * cell_h
    for j in range(0, n_cols, max(1, n_cols // 8)):
        out.append(
            f'<text x="{label_w + (j + 0.5) * cell_w:.1f}" y="{base + 12}" font-size="10" '
            f'text-anchor="middle">{steps[j]}</text>'
        )
    if marker_step is not None and marker_step in steps:
        mx = label_w + list(steps).index(marker_step) * cell_w
        out.append(
            f'<rect x="{mx:.1f}" y="{MARGIN_T - 2}" width="{cell_w:.1f}" height="{n_rows * cell_h + 4}" '
            f'fill="none" stroke="{BAD}" stroke-width="1.5"/>'
        )
    legend = _viridis(np.linspace(0, 1, 24))
    for k, colour in enumerate(legend):
        out.append(f'<rect x="{label_w + k * 8}" y="{base + 24}" width="8" height="10" fill="{colour}"/>')
    out.append(
        f'<text x="{label_w + 200}" y="{base + 33}" font-size="10">{_fmt(10**lo)} … {_fmt(10**hi)} '
        f'(log scale); <tspan fill="{BAD}">■</tspan> NaN/Inf; black: 0; columns: steps with full statistics</text>'
    )
    return "".join(out) + "</svg>"


def bars(
    groups: Sequence[tuple[str, np.ndarray]], *, labels: Sequence[str], title: str, width: int = 620, height: int = 220
) -> str:
    """Side-by-side bars per bin for each (name, counts) group, counts normalised to fractions."""
    pw, ph = width - MARGIN_L - MARGIN_R, height - MARGIN_T - MARGIN_B
    out = _open(width, height, title)
    fractions = []
    for _, counts in groups:
        counts = np.nan_to_num(np.asarray(counts, dtype=float), nan=0.0, posinf=0.0, neginf=0.0)
        total = counts.sum()
        fractions.append(counts / total if total > 0 else counts)
    top = max((float(f.max()) for f in fractions), default=0.0) or 1.0
    n = len(labels)
    slot = pw / max(n, 1)
    bar_w = slot / (len(groups) + 1)
    out.append(f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>')
    for g, frac in enumerate(fractions):
        colour = PALETTE[g % len(PALETTE)]
        for b in range(n):
            h = frac[b] / top * ph
            if h > 0:
                out.append(
                    f'<rect x="{MARGIN_L + b * slot + g * bar_w:.1f}" y="{MARGIN_T + ph - h:.1f}" '
                    f'width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}"/>'
                )
        out.append(
            f'<rect x="{MARGIN_L + 8 + g * 150}" y="{MARGIN_T + 6}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{MARGIN_L + 22 + g * 150}" y="{MARGIN_T + 15}" font-size="10">'
            f"{_esc(groups[g][0])}</text>"
        )
    for b in range(0, n, max(1, n // 8)):
        out.append(
            f'<text x="{MARGIN_L + (b + 0.5) * slot:.1f}" y="{MARGIN_T + ph + 14}" font-size="10" '
            f'text-anchor="middle">{_esc(labels[b])}</text>'
        )
    out.append(
        f'<text x="{MARGIN_L + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">|value| (log2 bins)</text>'
    )
    out.append(f'<text x="{MARGIN_L - 4}" y="{MARGIN_T + 8}" font-size="10" text-anchor="end">{top:.0%}</text>')
    return "".join(out) + "</svg>"
