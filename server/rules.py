"""Prometheus rules as data: the one source of the Prometheus and the Grafana alert rules.

scripts/gen_deploy.py renders `ALERT_RULES` and `RECORDING_RULES` into
deploy/prometheus/rules.yml and deploy/grafana/provisioning/alerting/gradwatch-rules.yaml
(a test fails when either file differs from a fresh rendering), so the two alerting
paths share names, queries, thresholds, durations and severities.

Conventions (Prometheus' and Alertmanager's usual practice): CamelCase alert names (`alert_name_for`, also used by the
server's Alertmanager push, so one fault has one name on every path); labels
`severity` (+ `detector`); annotations summary, description, runbook_url. Every alert
is "`query` > `threshold`", which Grafana expresses as query → reduce(last) →
threshold(gt). Queries aggregate ranks and servers away (`by (run)`) and never page
on a NaN-valued gauge: detector alerts use the 0/1 firing gauge plus the trigger
counter's increase, so a fault that fired and cleared between two scrapes still pages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gradwatch.server.detectors import REGISTRY, DetectorSpec

__all__ = ["ALERT_RULES", "GROUP_NAME", "RECORDING_RULES", "AlertRule", "RecordingRule", "detector_rule", "duration"]

GROUP_NAME = "gradwatch"
#: Window over which a detector trigger keeps its alert firing even if the gauge was never scraped at 1.
TRIGGER_WINDOW = "2m"
#: Joins job_name onto a per-run result, so alerts can be routed by job.
_WITH_JOB = " * on (run) group_left (job_name) max by (run, job_name) (gradwatch_run_info)"
#: A running job that has not reported for this long pages.
STALE_AFTER_S = 600
#: " (job <job_name>)" when the run has a job name (Go template: Prometheus and Grafana alike).
_JOB = "{{ with $labels.job_name }} (job {{ . }}){{ end }}"


def duration(seconds: int) -> str:
    """Prometheus duration text: 0s, 90s, 5m, 2h."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


@dataclass(frozen=True)
class AlertRule:
    """Fires while `query` > `threshold` for `for_s`; keeps firing `keep_firing_for_s` after that stops.

    `summary` and `description` are templates that use `{{ $labels.<name> }}` only (Prometheus and
    Grafana render those alike). `runbook` is the page's name under the runbook base URL, without ".md".
    """

    name: str
    query: str
    threshold: float
    severity: str
    summary: str
    description: str
    runbook: str
    for_s: int = 0
    keep_firing_for_s: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def expr(self) -> str:
        return f"{self.query} > {self.threshold:g}"


@dataclass(frozen=True)
class RecordingRule:
    record: str
    expr: str


def detector_rule(spec: DetectorSpec) -> AlertRule:
    """The alert of one detector: firing now, or triggered within TRIGGER_WINDOW. Pages at once and keeps
    firing 10 minutes after the series stop (a restarted server or a failed scrape must not resolve a NaN)."""
    selector = f'{{detector="{spec.name}"}}'
    query = (
        f"(max by (run) (gradwatch_alert_firing{selector})"
        f" + max by (run) (increase(gradwatch_detector_triggers_total{selector}[{TRIGGER_WINDOW}])))"
        f"{_WITH_JOB}"
    )
    return AlertRule(
        name=spec.alert_name,
        query=query,
        threshold=0,
        severity=spec.severity,
        summary=f"[{{{{ $labels.run }}}}] {spec.description}",
        description=(
            f"gradwatch detector {spec.name} is firing (or fired in the last {TRIGGER_WINDOW}) for run "
            f"{{{{ $labels.run }}}}{_JOB}. The step, ranks, first layer and value are in the "
            "gradwatch server's /api/v1/alerts?run={{ $labels.run }}."
        ),
        runbook=spec.name,
        keep_firing_for_s=600,
        labels={"detector": spec.name},
    )


_STALE = AlertRule(
    name="GradwatchRunStale",
    query=(
        "(time() - max by (run) (gradwatch_rank_last_report_timestamp_seconds)"
        " unless on (run) (max by (run) (gradwatch_run_finished) > 0))"
        f"{_WITH_JOB}"
    ),
    threshold=STALE_AFTER_S,
    severity="critical",
    summary="[{{ $labels.run }}] no training report for over 10 minutes",
    description=(
        f"Run {{{{ $labels.run }}}}{_JOB} has not finished, but no rank has reported a step for "
        "over 10 minutes: the job is hung, crashed without saying goodbye, or lost its network path to gradwatch."
    ),
    runbook="run_stale",
    for_s=60,
)

_SERVER_ABSENT = AlertRule(
    name="GradwatchServerAbsent",
    query="absent(gradwatch_server_info)",
    threshold=0,
    severity="warning",
    summary="no gradwatch server is being scraped",
    description=(
        "Prometheus has no gradwatch_server_info series: every gradwatch server is down or unscraped, so no "
        "training fault can be detected or paged."
    ),
    runbook="server_absent",
    for_s=300,
)

_NOTIFY_FAILING = AlertRule(
    name="GradwatchNotificationsFailing",
    query='sum by (sink) (increase(gradwatch_alert_notifications_total{outcome=~"failed|dropped"}[10m]))',
    threshold=0,
    severity="warning",
    summary="gradwatch cannot deliver alerts to {{ $labels.sink }}",
    description=(
        "Notifications to {{ $labels.sink }} failed after retries or were dropped in the last 10 minutes: pages "
        "may be missing. Check the sink's reachability and the server log (logger gradwatch.server.sinks.worker)."
    ),
    runbook="notifications_failing",
)

#: Every alerting rule, detectors first (in REGISTRY order).
ALERT_RULES: tuple[AlertRule, ...] = (
    *(detector_rule(spec) for spec in REGISTRY),
    _STALE,
    _SERVER_ABSENT,
    _NOTIFY_FAILING,
)

#: Recording rules for the dashboards (level:metric:operations).
RECORDING_RULES: tuple[RecordingRule, ...] = (
    RecordingRule("run:gradwatch_run_step:deriv1m", "max by (run) (deriv(gradwatch_run_step[1m]))"),
    RecordingRule(
        "run:gradwatch_rank_last_report_age_seconds:max",
        "time() - max by (run) (gradwatch_rank_last_report_timestamp_seconds)",
    ),
    RecordingRule("kind:gradwatch_ingest_frames:rate1m", "sum by (kind) (rate(gradwatch_ingest_frames_total[1m]))"),
    RecordingRule("detector:gradwatch_alert_firing:sum", "sum by (detector) (gradwatch_alert_firing)"),
)
