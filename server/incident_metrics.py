"""gradwatch_incidents_* and gradwatch_storage_* metric families: the flight recorder's and the database's
counters, built per scrape."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gradwatch.server.database import Database
from gradwatch.server.recorder import FlightRecorder

__all__ = ["PRUNE_REASONS", "RecorderCollector"]

#: (table, reason) pairs Database.prune counts; exported from 0 so increase() sees the first prune.
PRUNE_REASONS = (
    ("incidents", "age"),
    ("incidents", "count"),
    ("incidents", "size"),
    ("runs", "age"),
    ("runs", "count"),
    ("alerts", "run_pruned"),
    ("alerts", "count"),
)


class RecorderCollector(Collector):
    """gradwatch_incidents_* and gradwatch_storage_* families, built per scrape."""

    def __init__(self, recorder: FlightRecorder, database: Database) -> None:
        self._recorder = recorder
        self._db = database

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        rec = self._recorder
        yield CounterMetricFamily(
            "gradwatch_incidents_recorded", "Incidents opened by the flight recorder.", value=rec.opened
        )
        yield GaugeMetricFamily(
            "gradwatch_incidents_recording",
            "Incidents still recording the steps after their alert.",
            value=rec.recording(),
        )
        dropped = CounterMetricFamily(
            "gradwatch_incidents_dropped", "Incidents not recorded, by reason.", labels=["reason"]
        )
        for reason, n in rec.dropped.items():
            dropped.add_metric([reason], n)
        yield dropped
        pruned = CounterMetricFamily(
            "gradwatch_storage_pruned",
            "Rows deleted by the retention limits, by table and reason.",
            labels=["table", "reason"],
        )
        for key in PRUNE_REASONS:
            pruned.add_metric(list(key), self._db.pruned.get(key, 0))
        yield pruned
        yield CounterMetricFamily(
            "gradwatch_storage_write_errors",
            "Database writes that failed (ingestion went on).",
            value=self._db.write_errors,
        )
        yield GaugeMetricFamily(
            "gradwatch_storage_incident_bytes", "Bytes of stored incident windows.", value=self._db.stored_bytes()
        )
