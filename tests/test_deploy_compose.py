"""deploy/compose: the local stack parses, wires its services to each other by name and port, mounts files
that exist where the configs expect them, its Prometheus and Alertmanager configs pass promtool/amtool, and
the same configs run with Debian's Prometheus and Alertmanager against a real server. No container engine runs
here: the images themselves are never pulled."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import urllib.request
from typing import Any

import pytest
import yaml

from deploy_support import check_env_names, check_serve_args
from gradwatch.server.config import ServerConfig
from paging_support import alertmanager, prometheus, query
from server_support import start_app
from wait_support import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def _binds(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount (short syntax, relative to the compose file)."""
    out = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out.append((source, target))
    return out


def _ports(service: dict[str, Any]) -> dict[int, int]:
    return {int(p.split(":")[1]): int(p.split(":")[0]) for p in service.get("ports", [])}


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(args[0]) is None:
        pytest.fail(f"{args[0]} is missing: run scripts/install-dev.sh (Debian prometheus, prometheus-alertmanager)")
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60, check=False)


def test_compose_has_the_four_services_with_their_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"gradwatch", "prometheus", "alertmanager", "grafana"}
    assert _ports(services["gradwatch"]) == {50051: 50051, 9400: 9400}
    assert _ports(services["prometheus"]) == {9090: 9090}
    assert _ports(services["alertmanager"]) == {9093: 9093}
    assert _ports(services["grafana"]) == {3000: 3000}
    for name in ("prometheus", "alertmanager", "grafana"):
        image = services[name]["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image version, got {image}"


def test_compose_builds_the_server_image_from_the_checkout(compose: dict[str, Any]) -> None:
    build = compose["services"]["gradwatch"]["build"]
    context = (COMPOSE_DIR / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).is_file()
    service = compose["services"]["gradwatch"]
    container = {"name": "gradwatch", "args": service["command"],
                 "env": [{"name": k, "value": v} for k, v in service["environment"].items()]}  # fmt: skip
    parsed = check_serve_args(container)  # the image's ENTRYPOINT is `gradwatch`
    check_env_names(container)
    assert parsed.alertmanager_url == ["http://alertmanager:9093"]  # the compose service of that name and port


def test_compose_mounts_point_to_files_that_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    count = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
                count += 1
            else:
                assert source in named, f"{name}: named volume {source} is not declared"
    assert count >= 6


def _materialise(service: dict[str, Any], root: pathlib.Path) -> None:
    """Copy a service's bind mounts under `root` at their container paths."""
    for source, target in _binds(service):
        path = COMPOSE_DIR / source
        destination = root / target.lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            shutil.copytree(path, destination)
        else:
            shutil.copy(path, destination)


def test_compose_prometheus_config_loads_the_gradwatch_rules_and_scrapes_the_server(
    compose: dict[str, Any], tmp_path: pathlib.Path
) -> None:
    prometheus = compose["services"]["prometheus"]
    _materialise(prometheus, tmp_path)
    config_path = tmp_path / "etc" / "prometheus" / "prometheus.yml"
    assert f"--config.file=/{config_path.relative_to(tmp_path)}" in prometheus["command"]
    result = _tool("promtool", "check", "config", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr
    assert (tmp_path / "etc/prometheus/rules/gradwatch.yml").read_bytes() == (
        ROOT / "deploy/prometheus/rules.yml"
    ).read_bytes()
    config = yaml.safe_load(config_path.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets["gradwatch"] == ["gradwatch:9400"]
    [am] = config["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == ["alertmanager:9093"]


def test_compose_alertmanager_config_is_valid_and_inhibits_like_the_example(compose: dict[str, Any]) -> None:
    [(source, target)] = _binds(compose["services"]["alertmanager"])
    assert f"--config.file={target}" in compose["services"]["alertmanager"]["command"]
    path = COMPOSE_DIR / source
    result = _tool("amtool", "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    example = yaml.safe_load((ROOT / "deploy/alertmanager/alertmanager.yml").read_text())
    assert yaml.safe_load(path.read_text())["inhibit_rules"] == example["inhibit_rules"]


def test_compose_grafana_provisions_the_dashboards_where_the_provider_looks(compose: dict[str, Any]) -> None:
    binds = dict((target, source) for source, target in _binds(compose["services"]["grafana"]))
    provider_dir = COMPOSE_DIR / binds["/etc/grafana/provisioning/dashboards"]
    [provider] = yaml.safe_load((provider_dir / "gradwatch.yaml").read_text())["providers"]
    dashboards = COMPOSE_DIR / binds[provider["options"]["path"]]
    assert sorted(p.name for p in dashboards.glob("*.json")) == sorted(
        p.name for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")
    )
    assert len(list(dashboards.glob("*.json"))) >= 3
    datasources_dir = COMPOSE_DIR / binds["/etc/grafana/provisioning/datasources"]
    [datasource] = yaml.safe_load((datasources_dir / "gradwatch-prometheus.yaml").read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert pathlib.PurePosixPath(home).parent == pathlib.PurePosixPath(provider["options"]["path"])
    assert (dashboards / pathlib.PurePosixPath(home).name).is_file()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.slow
def test_compose_stack_wiring_runs_with_the_real_binaries(compose: dict[str, Any], tmp_path: pathlib.Path) -> None:
    """The stack without containers: a real server, Debian's Alertmanager with the compose alertmanager.yml and
    Debian's Prometheus with the compose prometheus.yml, service names swapped for loopback ports and the
    intervals shortened to 1 s. Prometheus scrapes the server, loads the rules and finds Alertmanager."""
    app = start_app(ServerConfig.local())
    try:
        am_config = yaml.safe_load((COMPOSE_DIR / "alertmanager.yml").read_text())
        with alertmanager(am_config, tmp_path / "am") as am_url:
            text = (COMPOSE_DIR / "prometheus.yml").read_text()
            text = text.replace("gradwatch:9400", f"127.0.0.1:{app.http_port}")
            text = text.replace("alertmanager:9093", am_url.removeprefix("http://"))
            config = yaml.safe_load(text)
            assert f"127.0.0.1:{app.http_port}" in json.dumps(config)  # the substitution hit
            config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
            rules = yaml.safe_load((ROOT / "deploy/prometheus/rules.yml").read_text())
            with prometheus(config, rules, tmp_path / "prom") as prom_url:
                wait_until(lambda: any(s["value"][1] == "1" for s in query(prom_url, 'up{job="gradwatch"}')),
                           60, what="Prometheus scrapes the gradwatch server", interval=0.25)  # fmt: skip
                assert query(prom_url, "gradwatch_server_info"), "the server's own metrics arrive"
                wait_until(lambda: _get(f"{prom_url}/api/v1/alertmanagers")["activeAlertmanagers"],
                           60, what="Prometheus finds Alertmanager", interval=0.25)  # fmt: skip
                groups = _get(f"{prom_url}/api/v1/rules")["groups"]
                loaded = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
                assert {"GradwatchNonFinite", "GradwatchServerAbsent"} <= loaded
    finally:
        app.stop()
