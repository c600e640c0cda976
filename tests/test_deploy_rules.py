"""deploy/prometheus/rules.yml and the Grafana alert rules: generated from one source, valid, unit-tested
with promtool, equivalent to each other, and following the alerting conventions."""

from __future__ import annotations

import filecmp
import pathlib
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml

from gradwatch.server.detectors import REGISTRY
from gradwatch.server.detectors.base import SEVERITIES
from gradwatch.server.rules import ALERT_RULES

ROOT = pathlib.Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
GRAFANA_RULES = ROOT / "deploy" / "grafana" / "provisioning" / "alerting" / "gradwatch-rules.yaml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "gradwatch-prometheus.yaml"
GENERATED = [
    "deploy/prometheus/rules.yml",
    "deploy/grafana/provisioning/alerting/gradwatch-rules.yaml",
    "deploy/grafana/dashboards/gradwatch-fleet.json",
    "deploy/grafana/dashboards/gradwatch-run.json",
    "deploy/grafana/dashboards/gradwatch-layers.json",
    "helm/gradwatch/files/prometheus/rules.yml",
    "helm/gradwatch/files/dashboards/gradwatch-fleet.json",
    "helm/gradwatch/files/dashboards/gradwatch-run.json",
    "helm/gradwatch/files/dashboards/gradwatch-layers.json",
    "deploy/alertmanager/alertmanager.yml",
    "deploy/compose/alertmanager.yml",
]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        pytest.fail("promtool is missing: run scripts/install-dev.sh (apt-get install prometheus)")


def _prometheus_alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _grafana_alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(GRAFANA_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_deploy_generated_files_match_regeneration(tmp_path: pathlib.Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_deploy.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh == sorted(GENERATED)
    for name in GENERATED:
        same = filecmp.cmp(ROOT / name, tmp_path / name, shallow=False)
        assert same, f"regenerate with scripts/gen_deploy.py: {name}"


def test_deploy_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_rules_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert has at least one unit test.
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert {rule["alert"] for rule in _prometheus_alerts()} <= tested


def test_deploy_rules_follow_alerting_conventions() -> None:
    for rule in _prometheus_alerts():
        assert re.fullmatch(r"Gradwatch(?:[A-Z][a-z0-9]+)+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES
        # A detector's alert also links to the run's latest incident of that detector on the server.
        incident = {"incident_url"} if "detector" in rule["labels"] else set()
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url", *incident}
        if incident:
            link = "/incidents/latest?run={{ $labels.run | urlquery }}&detector=" + rule["labels"]["detector"]
            assert rule["annotations"]["incident_url"].endswith(link)
        runbook = rule["annotations"]["runbook_url"].rsplit("/", 1)[1]
        assert (ROOT / "docs" / "runbooks" / runbook).is_file(), f"{rule['alert']}: no docs/runbooks/{runbook}"
        assert "job=" not in rule["expr"] and "instance=" not in rule["expr"]


def test_deploy_rules_page_for_every_detector_at_once_and_keep_firing() -> None:
    by_name = {rule["alert"]: rule for rule in _prometheus_alerts()}
    for spec in REGISTRY:
        rule = by_name[spec.alert_name]
        assert rule["labels"] == {"severity": spec.severity, "detector": spec.name}
        assert rule["for"] == "0s" and rule["keep_firing_for"] == "10m"
        assert f'detector="{spec.name}"' in rule["expr"]
    assert by_name["GradwatchRunStale"]["labels"]["severity"] == "critical"


def test_deploy_grafana_rules_equal_prometheus_rules() -> None:
    prometheus = _prometheus_alerts()
    grafana = _grafana_alerts()
    assert [g["title"] for g in grafana] == [p["alert"] for p in prometheus]
    datasource_uids = {d["uid"] for d in yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]}
    for p, g in zip(prometheus, grafana, strict=True):
        assert g["labels"] == p["labels"] and g["annotations"] == p["annotations"], p["alert"]
        assert g["for"] == p["for"]
        data = {d["refId"]: d for d in g["data"]}
        assert data["A"]["datasourceUid"] in datasource_uids
        assert data["B"]["model"] == {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last"}
        [condition] = data["C"]["model"]["conditions"]
        assert condition["evaluator"]["type"] == "gt" and g["condition"] == "C"
        threshold = condition["evaluator"]["params"][0]
        assert p["expr"] == f"{data['A']['model']['expr']} > {threshold:g}", p["alert"]
    assert [r.name for r in ALERT_RULES] == [p["alert"] for p in prometheus]
