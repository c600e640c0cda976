"""deploy/alertmanager/alertmanager.yml: valid for amtool, routes critical → pager and warning → chat, and its
inhibition rules are the detectors' `inhibits` data, which the real Alertmanager then applies."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import urllib.request
from typing import Any

import pytest
import yaml

from gradwatch.server.detectors import REGISTRY, alert_name_for, inhibitions
from paging_support import DEPLOY_ALERTMANAGER, MissingBinary, WebhookReceiver, alertmanager, routing_config
from wait_support import wait_until

WAIT_S = 10.0


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["amtool", *args, f"--config.file={DEPLOY_ALERTMANAGER}"],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except FileNotFoundError:
        pytest.fail("amtool is missing: run scripts/install-dev.sh (apt-get install prometheus-alertmanager)")


def test_deploy_alertmanager_config_passes_amtool_check() -> None:
    result = subprocess.run(
        ["amtool", "check-config", str(DEPLOY_ALERTMANAGER)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(inhibitions(REGISTRY))} inhibit rules" in result.stdout


@pytest.mark.parametrize(("severity", "receiver"), [("critical", "pager"), ("warning", "chat"), ("info", "chat")])
def test_deploy_alertmanager_routes_by_severity(severity: str, receiver: str) -> None:
    result = _amtool("config", "routes", "test", f"--verify.receivers={receiver}",
                     f"severity={severity}", "alertname=GradwatchNonFinite", "run=r")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_deploy_alertmanager_inhibit_rules_are_the_detectors_inhibitions() -> None:
    config = yaml.safe_load(DEPLOY_ALERTMANAGER.read_text())
    expected = [
        {
            "source_matchers": [f'alertname="{alert_name_for(source)}"'],
            "target_matchers": [f'alertname=~"{"|".join(sorted(alert_name_for(t) for t in targets))}"'],
            "equal": ["run"],
        }
        for source, targets in sorted(inhibitions(REGISTRY).items())
    ]
    assert config["inhibit_rules"] == expected


def _push(am_url: str, alerts: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(
        am_url + "/api/v2/alerts", data=json.dumps(alerts).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        assert response.status == 200


def _alert(name: str, run: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    return {
        "labels": {"alertname": name, "run": run, "severity": "critical"},
        "annotations": {"summary": f"{name} {run}"},
        "startsAt": now.isoformat(),
        "endsAt": (now + dt.timedelta(minutes=5)).isoformat(),
        "generatorURL": "http://gradwatch.test/api/v1/alerts",
    }


def _state(am_url: str, name: str, run: str) -> dict[str, Any] | None:
    with urllib.request.urlopen(am_url + "/api/v2/alerts", timeout=WAIT_S) as response:
        for alert in json.loads(response.read()):
            if alert["labels"].get("alertname") == name and alert["labels"].get("run") == run:
                return dict(alert["status"])
    return None


def test_deploy_alertmanager_real_binary_inhibits_explosion_while_nan_fires(tmp_path: pathlib.Path) -> None:
    try:
        with WebhookReceiver() as receiver, alertmanager(routing_config(receiver.url), tmp_path) as am_url:
            _push(am_url, [_alert("GradwatchNonFinite", "r")])
            assert receiver.wait_alert(lambda d, a: a["labels"]["alertname"] == "GradwatchNonFinite", WAIT_S)
            _push(am_url, [_alert("GradwatchExplodingGradient", "r"), _alert("GradwatchExplodingGradient", "other")])
            # Another run's explosion pages; this run's is suppressed by its NaN.
            assert receiver.wait_alert(lambda d, a: a["labels"]["run"] == "other", WAIT_S)
            suppressed = lambda: (s := _state(am_url, "GradwatchExplodingGradient", "r")) and s["inhibitedBy"] and s  # noqa: E731
            state = wait_until(suppressed, WAIT_S, what="run r's explosion inhibited", interval=0.05,
                               detail=lambda: str(_state(am_url, "GradwatchExplodingGradient", "r")))  # fmt: skip
            assert state["state"] == "suppressed"
            inhibited = {"alertname": "GradwatchExplodingGradient", "run": "r", "severity": "critical"}
            assert not receiver.wait_alert(lambda d, a: a["labels"] == inhibited, 0)
    except MissingBinary as exc:
        pytest.fail(str(exc))
