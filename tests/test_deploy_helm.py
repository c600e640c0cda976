"""helm/gradwatch, loaded, linted and rendered by Helm's own library (the PyPI package helm-python-sdk, no helm
binary, no cluster) with several value sets; each rendering parses, validates against Kubernetes' own schemas
(kubernetes-validate, strict, 1.29) and carries the essentials: probes, ports,
labels, volumes, the scale-out StatefulSet and headless Service, monitoring objects only when the API exists or
is forced, the same rules and dashboards as deploy/, the native sidecar, and a strict values schema."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from deploy_support import (
    RECOMMENDED_LABELS,
    check_native_sidecar,
    check_server_container,
    env_of,
    pod_specs,
    port_number,
    validate_kubernetes,
)
from gradwatch import __version__
from gradwatch.server.config import config_from_args, load_config

try:
    import helm_python as helm
    from helm_python import _native
except ImportError:  # fail, never skip: the dev extra installs it
    pytest.fail("helm-python-sdk is missing: pip install -e '.[dev]' (scripts/install-dev.sh)", pytrace=False)

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "gradwatch"
MONITORING_API = "monitoring.coreos.com/v1"
NAME, NAMESPACE = "gw", "ml"
FULLNAME = f"{NAME}-gradwatch"


class Rendering:
    """One `helm template`: the objects by kind and the NOTES text."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in manifests.items():
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    assert {"apiVersion", "kind", "metadata"} <= set(doc), path
                    validate_kubernetes(doc)  # every rendering, against Kubernetes' own schemas
                    self.objects.append(doc)

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in self.all(kind)]}"
        return found[0]


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(
    chart: Any, values: dict[str, Any] | None = None, *, api_versions: tuple[str, ...] = ()
) -> Rendering:
    """Render like `helm template gw helm/gradwatch -n ml [--api-versions ...]`. Chart.render() has no
    api_versions keyword, so this calls the library's render entry point with the same options JSON."""
    options = {"name": NAME, "namespace": NAMESPACE, "api_versions": list(api_versions)}
    text = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(options))
    return Rendering(json.loads(text))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _server(rendering: Rendering) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(workload, pod metadata, pod spec, server container)."""
    [workload] = rendering.all("Deployment") + rendering.all("StatefulSet")
    _, meta, pod = next(pod_specs(workload))
    [container] = pod["containers"]
    return workload, meta, pod, container


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container["volumeMounts"]}


def test_chart_metadata_matches_the_package(chart: Any) -> None:
    metadata = chart.metadata
    assert metadata["name"] == "gradwatch" and metadata["apiVersion"] == "v2"
    assert metadata["appVersion"] == __version__ == chart.values["image"]["tag"]
    assert metadata["kubeVersion"] == ">=1.29.0-0"  # native sidecars
    assert chart.schema is not None and chart.schema["additionalProperties"] is False


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"persistence": {"enabled": True}},
        {"replicas": 3, "persistence": {"enabled": True}},
        {"tls": {"enabled": True, "existingSecret": "gw-tls", "clientCA": True}, "auth": {"existingSecret": "t"}},
        {"jobs": [{"name": "resnet", "podSpec": {"containers": [{"name": "train", "image": "t:1"}]}}]},
    ],
    ids=["defaults", "persistence", "scale-out", "tls-auth", "jobs"],
)
def test_chart_lints_clean(values: dict[str, Any]) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"); nothing at warning (2) or error (3).
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_defaults_render_one_server_with_probes_ports_labels_and_config(chart: Any) -> None:
    r = render(chart)
    assert r.kinds() == ["ConfigMap"] * 4 + ["Deployment", "Service", "Service", "ServiceAccount"]
    for obj in r.objects:
        labels = obj["metadata"]["labels"]
        assert set(RECOMMENDED_LABELS) <= set(labels), obj["metadata"]["name"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    workload, meta, pod, container = _server(r)
    assert workload["metadata"]["name"] == FULLNAME and workload["spec"]["replicas"] == 1
    assert _selects(workload["spec"]["selector"]["matchLabels"], meta["labels"])
    check_server_container(container)
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _mounts(container)
    assert "emptyDir" in volumes[mounts["/var/lib/gradwatch"]]
    env = env_of(container)
    assert env["GRADWATCH_DATA_DIR"] == "/var/lib/gradwatch"
    assert mounts[env["GRADWATCH_CONFIG"]] == "config"
    config_map = r.one("ConfigMap", volumes["config"]["configMap"]["name"])
    load_config(yaml.safe_load(config_map["data"]["gradwatch.yaml"]))  # {} is a valid configuration
    service = r.one("Service", FULLNAME)
    assert _selects(service["spec"]["selector"], meta["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(container, ports["grpc"]["targetPort"]) == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    assert port_number(container, ports["http"]["targetPort"]) == 9400
    assert f"GRADWATCH_SERVER={FULLNAME}.{NAMESPACE}.svc:50051" in r.notes
    assert "emptyDir" in r.notes


def test_config_values_reach_the_server_as_its_yaml_file(chart: Any) -> None:
    config = {"alerting": {"alertmanager_urls": ["http://am:9093"]}, "limits": {"max_runs": 50}}
    r = render(chart, {"config": config, "extraArgs": ["--external-url=http://gw.example:9400"]})
    _, meta, _pod, container = _server(r)
    loaded = load_config(yaml.safe_load(r.one("ConfigMap", FULLNAME)["data"]["gradwatch.yaml"]))
    assert loaded.alerting.alertmanager_urls == ("http://am:9093",) and loaded.limits.max_runs == 50
    assert check_server_container(container).external_url == "http://gw.example:9400"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["annotations"]["checksum/config"])
    assert meta["annotations"] != _server(render(chart))[1]["annotations"]  # a config change rolls the pods


def test_persistence_mounts_a_claim_at_the_data_dir(chart: Any) -> None:
    r = render(chart, {"persistence": {"enabled": True, "size": "50Gi", "storageClass": "fast"}})
    workload, _, pod, container = _server(r)
    claim = r.one("PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert claim["spec"]["storageClassName"] == "fast" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    data = volumes[_mounts(container)["/var/lib/gradwatch"]]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert workload["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce: never two pods on it
    assert "emptyDir" not in r.notes

    existing = render(chart, {"persistence": {"enabled": True, "existingClaim": "mine"}})
    assert existing.all("PersistentVolumeClaim") == []
    _, _, pod, _ = _server(existing)
    assert {v["name"]: v for v in pod["volumes"]}["data"]["persistentVolumeClaim"]["claimName"] == "mine"


def test_monitoring_objects_only_when_the_api_exists_or_is_forced(chart: Any) -> None:
    assert render(chart).all("ServiceMonitor") == [] and render(chart).all("PrometheusRule") == []
    with_api = render(chart, api_versions=(MONITORING_API,))
    assert len(with_api.all("ServiceMonitor")) == 1 and len(with_api.all("PrometheusRule")) == 1
    forced = render(chart, {"monitoring": {"serviceMonitor": {"enabled": True, "force": True},
                                           "prometheusRule": {"enabled": True, "force": True}}})  # fmt: skip
    assert len(forced.all("ServiceMonitor")) == 1 and len(forced.all("PrometheusRule")) == 1
    disabled = render(chart, {"monitoring": {"serviceMonitor": {"enabled": False, "force": False},
                                             "prometheusRule": {"enabled": False, "force": False}}},
                      api_versions=(MONITORING_API,))  # fmt: skip
    assert disabled.all("ServiceMonitor") == [] and disabled.all("PrometheusRule") == []


def test_prometheus_rule_carries_exactly_the_deploy_rules(chart: Any) -> None:
    r = render(chart, {"monitoring": {"prometheusRule": {"enabled": True, "force": False, "labels": {"release": "kps"}},
                                      "serviceMonitor": {"enabled": True, "force": False}}},
               api_versions=(MONITORING_API,))  # fmt: skip
    rule = r.one("PrometheusRule")
    assert rule["apiVersion"] == MONITORING_API and rule["metadata"]["labels"]["release"] == "kps"
    generated = (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    service = f"http://{FULLNAME}.{NAMESPACE}.svc:9400/incidents/"
    assert "http://localhost:9400/incidents/" in generated
    assert rule["spec"] == yaml.safe_load(generated.replace("http://localhost:9400/incidents/", service))
    annotations = [a for g in rule["spec"]["groups"] for a in g["rules"] if "alert" in a]
    assert any("{{ $labels.run }}" in a["annotations"]["summary"] for a in annotations)  # not eaten by Helm


def test_service_monitor_scrapes_each_server_once_over_http(chart: Any) -> None:
    r = render(chart, {"replicas": 2}, api_versions=(MONITORING_API,))
    monitor = r.one("ServiceMonitor")
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    selector = monitor["spec"]["selector"]
    [expression] = selector["matchExpressions"]
    selected = []
    for service in r.all("Service"):
        labels = service["metadata"]["labels"]
        absent = expression["operator"] == "DoesNotExist" and expression["key"] not in labels
        if _selects(selector["matchLabels"], labels) and absent:
            selected.append(service["metadata"]["name"])
            assert "http" in {p["name"] for p in service["spec"]["ports"]}
    assert selected == [FULLNAME]  # not the headless one as well: that would scrape every pod twice


def test_dashboards_are_configmaps_with_the_deploy_dashboards(chart: Any) -> None:
    r = render(chart)
    maps = [m for m in r.all("ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    deploy = {p.name: json.loads(p.read_text()) for p in (ROOT / "deploy/grafana/dashboards").glob("*.json")}
    assert len(deploy) >= 3
    shipped = {}
    for config_map in maps:
        [(key, text)] = config_map["data"].items()
        shipped[key] = json.loads(text)
    assert shipped == deploy
    assert render(chart, {"dashboards": {"enabled": False}}).all("ConfigMap") == [r.one("ConfigMap", FULLNAME)]


def test_scale_out_renders_a_statefulset_behind_a_headless_service(chart: Any) -> None:
    r = render(chart, {"replicas": 3, "persistence": {"enabled": True}})
    workload, meta, pod, container = _server(r)
    assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 3
    check_server_container(container)
    headless = r.one("Service", workload["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert _selects(headless["spec"]["selector"], meta["labels"])
    assert {p["name"] for p in headless["spec"]["ports"]} == {"grpc", "http"}
    # One volume per replica, mounted at the data dir; no shared claim.
    assert r.all("PersistentVolumeClaim") == []
    [template] = workload["spec"]["volumeClaimTemplates"]
    assert _mounts(container)["/var/lib/gradwatch"] == template["metadata"]["name"]
    assert template["metadata"]["name"] not in {v["name"] for v in pod["volumes"]}
    # Agents get every replica's stable name and the headless DNS name.
    stable = [f"{FULLNAME}-{i}.{headless['metadata']['name']}.{NAMESPACE}.svc:50051" for i in range(3)]
    assert f"GRADWATCH_SERVERS={','.join(stable)}" in r.notes
    # The headless name goes with dns:///, or gRPC would see one opaque address and pick a pod per rank.
    dns = f"dns:///{headless['metadata']['name']}.{NAMESPACE}.svc:50051"
    assert f"GRADWATCH_SERVERS={dns}" in r.notes and f"sidecar.upstream={dns}" in r.notes
    assert f"GRADWATCH_SERVERS={headless['metadata']['name']}" not in r.notes
    # Every replica answers the read API for all of them (GRADWATCH_PEERS, as the server reads it).
    peers = env_of(container)["GRADWATCH_PEERS"]
    assert peers == f"dns:///{headless['metadata']['name']}.{NAMESPACE}.svc:9400"
    assert config_from_args(environ={"GRADWATCH_PEERS": peers}).cluster.peers == (peers,)
    assert "GRADWATCH_PEERS" not in env_of(_server(render(chart, {}))[3])
    # Without persistence, replicas still get a writable data dir each.
    _, _, pod, container = _server(render(chart, {"replicas": 2}))
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}[_mounts(container)["/var/lib/gradwatch"]]


def test_tls_and_tokens_are_mounted_files_named_by_the_server_settings(chart: Any) -> None:
    r = render(chart, {"tls": {"enabled": True, "existingSecret": "gw-tls", "clientCA": True},
                       "auth": {"existingSecret": "gw-tokens", "key": "tokens.yaml"}},
               api_versions=(MONITORING_API,))  # fmt: skip
    _, _, pod, container = _server(r)
    check_server_container(container, tls=True)  # kubelet's gRPC probes cannot speak TLS: TCP probes
    assert "grpc" not in container["readinessProbe"]
    env, mounts = env_of(container), _mounts(container)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for var, key in (("GRADWATCH_TLS_CERT_FILE", "tls.crt"), ("GRADWATCH_TLS_KEY_FILE", "tls.key"),
                     ("GRADWATCH_TLS_CLIENT_CA_FILE", "ca.crt")):  # fmt: skip
        path = pathlib.PurePosixPath(env[var])
        assert path.name == key and volumes[mounts[str(path.parent)]]["secret"]["secretName"] == "gw-tls"
    tokens = pathlib.PurePosixPath(env["GRADWATCH_AUTH_TOKENS_FILE"])
    secret = volumes[mounts[str(tokens.parent)]]["secret"]
    assert secret["secretName"] == "gw-tokens" and secret["items"] == [{"key": "tokens.yaml", "path": tokens.name}]
    [endpoint] = r.one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    plain = env_of(_server(render(chart, {"tls": {"enabled": True, "existingSecret": "s"}}))[3])
    assert "GRADWATCH_TLS_CLIENT_CA_FILE" not in plain and "GRADWATCH_AUTH_TOKENS_FILE" not in plain


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
        ({"replicas": 2, "persistence": {"enabled": True, "existingClaim": "x"}}, "works with replicas: 1 only"),
    ],
)
def test_inconsistent_values_fail_with_a_message(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(chart, values)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicas": 0}, "/replicas"),
        ({"replica": 2}, "additional properties 'replica'"),
        ({"image": {"repository": "r", "tag": ""}}, "/image/tag"),
        ({"ports": {"grpc": 70000, "http": 9400}}, "/ports/grpc"),
        ({"tls": {"enabled": "yes"}}, "/tls/enabled"),
        ({"persistence": {"enabled": True, "mountPath": "relative"}}, "/persistence/mountPath"),
        ({"persistence": {"enabled": True, "mountPath": "/d", "size": "ten"}}, "/persistence/size"),
        ({"monitoring": {"serviceMonitor": {"enabled": True, "force": False, "intervall": "1m"}}}, "intervall"),
        ({"sidecar": {"image": {"repo": "x"}}}, "additional properties 'repo'"),
        ({"jobs": [{"name": "Bad_Name", "podSpec": {"containers": [{"name": "t"}]}}]}, "/jobs/0/name"),
        ({"jobs": [{"name": "ok", "podSpec": {"containers": []}}]}, "/jobs/0/podSpec/containers"),
        ({"sidecar": {"upstream": "gradwatch-headless"}}, "/sidecar/upstream"),
    ],
)
def test_schema_rejects_bad_values_naming_the_key(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        chart.validate_schema(chart.merge_values(values))


def test_jobs_get_the_native_sidecar_and_the_agent_environment(chart: Any) -> None:
    pod_spec = {
        "containers": [{"name": "train", "image": "t:1", "env": [{"name": "EPOCHS", "value": "3"}]},
                       {"name": "eval", "image": "t:1"}],
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
    }  # fmt: skip
    values = {"ports": {"grpc": 6000, "http": 9401}, "sidecar": {"args": ["--alertmanager-url=http://am:9093"]},
              "jobs": [{"name": "resnet", "podSpec": pod_spec, "ttlSecondsAfterFinished": 600}]}  # fmt: skip
    r = render(chart, values)
    job = r.one("Job", "resnet")
    assert job["spec"]["ttlSecondsAfterFinished"] == 600 and job["spec"]["backoffLimit"] == 0
    [(_, meta, pod)] = list(pod_specs(job))
    assert pod["restartPolicy"] == "Never"
    sidecar = check_native_sidecar(pod)
    assert port_number(sidecar, sidecar["startupProbe"]["grpc"]["port"]) == 6000
    assert env_of(sidecar)["GRADWATCH_GRPC_PORT"] == "6000" and env_of(sidecar)["GRADWATCH_HTTP_PORT"] == "9401"
    assert "--alertmanager-url=http://am:9093" in sidecar["args"]
    assert {v["name"] for v in pod["volumes"]} == {"gradwatch-data", "gradwatch-tmp", "shm"}
    for container in pod["containers"]:
        env = env_of(container)
        assert env["GRADWATCH_SERVER"] == "localhost:6000"
        assert env["GRADWATCH_RUN"] == env["GRADWATCH_JOB_NAME"] == "resnet"
    assert env_of(pod["containers"][0])["EPOCHS"] == "3"
    assert meta["labels"]["app.kubernetes.io/component"] == "sidecar"  # what deploy/kubernetes/podmonitor.yaml selects
    assert "Training Jobs with the gradwatch native sidecar: resnet." in r.notes


def test_sidecar_with_an_upstream_is_a_relay_of_the_aggregator(chart: Any) -> None:
    upstream = f"dns:///{FULLNAME}-headless.{NAMESPACE}.svc:50051"
    pod_spec = {"containers": [{"name": "train", "image": "t:1"}]}
    r = render(chart, {"sidecar": {"upstream": upstream}, "jobs": [{"name": "big", "podSpec": pod_spec}]})
    [(_, _, pod)] = list(pod_specs(r.one("Job", "big")))
    sidecar = check_native_sidecar(pod)
    env = env_of(sidecar)
    assert env["GRADWATCH_UPSTREAM"] == upstream
    # The server reads it as its relay setting (the sidecar's args start `gradwatch serve`).
    assert config_from_args(environ=env).relay.upstream == (upstream,)
    assert env_of(pod["containers"][0])["GRADWATCH_SERVER"] == "localhost:50051"  # agents stay on their pod
    # Without an upstream the sidecar serves its job alone, as before.
    [(_, _, pod)] = list(pod_specs(render(chart, {"jobs": [{"name": "big", "podSpec": pod_spec}]}).one("Job", "big")))
    assert "GRADWATCH_UPSTREAM" not in env_of(check_native_sidecar(pod))


def test_named_sidecar_template_renders_into_a_dependent_charts_job(tmp_path: pathlib.Path) -> None:
    """The intended use from a team's own job chart: depend on gradwatch, turn its server off, include the
    `gradwatch.sidecar`, `gradwatch.sidecarVolumes` and `gradwatch.agentEnv` templates."""
    parent = tmp_path / "train"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "gradwatch")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: train\nversion: 0.1.0\ndependencies:\n  - name: gradwatch\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(yaml.safe_dump({"gradwatch": {
        "server": {"enabled": False}, "dashboards": {"enabled": False},
        "monitoring": {"serviceMonitor": {"enabled": False, "force": False},
                       "prometheusRule": {"enabled": False, "force": False}},
        "sidecar": {"image": {"tag": "0.1.0-custom"}},
    }}))  # fmt: skip
    (parent / "templates" / "job.yaml").write_text("""\
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ .Release.Name }}
  labels:
    app.kubernetes.io/name: train
    app.kubernetes.io/instance: {{ .Release.Name }}
