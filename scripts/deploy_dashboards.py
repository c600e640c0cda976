"""The Grafana dashboards, as Python data: rendered to deploy/grafana/dashboards/ by gen_deploy.py.

Three dashboards, each a function returning Grafana's JSON model (schemaVersion 39):
fleet overview (runs, health, firing alerts, the server itself), run view (loss,
gradient norm, step time per rank, detector states, alerts as annotations) and layer
view (layer × time heatmaps). Every query uses metrics the server exports or recording
rules from gradwatch.server.rules; tests/test_deploy_dashboards.py checks that against
a real scrape. Panels are laid out left to right, top to bottom, on Grafana's 24-column grid.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DASHBOARDS"]

DS = {"type": "prometheus", "uid": "${datasource}"}
RUN = 'run="$run"'


class _Grid:
    """Places panels row by row on the 24-column grid and numbers them."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self._x = self._y = self._row_h = 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self._x + w > 24:
            self._x, self._y, self._row_h = 0, self._y + self._row_h, 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self._x, "y": self._y}
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)


LOSS_HELP = "Mean of the ranks' latest loss; NaN (no point drawn) while a rank's loss is not finite."


def _target(expr: str, legend: str = "", ref: str = "A", **extra: Any) -> dict[str, Any]:
    return {"datasource": DS, "refId": ref, "expr": expr, "legendFormat": legend, **extra}


def _panel(kind: str, title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
           **options: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options,
    }


def _timeseries(title: str, description: str, *targets: dict[str, Any], unit: str = "short",
                log: bool = False) -> dict[str, Any]:
    panel = _panel("timeseries", title, description, list(targets), unit,
                   legend={"displayMode": "list", "placement": "bottom"}, tooltip={"mode": "multi"})
    if log:
        panel["fieldConfig"]["defaults"]["custom"] = {"scaleDistribution": {"type": "log", "log": 10}}
    return panel


def _stat(title: str, description: str, expr: str, unit: str = "short") -> dict[str, Any]:
    return _panel("stat", title, description, [_target(expr, instant=True)], unit,
                  reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}, colorMode="value")


def _heatmap(title: str, description: str, metric: str) -> dict[str, Any]:
    expr = f'{metric}{{{RUN}, layer=~"$layer"}}'
    return _panel("heatmap", title, description, [_target(expr, "{{layer}}")], "short",
                  calculate=False, cellGap=0, color={"mode": "scheme", "scheme": "Spectral", "steps": 64},
                  yAxis={"axisPlacement": "left"}, tooltip={"show": True, "yHistogram": False})


def _datasource_var() -> dict[str, Any]:
    return {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0}


def _query_var(name: str, query: str, *, multi: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "label": name,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
        "hide": 0,
    }


