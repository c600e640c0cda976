"""`gradwatch report ID -o incident.html`: one self-contained HTML page per incident.

The page is built here from the incident's JSON body and its window archive (both from the server's API):
inline CSS and inline SVG (gradwatch.svgplot), no scripts, no external resources, so it opens offline and
can be attached to a ticket. Sections: what fired and where, the detector's explanation and runbook link,
the provenance chain, loss and gradient norm per rank around the alert, a layer × step heatmap of gradient
norms, the activation health of the affected layers, gradient histograms before and after, the ranks.
"""

from __future__ import annotations

import datetime
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradwatch.client import ApiClient, ApiError, quote

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PAGE_CSS", "render_report", "write_report"]

#: Layers shown in the heatmap at most (the alert's layer and the largest gradient changes first).
HEATMAP_ROWS = 48
#: Modules whose activation health is plotted at most.
ACTIVATION_MODULES = 4
ACTIVATION_STATS = ("mean", "std", "dead_fraction", "saturated_fraction", "zero_fraction")

PAGE_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1d1f23}
main{max-width:1300px;margin:0 auto;padding:20px 28px}
h1{font-size:22px;margin:4px 0 6px}h2{font-size:16px;margin:0 0 10px}
.badge{display:inline-block;padding:2px 9px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
.critical{background:#c62828}.warning{background:#ef6c00}.info{background:#1565c0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 16px;margin:14px 0}
.grid{display:flex;flex-wrap:wrap;gap:14px}.grid>.card{flex:1 1 560px;margin:0}
svg.plot{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#555;font-weight:600}ol{margin:0;padding-left:20px}li{margin:3px 0}
.muted{color:#666;font-size:13px}code{background:#eef0f3;padding:1px 4px;border-radius:3px}
"""


def write_report(api: ApiClient, incident_id: str, output: str | None) -> Path:
    """Fetch the incident and its window from `api`, render it, write it; returns the path written."""
    incident = api.get(f"incidents/{quote(incident_id)}")["incident"]
    window = api.get_bytes(f"incidents/{quote(incident['id'])}/window")
    path = Path(output or f"incident-{incident['id']}.html")
    try:
        path.write_text(render_report(incident, window), encoding="utf-8")
    except OSError as exc:
        raise ApiError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def render_report(incident: dict[str, Any], window: bytes, *, home: str | None = None) -> str:
    """The HTML page for an incident body and its window archive (.npz bytes). `home`: a link back to the
    server's overview (the page as the server serves it; a written report has none)."""
    try:
        import numpy as np
    except ImportError:
        raise ApiError("gradwatch report needs numpy: pip install 'gradwatch[server]'") from None
    from gradwatch import svgplot

    with np.load(io.BytesIO(window), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    ranks = [r["rank"] for r in incident["ranks"]]
    fired = incident["fired_rank"]
    step = incident["step"]
    meta = {r["rank"]: r for r in incident["ranks"]}
    e = html.escape
    back = f'<a href="{e(home)}">overview</a> · ' if home else ""
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>gradwatch incident {e(incident['id'])}: {e(incident['detector'])} on {e(incident['run'])}</title>",
        f"<style>{PAGE_CSS}</style></head><body><main>",
        f'<div class="muted">{back}gradwatch incident <code>{e(incident["id"])}</code> · {e(incident["status"])} · '
        f"opened {_time(incident['opened_at'])}</div>",
        f'<h1><span class="badge {e(incident["severity"])}">{e(incident["severity"])}</span> '
        f"{e(incident['detector'])} on run <code>{e(incident['run'])}</code> at step {step}</h1>",
        f"<p>{e(incident['summary'])}</p>",
        _facts(incident),
        _autopsy(incident),
        '<div class="grid">',
        f'<section class="card" id="explanation"><h2>What this detector means</h2><p>{e(incident["description"])}</p>'
        f'<p>Runbook: <a href="{e(incident["runbook_url"])}">{e(incident["runbook_url"])}</a></p></section>',
        f'<section class="card" id="provenance"><h2>Provenance: first sign first</h2>{_provenance(incident)}</section>',
        "</div>",
    ]
    # Loss and gradient norm per rank around the event.
    loss = [
        (f"rank {r}", arrays[f"r{r}_rows"]["step"], arrays[f"r{r}_rows"]["loss"])
        for r in ranks
        if f"r{r}_rows" in arrays
    ]
    grad = [
        (f"rank {r}", arrays[f"r{r}_rows"]["step"], arrays[f"r{r}_rows"]["grad_norm"])
        for r in ranks
        if f"r{r}_rows" in arrays
    ]
    parts += [
        '<div class="grid">',
        '<section class="card" id="loss">',
        svgplot.line_chart(loss, title="Loss per rank", y_label="loss", marker_x=step),
        "</section>",
        '<section class="card" id="grad-norm">',
        svgplot.line_chart(grad, title="Gradient norm per rank", y_label="‖g‖ (log)", log_y=True, marker_x=step),
        "</section></div>",
    ]
    layers = meta[fired]["layers"] if fired in meta else []
    steps = arrays.get(f"r{fired}_steps")
    norms = arrays.get(f"r{fired}_g_grad_norm")
    section = '<section class="card" id="heatmap"><h2>Gradient norm per layer and step (rank {})</h2>{}</section>'
    if norms is not None and steps is not None and len(steps) and layers:
        chosen = _top_layers(norms, layers, incident.get("layer"), steps, step)
        heat = svgplot.heatmap(
            norms[:, chosen].T,
            rows=[layers[i] for i in chosen],
            steps=steps.tolist(),
            title=f"‖g‖ by layer × step ({len(chosen)} of {len(layers)} layers)",
            marker_step=_nearest(steps, step),
            width=1200,
        )
        parts.append(section.format(fired, heat))
    else:
        parts.append(section.format(fired, '<p class="muted">No per-layer statistics in the window.</p>'))
    parts.append(_activation_section(incident, arrays, fired, meta, step, svgplot, np))
    parts.append(_histogram_section(incident, arrays, fired, layers, step, svgplot, np))
    parts.append(_ranks_table(incident))
    parts.append('<p class="muted">Made by <code>gradwatch report</code> from the server\'s flight recorder.</p>')
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _facts(incident: dict[str, Any]) -> str:
    e = html.escape
    steps = incident["window"]["steps"]
    rows = [
        (
            "Run",
            f"<code>{e(incident['run'])}</code> (job {e(incident['job_name'] or '-')}, world size "
            f"{incident['world_size']})",
        ),
        ("First layer", e(incident["layer"] or "unknown")),
        ("Ranks firing", e(", ".join(map(str, incident["ranks_firing"])))),
        ("Alert started", _time(incident["alert"]["started_at"])),
        (
            "Window",
            f"steps {steps[0]}–{steps[1]}: {incident['window']['before']} reports before the alert (the "
            f"firing one last), up to {incident['window']['after']} after"
            if steps
            else "empty",
        ),
    ]
    return '<table class="card">' + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _autopsy(incident: dict[str, Any]) -> str:
    """The batch of the bad step: its ids and the samples with the highest loss, per rank that said them."""
    e = html.escape
    sections = []
    for autopsy in incident.get("autopsy") or ():
        rows = "".join(
            f"<tr><td><code>{e(str(s['id']))}</code></td>"
            f"<td>{_loss_text(s['loss'])}</td>"
            f"<td>{s['index']}</td></tr>"
            for s in autopsy["top_samples"]
        )
        ids = ", ".join(e(str(i)) for i in autopsy["batch_ids"]) or "not given"
        sections.append(
            f"<h3>Step {autopsy['step']}, rank {autopsy['rank']}, first layer {e(autopsy['layer'] or 'unknown')}</h3>"
            f"<p>Batch ids: {ids}</p>"
            + (f"<table><tr><th>sample</th><th>loss</th><th>index in batch</th></tr>{rows}</table>" if rows else "")
        )
    if not sections:
        return ""
    return f'<section class="card" id="autopsy"><h2>Autopsy: the batch</h2>{"".join(sections)}</section>'


def _loss_text(loss: float | None) -> str:
    return "non-finite" if loss is None else f"{loss:.4g}"


def _provenance(incident: dict[str, Any]) -> str:
    e = html.escape
    items = [f"<li>step {ev['step']}, rank {e(str(ev['rank']))}: {e(ev['what'])}</li>" for ev in incident["provenance"]]
    return f"<ol>{''.join(items)}</ol>" if items else '<p class="muted">Nothing recorded before the alert.</p>'


def _top_layers(
    norms: np.ndarray, layers: list[str], alert_layer: str | None, steps: np.ndarray, step: int
) -> list[int]:
    """The alert's layer, then layers by how much their gradient norm changed at the alert (non-finite first)."""
    import numpy as np

    before = norms[steps < step]
    after = norms[steps >= step]
    base = np.nanmedian(np.where(np.isfinite(before), before, np.nan), axis=0) if len(before) else np.ones(len(layers))
    with np.errstate(all="ignore"):
        peak = np.nanmax(np.where(np.isfinite(after), after, np.inf), axis=0) if len(after) else base
        change = np.abs(np.log10(np.where(base > 0, peak / base, np.inf)))
    change = np.nan_to_num(change, nan=0.0, posinf=1e9)
    order = [int(i) for i in np.argsort(-change, kind="stable")]
    if alert_layer in layers:
        first = layers.index(alert_layer)
        order = [first, *(i for i in order if i != first)]
    return sorted(order[:HEATMAP_ROWS])


def _nearest(steps: np.ndarray, step: int) -> int:
    later = steps[steps >= step]
    return int(later[0]) if len(later) else int(steps[-1])


def _activation_section(
    incident: dict[str, Any], arrays: dict[str, Any], fired: int, meta: dict[int, Any], step: int, svgplot: Any, np: Any
) -> str:
    modules = meta[fired]["modules"] if fired in meta else []
    steps = arrays.get(f"r{fired}_steps")
    stats = {name: arrays[f"r{fired}_a_{name}"] for name in ACTIVATION_STATS if f"r{fired}_a_{name}" in arrays}
    head = f'<section class="card" id="activations"><h2>Activation health of the affected layers (rank {fired})</h2>'
    if not modules or not stats or steps is None or not len(steps):
        return head + '<p class="muted">No activation statistics in the window (forward hooks off?).</p></section>'
    chosen = _affected_modules(modules, incident.get("layer"), arrays.get(f"r{fired}_a_non_finite"), np)
    charts = []
    for m in chosen:
        series = [(name, steps, values[:, m]) for name, values in stats.items() if m < values.shape[1]]
        charts.append(svgplot.line_chart(series, title=f"module {modules[m]}", marker_x=step, width=600, height=210))
    return head + '<div class="grid">' + "".join(f'<div class="card">{c}</div>' for c in charts) + "</div></section>"


def _affected_modules(modules: list[str], layer: str | None, non_finite: Any, np: Any) -> list[int]:
    """The alert layer's module and the one after it (its activation function), then modules that went
    non-finite, in forward order; the first modules when nothing points anywhere."""
    chosen: list[int] = []
    if layer in modules:
        i = modules.index(layer)
        chosen += [i, i + 1] if i + 1 < len(modules) else [i]
    if non_finite is not None and len(non_finite):
        bad = np.flatnonzero(np.nansum(np.nan_to_num(non_finite, nan=1.0), axis=0) > 0)
        chosen += [int(i) for i in bad if int(i) not in chosen]
    if not chosen:
        chosen = list(range(min(2, len(modules))))
    return chosen[:ACTIVATION_MODULES]


def _histogram_section(
    incident: dict[str, Any],
    arrays: dict[str, Any],
    fired: int,
    layers: list[str],
        step: int,
    svgplot: Any,
    np: Any,
) -> str:
    hist = arrays.get(f"r{fired}_g_grad_log2_histogram")
    steps = arrays.get(f"r{fired}_hist_steps")
    head = f'<section class="card" id="histograms"><h2>Gradient histograms before and after (rank {fired})</h2>'
    if hist is None or steps is None or not len(steps) or not layers:
        return head + '<p class="muted">No gradient histograms in the window.</p></section>'
    before = np.flatnonzero(steps < step)
    after = np.flatnonzero(steps >= step)
    if not len(before) or not len(after):
        return head + '<p class="muted">The window has histograms on one side of the alert only.</p></section>'
    b, a = int(before[-1]), int(after[0])
    layer = incident.get("layer") if incident.get("layer") in layers else None
    indices = [layers.index(layer)] if layer else []
    indices += [i for i in range(len(layers)) if i not in indices][: 3 - len(indices)]
    labels = [f"2^{k - 24}" for k in range(hist.shape[2])]
    charts = [
        svgplot.bars(
            [(f"step {int(steps[b])}", hist[b, i]), (f"step {int(steps[a])}", hist[a, i])],
            labels=labels,
            title=f"layer {layers[i]}",
            width=600,
        )
        for i in indices
    ]
    note = (
        '<p class="muted">Share of the layer\'s finite non-zero gradient elements per |value| bin; NaN and Inf '
        "elements are not in any bin, so a poisoned layer's histogram empties.</p>"
    )
    return (
        head
        + note
        + '<div class="grid">'
        + "".join(f'<div class="card">{c}</div>' for c in charts)
        + "</div></section>"
    )


def _ranks_table(incident: dict[str, Any]) -> str:
    e = html.escape
    head = (
        "<tr><th>rank</th><th>host</th><th>pid</th><th>device</th><th>agent</th><th>torch</th><th>layers</th>"
        "<th>reports before / after</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{r['rank']}</td><td>{e(r['host'])}</td><td>{r['pid']}</td><td>{e(r['device_kind'])}</td>"
        f"<td>{e(r['agent_version'])}</td><td>{e(r['torch_version'])}</td><td>{len(r['layers'])}</td>"
        f"<td>{r['reports_before']} / {r['reports_after']}</td></tr>"
        for r in incident["ranks"]
    )
    return f'<section class="card" id="ranks"><h2>Ranks recorded</h2><table>{head}{rows}</table></section>'


def _time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
