"""Grafana dashboards (deploy/grafana/dashboards/*.json) checked statically, without Grafana: they parse,
have the panels the on-call needs, and every metric and label their queries (and the rules') use is one a
real server exports after ingesting a real training run."""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.demo import DemoTraining  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import ServerConfig  # noqa: E402
from gradwatch.server.sinks import InMemorySink  # noqa: E402
from server_support import scrape  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
GRAFANA_RULES = ROOT / "deploy" / "grafana" / "provisioning" / "alerting" / "gradwatch-rules.yaml"
#: Series Prometheus itself makes (not the server): allowed in queries.
PROMETHEUS_SERIES = {"ALERTS"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|on|without|ignoring|group_left|group_right)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def exported() -> Iterator[dict[str, set[str]]]:
    """Sample name -> label names, from /metrics of a server that ingested a real run with a NaN."""
    app = ServerApp(ServerConfig.local(), extra_sinks=[InMemorySink()]).start()
    try:
        training = DemoTraining(seed=21)
        target = app.grpc_target
        with gradwatch.attach(training.model, training.optimizer, run="dash", job_name="j", server=target) as m:
            for step in range(1, 41):
                m.step(training.step("nan" if step == 30 else "none"))
            assert m.close(timeout=10)
        app.notifier.workers[0].wait_idle(10)
        names: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(scrape(app)):
            for sample in family.samples:
                names.setdefault(sample.name, set()).update(sample.labels)
        yield names
    finally:
        app.stop()


def _strings(node: Any, keys: tuple[str, ...]) -> Iterator[str]:
    """Every string value under `keys` anywhere in a JSON/YAML tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys and isinstance(value, str):
                yield value
            else:
                yield from _strings(value, keys)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, keys)


def _queries() -> dict[str, list[str]]:
    """Source file -> the PromQL it contains (dashboard targets, variables, annotations; rule exprs)."""
    out = {p.name: list(_strings(json.loads(p.read_text()), ("expr", "query", "definition"))) for p in DASHBOARDS}
    out[RULES.name] = list(_strings(yaml.safe_load(RULES.read_text()), ("expr",)))
    out[GRAFANA_RULES.name] = list(_strings(yaml.safe_load(GRAFANA_RULES.read_text()), ("expr",)))
    return out


def _recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def _metric_names(expr: str) -> set[str]:
    bare = _RANGE.sub("", _STRING.sub('""', expr))
    return {token for token in _IDENT.findall(bare) if "gradwatch" in token or token in PROMETHEUS_SERIES}


def test_deploy_dashboards_parse_and_are_well_formed() -> None:
    assert [p.name for p in DASHBOARDS] == ["gradwatch-fleet.json", "gradwatch-layers.json", "gradwatch-run.json"]
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        uids.add(board["uid"])
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (path.name, panel["title"])
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert board["templating"]["list"][0]["type"] == "datasource"
    assert len(uids) == len(DASHBOARDS)


def test_deploy_dashboards_have_the_views_the_issue_asks_for() -> None:
    boards = {p.stem: json.loads(p.read_text()) for p in DASHBOARDS}
    run_panels = {panel["title"]: panel for panel in boards["gradwatch-run"]["panels"]}
    assert {"Loss", "Gradient norm", "Step time per rank", "Detectors"} <= set(run_panels)
    assert "gradwatch_rank_step_duration_seconds" in run_panels["Step time per rank"]["targets"][0]["expr"]
    [alerts] = [a for a in boards["gradwatch-run"]["annotations"]["list"] if a.get("name") == "gradwatch alerts"]
    assert "gradwatch_alert_firing" in alerts["expr"]
    heatmaps = [p for p in boards["gradwatch-layers"]["panels"] if p["type"] == "heatmap"]
    used = {m for p in heatmaps for m in _metric_names(p["targets"][0]["expr"])}
    assert {
        "gradwatch_layer_grad_norm",
        "gradwatch_layer_update_ratio",
        "gradwatch_layer_grad_zero_ratio",
        "gradwatch_layer_weight_norm",
    } <= used
    fleet = {panel["title"] for panel in boards["gradwatch-fleet"]["panels"]}
    assert {"Runs", "Firing gradwatch alerts", "Runs with a firing detector"} <= fleet


def test_deploy_every_metric_in_dashboards_and_rules_is_exported(exported: dict[str, set[str]]) -> None:
    known = set(exported) | _recorded() | PROMETHEUS_SERIES
    for source, queries in _queries().items():
        assert queries, source
        for expr in queries:
            unknown = _metric_names(expr) - known
            assert not unknown, f"{source}: {expr!r} uses {sorted(unknown)}, which the server does not export"


def test_deploy_every_label_in_dashboards_and_rules_is_exported(exported: dict[str, set[str]]) -> None:
    all_labels = set().union(*exported.values()) | {"le", "alertname", "alertstate"}
    for source, queries in _queries().items():
        for expr in queries:
            bare = _STRING.sub('""', expr)
            for name, matchers in _SELECTOR.findall(expr):
                if name in exported:
                    missing = set(_MATCHER.findall(_STRING.sub('""', matchers))) - exported[name]
                    assert not missing, f"{source}: {name} has no label {sorted(missing)}"
            for grouping in _GROUPING.findall(bare):
                labels = {label.strip() for label in grouping.split(",") if label.strip()}
                assert labels <= all_labels, f"{source}: {expr!r} groups by unknown {sorted(labels - all_labels)}"