def _dashboard(uid: str, title: str, description: str, grid: _Grid, variables: list[dict[str, Any]],
               annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    builtin = {"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
               "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard"}
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["gradwatch"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "links": [{"title": "gradwatch", "type": "dashboards", "tags": ["gradwatch"], "asDropdown": True}],
        "templating": {"list": [_datasource_var(), *variables]},
        "annotations": {"list": [builtin, *(annotations or [])]},
        "panels": grid.panels,
    }


def fleet() -> dict[str, Any]:
    g = _Grid()
    g.add(_stat("Runs tracked", "Runs the gradwatch servers hold.", "sum(gradwatch_runs_tracked)"), 6, 4)
    g.add(_stat("Runs with a firing detector", "Runs where at least one detector fires now.",
                "count(max by (run) (gradwatch_alert_firing) == 1) or vector(0)"), 6, 4)
    g.add(_stat("Stale runs", "Unfinished runs without a report for over 10 minutes.",
                "count(run:gradwatch_rank_last_report_age_seconds:max > 600 unless on (run) "
                "(max by (run) (gradwatch_run_finished) > 0)) or vector(0)"), 6, 4)
    g.add(_stat("Agent streams", "Open agent streams (about one per rank).",
                "sum(gradwatch_ingest_active_streams)"), 6, 4)
    runs = _panel(
        "table", "Runs", "One row per run: progress, health and freshness.",
        [
            _target("max by (run, job_name) (gradwatch_run_info)", ref="A", instant=True, format="table"),
            _target("max by (run) (gradwatch_run_step)", ref="B", instant=True, format="table"),
            _target("run:gradwatch_run_step:deriv1m", ref="C", instant=True, format="table"),
            _target("max by (run) (gradwatch_run_loss)", ref="D", instant=True, format="table"),
            _target("sum by (run) (gradwatch_alert_firing)", ref="E", instant=True, format="table"),
            _target("run:gradwatch_rank_last_report_age_seconds:max", ref="F", instant=True, format="table"),
            _target("max by (run) (gradwatch_run_ranks_connected)", ref="G", instant=True, format="table"),
        ],
        showHeader=True,
    )
    runs["transformations"] = [
        {"id": "merge", "options": {}},
        {"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value #A": True},
            "renameByName": {"Value #B": "step", "Value #C": "steps/s", "Value #D": "loss",
                             "Value #E": "detectors firing", "Value #F": "seconds since report",
                             "Value #G": "ranks connected"}}},
    ]
    g.add(runs, 24, 9)
    alerts = _panel("table", "Firing gradwatch alerts", "Alerts from the Prometheus rules (ALERTS series).",
                    [_target('ALERTS{alertname=~"Gradwatch.*", alertstate="firing"}', instant=True,
                             format="table")], showHeader=True)
    g.add(alerts, 12, 8)
    g.add(_timeseries("Firing detectors", "Runs firing each detector.",
                      _target("detector:gradwatch_alert_firing:sum", "{{detector}}")), 12, 8)
    g.add(_timeseries("Ingest frames / s", "Agent frames applied, by kind.",
                      _target("kind:gradwatch_ingest_frames:rate1m", "{{kind}}"), unit="ops"), 8, 8)
    g.add(_timeseries("Ingest errors / s", "Frames or streams rejected, by reason.",
                      _target("sum by (reason) (rate(gradwatch_ingest_errors_total[$__rate_interval]))",
                              "{{reason}}"), unit="ops"), 8, 8)
    g.add(_timeseries("Ingest latency p99", "Time to validate and apply one frame (99th percentile).",
                      _target("histogram_quantile(0.99, sum by (le) "
                              "(rate(gradwatch_ingest_latency_seconds_bucket[$__rate_interval])))", "p99"),
                      unit="s"), 8, 8)
    g.add(_timeseries("Notifications / s", "Alert notifications by sink and outcome.",
                      _target("sum by (sink, outcome) (rate(gradwatch_alert_notifications_total"
                              "[$__rate_interval]))", "{{sink}} {{outcome}}"), unit="ops"), 8, 8)
    g.add(_timeseries("Notification queue depth", "Notifications waiting for delivery, by sink.",
                      _target("gradwatch_alert_notifications_pending", "{{sink}}")), 8, 8)
    g.add(_timeseries("Muted alerts", "Firing alerts held back by inhibition or a silence.",
                      _target("sum by (reason) (gradwatch_alerts_muted)", "{{reason}}"),
                      _target("sum(gradwatch_silences_active)", "active silences", ref="B")), 8, 8)
    return _dashboard("gradwatch-fleet", "gradwatch / Fleet overview",
                      "Every run the gradwatch servers track, their health, and the servers themselves.", g, [])


