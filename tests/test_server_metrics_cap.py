"""/metrics stays within limits.max_layer_series: the paging run first, the rest counted, no flapping."""

from __future__ import annotations

import math
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gradwatch.server.metrics import LAYER_SERIES_OMITTED
from server_support import (
    columns,
    hello_frame,
    metric,
    promtool_check,
    report_frame,
    run_stream,
    scrape,
    server_config,
    start_app,
)

#: The per-layer families these reports fill (three of the six), and the per-run layer cap of the servers below.
FILLED = ("grad_norm", "weight_norm", "update_ratio")
PER_RUN = 12
LAYER_FAMILY_NAMES = {
    "gradwatch_layer_grad_norm",
    "gradwatch_layer_weight_norm",
    "gradwatch_layer_grad_max_abs",
    "gradwatch_layer_grad_zero_ratio",
    "gradwatch_layer_weight_zero_ratio",
    "gradwatch_layer_update_ratio",
}


def _layer_series(text: str) -> list[tuple[str, str, str]]:
    """(family, run, layer) of every per-layer sample in a scrape, in exposition order."""
    return [
        (s.name, s.labels["run"], s.labels["layer"])
        for family in text_string_to_metric_families(text)
        if family.name in LAYER_FAMILY_NAMES
        for s in family.samples
    ]


def _send_run(target: str, run: str, layers: int, *, pages: bool) -> None:
    stats = columns(layers, **{name: 1.0 + i for i, name in enumerate(FILLED)})
    frames = [hello_frame(run=run, layers=layers), report_frame(1, layers=stats)]
    if pages:  # a NaN loss: non_finite fires (critical) before the stream's last ack
        frames.append(report_frame(2, loss=math.nan, layers=stats))
    run_stream(target, frames)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(st.integers(min_value=0, max_value=2 * PER_RUN), min_size=1, max_size=8),
    cap=st.integers(min_value=0, max_value=8 * PER_RUN * len(FILLED)),
    data=st.data(),
)
def test_metrics_layer_series_total_cap_serves_the_paging_run_first_and_counts_the_rest(
    layers: list[int], cap: int, data: st.DataObject
) -> None:
    paging = data.draw(st.integers(min_value=0, max_value=len(layers) - 1), label="paging run")
    app = start_app(server_config(max_layer_series=cap, max_layer_series_per_run=PER_RUN))
    try:
        runs = [f"r{i:02d}" for i in range(len(layers))]  # created in this order: oldest first
        for i, (run, n) in enumerate(zip(runs, layers, strict=True)):
            _send_run(app.grpc_target, run, n, pages=i == paging)
        text = scrape(app)
        again = scrape(app)
    finally:
        app.stop(grace=0)

    assert metric(text, "gradwatch_alert_firing", run=runs[paging], detector="non_finite") == 1
    series = _layer_series(text)
    assert len(series) == len(set(series)) <= cap
    assert _layer_series(again) == series  # nothing changed: the same series, in the same order
    wanted = {run: min(n, PER_RUN) * len(FILLED) for run, n in zip(runs, layers, strict=True)}
    omitted = metric(text, "gradwatch_layer_series_omitted", reason=LAYER_SERIES_OMITTED)
    assert len(series) + omitted == sum(wanted.values())

    # The paging run is served first, then the others oldest first; each keeps a prefix of its layers in schema
    # order (every family of a layer together), and only one run can be cut short.
    order = [runs[paging], *(run for run in runs if run != runs[paging])]
    per_run = Counter(run for _, run, _ in series)
    room, cut = cap, 0
    for run in order:
        got = min(wanted[run], room - room % len(FILLED))
        assert per_run[run] == got, (run, per_run[run], got)
        kept_layers = {layer for _, r, layer in series if r == run}
        assert kept_layers == {f"model.layers.{i}.linear" for i in range(got // len(FILLED))}
        cut += 0 < got < wanted[run]
        room -= got
    assert cut <= 1
    assert promtool_check(text).returncode == 0


def test_metrics_layer_series_cap_holds_over_many_wide_runs_and_keeps_the_newest_paging_run() -> None:
    runs, width, cap = 60, 64, 5000
    every = ("grad_norm", "weight_norm", "grad_max_abs", "grad_zero_fraction", "weight_zero_fraction", "update_ratio")
    stats = columns(width, **dict.fromkeys(every, 0.5))
    app = start_app(server_config(max_layer_series=cap))
    try:
        for i in range(runs):
            frames = [hello_frame(run=f"wide{i:02d}", layers=width), report_frame(1, layers=stats)]
            if i == runs - 1:  # the newest run pages
                frames.append(report_frame(2, loss=math.nan, layers=stats))
            run_stream(app.grpc_target, frames)
        text = scrape(app)
    finally:
        app.stop(grace=0)

    series = _layer_series(text)
    per_run = Counter(run for _, run, _ in series)
    assert len(series) == cap - cap % len(every)  # whole layers only
    assert per_run[f"wide{runs - 1:02d}"] == width * len(every)
    full = (cap - width * len(every)) // (width * len(every))  # the oldest quiet runs that fit whole
    assert all(per_run[f"wide{i:02d}"] == width * len(every) for i in range(full))
    assert set(per_run) == {f"wide{runs - 1:02d}", *(f"wide{i:02d}" for i in range(full + 1))}
    omitted = metric(text, "gradwatch_layer_series_omitted", reason=LAYER_SERIES_OMITTED)
    assert omitted == runs * width * len(every) - len(series)
    assert promtool_check(text).returncode == 0