spec:
  template:
    spec:
      restartPolicy: Never
      initContainers:
        {{- include "gradwatch.sidecar" (dict "values" .Values.gradwatch) | nindent 8 }}
      containers:
        - name: train
          image: registry.example.com/train:1
          env:
            {{- include "gradwatch.agentEnv" (dict "values" .Values.gradwatch) | nindent 12 }}
      volumes:
        {{- include "gradwatch.sidecarVolumes" . | nindent 8 }}
""")
    with helm.Chart.load(parent) as loaded:
        r = Rendering(loaded.render(name="resnet", namespace=NAMESPACE))
    assert r.kinds() == ["Job"]  # the dependency's server is off: only the team's Job
    [(_, _, pod)] = list(pod_specs(r.one("Job", "resnet")))
    sidecar = check_native_sidecar(pod)
    assert sidecar["image"] == "gradwatch-server:0.1.0-custom"
    assert env_of(pod["containers"][0])["GRADWATCH_SERVER"] == "localhost:50051"


def test_prometheus_rule_links_incidents_under_the_configured_base_url(chart: Any) -> None:
    values = {"monitoring": {"prometheusRule": {"enabled": True, "force": True,
                                                "incidentBaseUrl": "https://gw.example.com/"}}}  # fmt: skip
    rule = render(chart, values).one("PrometheusRule")
    links = [a["annotations"]["incident_url"] for g in rule["spec"]["groups"] for a in g["rules"]
             if "incident_url" in a.get("annotations", {})]  # fmt: skip
    assert links and all(link.startswith("https://gw.example.com/incidents/latest?run=") for link in links), links