def run() -> dict[str, Any]:
    g = _Grid()
    g.add(_stat("Step", "Latest step, max over ranks.", f"max(gradwatch_run_step{{{RUN}}})"), 6, 4)
    g.add(_stat("Loss", LOSS_HELP, f"max(gradwatch_run_loss{{{RUN}}})"), 6, 4)
    g.add(_stat("Ranks connected", "Ranks with an open stream.",
                f"max(gradwatch_run_ranks_connected{{{RUN}}})"), 6, 4)
    g.add(_stat("Detectors firing", "Detectors firing for this run now.",
                f"sum(gradwatch_alert_firing{{{RUN}}})"), 6, 4)
    g.add(_timeseries("Loss", LOSS_HELP,
                      _target(f"max by (run) (gradwatch_run_loss{{{RUN}}})", "loss")), 12, 8)
    g.add(_timeseries("Gradient norm", "Global gradient norm, max and min over ranks (log scale).",
                      _target(f"max by (agg) (gradwatch_run_grad_norm{{{RUN}}})", "{{agg}}"), log=True), 12, 8)
    g.add(_timeseries("Step time per rank", "Duration of each rank's latest step: a slow rank is a straggler.",
                      _target(f"max by (rank) (gradwatch_rank_step_duration_seconds{{{RUN}}})", "rank {{rank}}"),
                      unit="s"), 12, 8)
    g.add(_timeseries("Seconds since report, per rank", "Age of each rank's latest report.",
                      _target(f"time() - max by (rank) (gradwatch_rank_last_report_timestamp_seconds{{{RUN}}})",
                              "rank {{rank}}"), unit="s"), 12, 8)
    g.add(_panel("state-timeline", "Detectors", "1 while the detector fires for this run.",
                 [_target(f"max by (detector) (gradwatch_alert_firing{{{RUN}}})", "{{detector}}")],
                 showValue="never", mergeValues=True), 12, 6)
    g.add(_timeseries("Non-finite events", "Reports with NaN/Inf, by kind.",
                      _target(f"sum by (kind) (increase(gradwatch_non_finite_events_total{{{RUN}}}"
                              "[$__rate_interval]))", "{{kind}}")), 12, 6)
    g.add(_timeseries("Steps / s", "Training throughput.",
                      _target(f"run:gradwatch_run_step:deriv1m{{{RUN}}}", "steps/s")), 12, 6)
    g.add(_timeseries("Detector triggers", "Times a rank started firing a detector.",
                      _target(f"sum by (detector) (increase(gradwatch_detector_triggers_total{{{RUN}}}"
                              "[$__rate_interval]))", "{{detector}}")), 12, 6)
    annotation = {
        "name": "gradwatch alerts",
        "datasource": DS,
        "enable": True,
        "iconColor": "red",
        "expr": f"max by (detector) (gradwatch_alert_firing{{{RUN}}}) == 1",
        "step": "15s",
        "titleFormat": "{{detector}} firing",
        "textFormat": "run $run",
        "useValueForTime": False,
    }
    return _dashboard("gradwatch-run", "gradwatch / Run", "One training run: loss, gradients, ranks, alerts.", g,
                      [_query_var("run", "label_values(gradwatch_run_info, run)")], [annotation])


def layers() -> dict[str, Any]:
    g = _Grid()
    g.add(_heatmap("Gradient norm by layer", "L2 norm of each layer's gradient (max over ranks) over time.",
                   "gradwatch_layer_grad_norm"), 12, 10)
    g.add(_heatmap("Update ratio by layer",
                   "|Δw| / |w| of each layer's optimizer update: ~1e-3 is healthy; far above, the layer is "
                   "being rewritten; far below, it is frozen.", "gradwatch_layer_update_ratio"), 12, 10)
    g.add(_heatmap("Dead gradient fraction by layer",
                   "Fraction of each layer's gradient elements that are exactly zero (dead units).",
                   "gradwatch_layer_grad_zero_ratio"), 12, 10)
    g.add(_heatmap("Largest |gradient| by layer", "Max |gradient element| per layer: saturation and spikes.",
                   "gradwatch_layer_grad_max_abs"), 12, 10)
    g.add(_heatmap("Weight norm by layer", "L2 norm of each layer's weights.", "gradwatch_layer_weight_norm"),
          12, 10)
    g.add(_heatmap("Zero weight fraction by layer", "Fraction of each layer's weights that are exactly zero.",
                   "gradwatch_layer_weight_zero_ratio"), 12, 10)
    return _dashboard(
        "gradwatch-layers", "gradwatch / Layers",
        "Per-layer statistics of one run, layer × time (a capped, stable set of layers per run).", g,
        [_query_var("run", "label_values(gradwatch_run_info, run)"),
         _query_var("layer", f"label_values(gradwatch_layer_grad_norm{{{RUN}}}, layer)", multi=True)],
    )


#: File name -> dashboard builder.
DASHBOARDS = {"gradwatch-fleet.json": fleet, "gradwatch-run.json": run, "gradwatch-layers.json": layers}
