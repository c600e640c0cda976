"""How an alert reads on a pager: Alertmanager labels, annotations and links, from an `Alert`.

Contract
--------
* `labels(alert)`: identity only, never values: alertname (CamelCase, shared with the
  Prometheus rules), run, detector, severity and job_name (when the run has one). The
  notifier computes them once, at the first fire, and keeps them for the alert's life.
* `annotations(alert)`: summary (one line), description (step, value, layer, ranks and
  provenance: where the fault was first seen), runbook_url, and the raw fields step,
  last_step, ranks, layer, value as strings for templates.
* `generator_url(alert)`: the link back: the alert's incident page (server/pages.py) for a warning or
  critical alert (the flight recorder opens one), else the server's overview of the run.
* `server_url` must be set (by the app, once the HTTP port is known) before rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from gradwatch.server.alerts import Alert
from gradwatch.server.detectors import REGISTRY, DetectorSpec, alert_name_for
from gradwatch.server.pages import incident_path
from gradwatch.server.recorder import RECORDED_SEVERITIES, incident_id
from gradwatch.server.sinks.base import rfc3339

__all__ = ["AlertRenderer"]


class AlertRenderer:
    """Renders alerts (gradwatch.server.alerts.Alert) for the sinks; see module docstring."""

    def __init__(
        self,
        *,
        runbook_base_url: str,
        job_name_of: Callable[[str], str],
        specs: tuple[DetectorSpec, ...] = REGISTRY,
        server_url: str = "",
    ) -> None:
        self._runbook_base = runbook_base_url
        self._job_name_of = job_name_of
        self._specs = {spec.name: spec for spec in specs}
        self.server_url = server_url.rstrip("/")

    def labels(self, alert: Alert) -> dict[str, str]:
        detector = alert.detector
        labels = {
            "alertname": alert_name_for(detector),
            "run": alert.run,
            "detector": detector,
            "severity": alert.severity,
        }
        job_name = self._job_name_of(alert.run)
        if job_name:
            labels["job_name"] = job_name
        return labels

    def runbook_url(self, detector: str) -> str:
        return f"{self._runbook_base}{detector}.md"

    def generator_url(self, alert: Alert) -> str:
        """The alert's incident page when it records one (warning, critical), else the run's overview."""
        if alert.severity in RECORDED_SEVERITIES:
            return f"{self.server_url}{incident_path(incident_id(alert.id, alert.started_at))}"
        return f"{self.server_url}/?run={quote(alert.run, safe='')}"

    def annotations(self, alert: Alert) -> dict[str, str]:
        spec = self._specs.get(alert.detector)
        what = spec.description if spec is not None else alert.detector
        ranks = ",".join(str(r) for r in alert.ranks)
        value = "n/a" if alert.value is None else f"{alert.value:.6g}"
        layer = alert.layer or "unknown"
        description = (
            f"{what} Run {alert.run}: {alert.summary}.\n"
            f"First seen at step {alert.step} (layer {layer}) at {rfc3339(alert.started_at)}; "
            f"ranks firing: {ranks}; latest firing step {alert.last_step}, value {value}.\n"
            f"Details: {self.generator_url(alert)}"
        )
        return {
            "summary": f"[{alert.run}] {alert.summary}",
            "description": description,
            "runbook_url": self.runbook_url(alert.detector),
            "step": str(alert.step),
            "last_step": str(alert.last_step),
            "ranks": ranks,
            "layer": layer,
            "value": value,
        }
