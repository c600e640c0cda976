"""Prometheus exposition: one Collector that builds every family at scrape time.

Nothing is registered per run or per layer: families are rebuilt from the store,
the alert book and the ingest counters on each scrape, so expired and evicted runs
simply stop appearing. The collector goes into a registry owned by the app (never
the process-global default), and no `_created` series are produced because no
family is given a creation time.

Conventions (Prometheus' naming practices): names `gradwatch_<what>_<unit>`, `_total` only on
counters, labels `run`, `job_name`, `rank`, `layer`, `detector`, `kind`, `reason`,
`agg` (never `job`/`instance`). Per-run counters exist at 0 from the run's Hello.
A NaN gauge cannot page, so non-finite values are counted in
gradwatch_non_finite_events_total and flagged by gradwatch_alert_firing. gradwatch_run_loss
shows the latest loss as it is, NaN or +-Inf included (a graph then breaks off instead of
showing a stale healthy value), and gradwatch_run_last_finite_loss_step the step it was last
finite; the grad-norm gauges show the latest finite value; per-layer gauges show NaN
only when every reporting rank has NaN for that layer, so the series never vanishes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.alerts import AlertBook
from gradwatch.server.report import NON_FINITE_KINDS
from gradwatch.server.stats import LATENCY_BUCKETS_S, IngestStats
from gradwatch.server.store import RunState, RunStore
from gradwatch.server.views import loss_view

__all__ = ["LAYER_COLUMNS", "LAYER_SERIES_OMITTED", "MAX_AGENT_DROP_REASONS", "GradwatchCollector"]

#: Agent-supplied drop reasons exported per run (label values from the wire are capped).
MAX_AGENT_DROP_REASONS = 16
#: Reason label of gradwatch_layer_series_omitted: per-layer series over limits.max_layer_series.
LAYER_SERIES_OMITTED = "max_layer_series"
#: Firing severities, most urgent first: the order in which runs get their per-layer series.
_SEVERITY_ORDER = ("critical", "warning", "info")

# (column in LayerStats, metric name, help): per-layer gauges, ranks aggregated by max. Data, so a
# new column on the wire is one line here (and one in the layer dashboard).
_LAYER_FAMILIES = (
    ("grad_norm", "gradwatch_layer_grad_norm", "L2 norm of the layer's gradient, max over ranks."),
    ("weight_norm", "gradwatch_layer_weight_norm", "L2 norm of the layer's weights, max over ranks."),
    ("grad_max_abs", "gradwatch_layer_grad_max_abs", "Largest |gradient element| of the layer, max over ranks."),
    (
        "grad_zero_fraction",
        "gradwatch_layer_grad_zero_ratio",
        "Fraction (0-1) of the layer's gradient elements that are exactly zero (dead units), max over ranks.",
    ),
    (
        "weight_zero_fraction",
        "gradwatch_layer_weight_zero_ratio",
        "Fraction (0-1) of the layer's weights that are exactly zero, max over ranks.",
    ),
    (
        "update_ratio",
        "gradwatch_layer_update_ratio",
        "|Δw|/|w| of the layer's latest full-statistics optimizer step, max over ranks.",
    ),
)


#: The per-layer columns exported (what a restored run keeps of its layers: gradwatch.server.persistence).
LAYER_COLUMNS = tuple(column for column, _, _ in _LAYER_FAMILIES)


class GradwatchCollector(Collector):
    """Builds gradwatch_* families from the live state on every scrape."""

    def __init__(
        self,
        store: RunStore,
        alerts: AlertBook,
        stats: IngestStats,
        *,
        detector_names: tuple[str, ...],
        version: str,
        max_layer_series: int,
        ticks: Callable[[], int],
    ) -> None:
        """`ticks`: completed passes of the run-scope detectors (Ingestor.ticks)."""
        self._max_layer_series = max_layer_series
        self._ticks = ticks
        self._store = store
        self._alerts = alerts
        self._stats = stats
        self._detector_names = detector_names
        self._version = version

    def describe(self) -> Iterable[Metric]:
        # Registration must not trigger a scrape; names are not needed for collision checks here.
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._self_metrics()
        yield from self._run_metrics()

    # ------------------------------------------------------------------ server

    def _self_metrics(self) -> Iterator[Metric]:
        snap = self._stats.snapshot()
        info = GaugeMetricFamily("gradwatch_server_info", "The gradwatch server's version.", labels=["version"])
        info.add_metric([self._version], 1)
        yield info
        frames = CounterMetricFamily("gradwatch_ingest_frames_total", "Agent frames applied, by kind.", labels=["kind"])
        for kind, n in snap.frames.items():
            frames.add_metric([kind], n)
        yield frames
        errors = CounterMetricFamily(
            "gradwatch_ingest_errors_total", "Frames or streams rejected, by reason.", labels=["reason"]
        )
        for reason, n in snap.errors.items():
            errors.add_metric([reason], n)
        yield errors
        yield CounterMetricFamily(
            "gradwatch_ingest_duplicate_frames_total",
            "Frames dropped because their seq was already applied.",
            value=snap.duplicates,
        )
        yield GaugeMetricFamily("gradwatch_ingest_active_streams", "Open agent streams.", value=snap.active_streams)
        with self._store.lock:
            tracked, evicted = len(self._store), self._store.evicted_total
        yield GaugeMetricFamily("gradwatch_runs_tracked", "Runs held in memory.", value=tracked)
        yield CounterMetricFamily(
            "gradwatch_detector_ticks_total",
            "Completed passes of the cross-rank detectors over every run (one per second; flat: the loop is stuck).",
            value=self._ticks(),
        )
        yield CounterMetricFamily(
            "gradwatch_runs_evicted_total", "Runs evicted to respect limits.max_runs.", value=evicted
        )
        cumulative = np.cumsum(snap.latency_buckets)
        bounds = [*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"]
        yield HistogramMetricFamily(
            "gradwatch_ingest_latency_seconds",
            "Time to validate and apply one agent frame.",
            buckets=list(zip(bounds, (int(c) for c in cumulative), strict=True)),
            sum_value=snap.latency_sum_s,
        )

    # ------------------------------------------------------------------ runs

    def _run_metrics(self) -> Iterator[Metric]:
        firing = self._alerts.firing_detectors()
        fams = _RunFamilies.empty()
        # Reader copies: the families are built without the store's lock.
        runs = [run for run in self._store.snapshot() if run.exported]
        for run in runs:
            fams.add_run(run, firing, self._detector_names)
        yield from fams.all()
        layers = _LayerSeries(self._max_layer_series)
        for run in _paging_first(runs, self._alerts.firing_severities()):
            layers.add_run(run)
        yield from layers.all()


@dataclass
class _RunFamilies:
    """The per-run families of one scrape."""

    info: GaugeMetricFamily
    step: GaugeMetricFamily
    loss: GaugeMetricFamily
    finite_loss_step: GaugeMetricFamily
    grad_norm: GaugeMetricFamily
    connected: GaugeMetricFamily
    finished: GaugeMetricFamily
    last_report: GaugeMetricFamily
    step_duration: GaugeMetricFamily
    non_finite: CounterMetricFamily
    firing: GaugeMetricFamily
    triggers: CounterMetricFamily
    restarts: CounterMetricFamily
    dropped_layers: CounterMetricFamily
    agent_dropped: CounterMetricFamily
    skipped_steps: CounterMetricFamily
    guard_skipped: CounterMetricFamily
    guard_rollbacks: CounterMetricFamily

    @classmethod
    def empty(cls) -> _RunFamilies:
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        return cls(
            info=gauge(
                "gradwatch_run_info",
                "A tracked run (value 1); finished runs stay for finished_run_retention_s.",
                labels=["run", "job_name", "world_size"],
            ),
            step=gauge("gradwatch_run_step", "Latest step, max over ranks.", labels=["run"]),
            loss=gauge(
                "gradwatch_run_loss",
                "Mean of the ranks' latest loss; NaN or +-Inf while a rank's latest loss is not finite.",
                labels=["run"],
            ),
            finite_loss_step=gauge(
                "gradwatch_run_last_finite_loss_step",
                "Earliest over ranks of the step of each rank's latest finite loss (stops while the loss is NaN).",
                labels=["run"],
            ),
            grad_norm=gauge(
                "gradwatch_run_grad_norm",
                "Latest finite gradient norm: of a rank, max or min over ranks; agg=global: the whole model's "
                "norm combined exactly from every rank's share, at the latest step all ranks reported.",
                labels=["run", "agg"],
            ),
            connected=gauge("gradwatch_run_ranks_connected", "Ranks with an open stream.", labels=["run"]),
            finished=gauge(
                "gradwatch_run_finished", "1 once every rank said Goodbye (the run ended cleanly).", labels=["run"]
            ),
            last_report=gauge(
                "gradwatch_rank_last_report_timestamp_seconds",
                "Server time of the rank's latest report.",
                labels=["run", "rank"],
            ),
            step_duration=gauge(
                "gradwatch_rank_step_duration_seconds",
                "Duration of the rank's latest reported training step.",
                labels=["run", "rank"],
            ),
            non_finite=counter(
                "gradwatch_non_finite_events_total", "Reports with a non-finite value, by kind.", labels=["run", "kind"]
            ),
            firing=gauge(
                "gradwatch_alert_firing",
                "1 while the detector's alert for the run is firing.",
                labels=["run", "detector"],
            ),
            triggers=counter(
                "gradwatch_detector_triggers_total",
                "Times a rank started firing the detector.",
                labels=["run", "detector"],
            ),
            restarts=counter(
                "gradwatch_rank_restarts_total",
                "Ranks that restarted: a new agent session beginning again at or before the step its last one "
                "reached (its per-rank detectors start afresh).",
                labels=["run"],
            ),
            dropped_layers=counter(
                "gradwatch_layer_series_dropped_total",
                "Layers left out of the per-layer series (limits.max_layer_series_per_run).",
                labels=["run"],
            ),
            agent_dropped=counter(
                "gradwatch_agent_dropped_total",
                "Items the agents dropped, by reason (from heartbeats).",
                labels=["run", "reason"],
            ),
            skipped_steps=counter(
                "gradwatch_skipped_steps_total",
                "Rank reports of optimizer steps a loss scaler skipped (Inf/NaN in scaled gradients).",
                labels=["run"],
            ),
            guard_skipped=counter(
                "gradwatch_guard_skipped_steps_total",
                "Rank reports of optimizer updates the agent's guard did not apply (spike or non-finite).",
                labels=["run"],
            ),
            guard_rollbacks=counter(
                "gradwatch_guard_rollbacks_total",
                "Rank reports of a guard rollback to the last known-good state.",
                labels=["run"],
            ),
        )

    def all(self) -> list[Metric]:
        return [getattr(self, f.name) for f in fields(self)]

    def add_run(self, run: RunState, firing: set[tuple[str, str]], detector_names: tuple[str, ...]) -> None:
        rid = run.run_id
        self.info.add_metric([rid, run.job_name, str(run.world_size)], 1)
        ranks = list(run.ranks.values()) or list(run.restored_ranks.values())  # restored: as saved
        steps = [r.last_step for r in ranks if r.last_step is not None]
        if steps:
            self.step.add_metric([rid], max(steps))
        loss = loss_view(ranks)
        if loss["loss_non_finite"] is not None:
            self.loss.add_metric([rid], float(loss["loss_non_finite"].replace("NaN", "nan")))
        elif loss["loss"] is not None:
            self.loss.add_metric([rid], loss["loss"])
        if loss["last_finite_loss_step"] is not None:
            self.finite_loss_step.add_metric([rid], loss["last_finite_loss_step"])
        norms = [r.last_grad_norm for r in ranks if r.last_grad_norm is not None]
        if norms:
            self.grad_norm.add_metric([rid, "max"], max(norms))
            self.grad_norm.add_metric([rid, "min"], min(norms))
        if run.global_grad_norm is not None:
            self.grad_norm.add_metric([rid, "global"], run.global_grad_norm)
        self.skipped_steps.add_metric([rid], run.skipped_steps)
        self.guard_skipped.add_metric([rid], run.guard_skipped_steps)
        self.guard_rollbacks.add_metric([rid], run.guard_rollbacks)
        self.connected.add_metric([rid], sum(1 for r in ranks if r.open_streams > 0))
        self.finished.add_metric([rid], 1 if run.finished else 0)
        for r in ranks:
            if r.last_report_at is not None:
                self.last_report.add_metric([rid, str(r.rank)], r.last_report_at)
            if r.last_step_duration is not None:
                self.step_duration.add_metric([rid, str(r.rank)], r.last_step_duration)
        for kind in NON_FINITE_KINDS:
            self.non_finite.add_metric([rid, kind], run.non_finite_counts.get(kind, 0))
        for name in detector_names:
            self.firing.add_metric([rid, name], 1 if (rid, name) in firing else 0)
            self.triggers.add_metric([rid, name], run.detector_triggers.get(name, 0))
        self.restarts.add_metric([rid], run.rank_restarts)
        self.dropped_layers.add_metric([rid], len(run.dropped_layers))
        dropped: dict[str, int] = {}
        for r in ranks:
            for reason, n in r.dropped.items():
                # Reasons come from the wire: cap their number so a buggy agent cannot explode cardinality.
                if reason in dropped or len(dropped) < MAX_AGENT_DROP_REASONS:
                    dropped[reason] = dropped.get(reason, 0) + n
        for reason, n in sorted(dropped.items()):
            self.agent_dropped.add_metric([rid, reason], n)


def _paging_first(runs: list[RunState], severities: dict[str, set[str]]) -> list[RunState]:
    """`runs` in the order they get per-layer series: by their most urgent firing alert (none last), then
    oldest first, then by id. Deterministic, and a new quiet run never takes the place of an older one."""
    quiet = len(_SEVERITY_ORDER) + 1

    def key(run: RunState) -> tuple[int, float, str]:
        firing = severities.get(run.run_id, ())
        level = min((_SEVERITY_ORDER.index(s) if s in _SEVERITY_ORDER else quiet - 1 for s in firing), default=quiet)
        return level, run.first_seen, run.run_id

    return sorted(runs, key=key)


class _LayerSeries:
    """The per-layer families of one scrape: at most `cap` series over all runs and families
    (limits.max_layer_series). Runs are added in priority order; a run that does not fit whole keeps its
    first layers in schema order (every family's series of a layer together); the rest is counted."""

    def __init__(self, cap: int) -> None:
        self._families = [
            (column, GaugeMetricFamily(name, doc, labels=["run", "layer"])) for column, name, doc in _LAYER_FAMILIES
        ]
        self._room = cap
        self._omitted = 0

    def add_run(self, run: RunState) -> None:
        aggregated = [run.aggregate_layers(column) for column, _ in self._families]
        seen = np.stack([present for _, present in aggregated])  # families × layers
        upto = np.cumsum(seen.sum(axis=0))  # series of layers 0..i, all families
        total = int(upto[-1]) if upto.size else 0
        keep = int(np.searchsorted(upto, self._room, side="right"))  # layers [0, keep) fit
        used = int(upto[keep - 1]) if keep else 0
        self._room -= used
        self._omitted += total - used
        for (values, present), (_, family) in zip(aggregated, self._families, strict=True):
            for i in np.flatnonzero(present[:keep]):
                family.add_metric([run.run_id, run.layer_names[i]], float(values[i]))

    def all(self) -> list[Metric]:
        omitted = GaugeMetricFamily(
            "gradwatch_layer_series_omitted",
            "Per-layer series left out of this scrape, by reason (max_layer_series: over limits.max_layer_series; "
            "runs with a firing alert are served first).",
            labels=["reason"],
        )
        omitted.add_metric([LAYER_SERIES_OMITTED], self._omitted)
        return [*(family for _, family in self._families), omitted]
