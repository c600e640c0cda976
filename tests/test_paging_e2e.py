"""The paging path end to end, with Debian's real prometheus and prometheus-alertmanager on loopback.

A real training run (DemoTraining) streams to a real server; a NaN is injected at one
step. The page must reach Alertmanager's webhook receiver twice, independently: pushed
by the server (Alertmanager API v2) and from Prometheus evaluating deploy/prometheus/rules.yml
on its scrapes of /metrics. Alertmanager runs deploy/alertmanager/alertmanager.yml's
routing tree (receivers swapped for the local webhook). When the run ends, both resolve.
The seconds from the faulty step to each notification are reported in the test summary.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import yaml  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import AlertingConfig, ServerConfig  # noqa: E402
from paging_support import (  # noqa: E402
    DEPLOY_RULES,
    Delivery,
    MissingBinary,
    WebhookReceiver,
    alertmanager,
    prometheus,
    query,
    routing_config,
)

RUN = "paging-e2e"
JOB = "train-llm"
STEP_PAUSE_S = 0.01  # ~100 steps/s: a run that lives long enough to be scraped
PAGE_TIMEOUT_S = 30.0
PUSH_LATENCY_BOUND_S = 5.0  # the target is p99 ≤ 1 s (bench/alert_latency.py); CI machines get slack


def fast_rules() -> dict[str, Any]:
    """deploy/prometheus/rules.yml with keep_firing_for removed, so a resolution shows in seconds, not
    minutes. Expressions, labels, annotations and `for` are the deployed ones."""
    rules = yaml.safe_load(DEPLOY_RULES.read_text())
    fast = copy.deepcopy(rules)
    for group in fast["groups"]:
        for rule in group["rules"]:
            rule.pop("keep_firing_for", None)
    return fast


def prometheus_config(server_port: int, alertmanager_url: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "external_labels": {"via": "prometheus"}},
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager_url.removeprefix("http://")]}]}]},
        "scrape_configs": [{"job_name": "gradwatch", "static_configs": [{"targets": [f"127.0.0.1:{server_port}"]}]}],
    }


def _is(status: str, via_prometheus: bool) -> Any:
    def predicate(delivery: Delivery, alert: dict[str, Any]) -> bool:
        labels = alert["labels"]
        return (
            alert["status"] == status
            and labels.get("run") == RUN
            and labels.get("alertname") == "GradwatchNonFinite"
            and ("via" in labels) == via_prometheus
        )

    return predicate


def test_paging_e2e_nan_pages_via_push_and_via_prometheus_then_resolves(
    tmp_path: pathlib.Path, record_property: Any
) -> None:
    try:
        with WebhookReceiver() as receiver, alertmanager(routing_config(receiver.url), tmp_path / "am") as am_url:
            config = dataclasses.replace(
                ServerConfig.local(),
                finished_run_retention_s=1.0,
                alerting=AlertingConfig(alertmanager_urls=(am_url,), log=False),
            )
            with ServerApp(config) as app, prometheus(
                prometheus_config(app.http_port, am_url), fast_rules(), tmp_path / "prom"
            ) as prom_url:
                _run_and_check(app, prom_url, receiver, record_property)
    except MissingBinary as exc:
        pytest.fail(str(exc))


def _run_and_check(app: ServerApp, prom_url: str, receiver: WebhookReceiver, record_property: Any) -> None:
    training = DemoTraining(seed=11)
    with gradwatch.attach(training.model, training.optimizer, run=RUN, job_name=JOB, server=app.grpc_target) as m:
        step = 0
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        # Healthy until Prometheus has scraped the run (its counters at 0): a realistic baseline.
        while not query(prom_url, f'gradwatch_detector_triggers_total{{run="{RUN}"}}'):
            assert time.monotonic() < deadline, "Prometheus never scraped the run"
            step += 1
            m.step(training.step())
            time.sleep(STEP_PAUSE_S)
        fault_step = step + 1
        faulty_at = time.time()
        m.step(training.step("nan"))
        step = fault_step
        pushed = via_rules = None
        while pushed is None or via_rules is None:
            assert time.monotonic() < deadline, f"no page in time: push={pushed}, prometheus={via_rules}"
            step += 1
            m.step(training.step())  # the poisoned run keeps reporting NaN, as a real one would
            time.sleep(STEP_PAUSE_S)
            pushed = pushed or receiver.wait_alert(_is("firing", via_prometheus=False), 0)
            via_rules = via_rules or receiver.wait_alert(_is("firing", via_prometheus=True), 0)
        assert m.close(timeout=10)
    ended_at = time.time()

    push_delivery, push_alert = pushed
    rules_delivery, rules_alert = via_rules
    record_property("report:push_page_s", round(push_delivery.received_at - faulty_at, 3))
    record_property("report:prometheus_page_s", round(rules_delivery.received_at - faulty_at, 3))

    # Routed by the deployed tree: critical → pager.
    assert push_delivery.path == "/pager" and rules_delivery.path == "/pager"
    assert push_alert["labels"] == {
        "alertname": "GradwatchNonFinite",
        "run": RUN,
        "detector": "non_finite",
        "severity": "critical",
        "job_name": JOB,
    }
    annotations = push_alert["annotations"]
    assert annotations["step"] == str(fault_step) and annotations["ranks"] == "0" and annotations["layer"] == "0"
    assert annotations["runbook_url"].endswith("/non_finite.md")
    assert f"step {fault_step}" in annotations["description"] and app.http_url in push_alert["generatorURL"]
    # The same page from the rules: same name, run, job and severity (+ Prometheus' external label).
    assert {k: rules_alert["labels"][k] for k in ("alertname", "run", "job_name", "severity", "detector")} == {
        k: v for k, v in push_alert["labels"].items()
    }
    assert rules_alert["annotations"]["runbook_url"] == annotations["runbook_url"]
    assert push_delivery.received_at - faulty_at < PUSH_LATENCY_BOUND_S

    # The run ended: after finished_run_retention_s both paths resolve.
    push_resolved = receiver.wait_alert(_is("resolved", via_prometheus=False), PAGE_TIMEOUT_S)
    rules_resolved = receiver.wait_alert(_is("resolved", via_prometheus=True), PAGE_TIMEOUT_S)
    assert push_resolved is not None, "the pushed alert never resolved"
    assert rules_resolved is not None, "the rule-evaluated alert never resolved"
    record_property("report:push_resolved_after_run_end_s", round(push_resolved[0].received_at - ended_at, 3))
    record_property("report:prometheus_resolved_after_run_end_s", round(rules_resolved[0].received_at - ended_at, 3))
    # Alertmanager's identity for the pushed alert never changed: startsAt fixed from fire to resolve.
    assert push_resolved[1]["startsAt"] == push_alert["startsAt"]
    # Found by detector, not by position: other alerts of the run may have resolved before it.
    resolved = [a["detector"] for a in app.alerts(run=RUN, state="resolved")]
    assert "non_finite" in resolved, resolved
