"""deploy/kubernetes: every manifest parses and carries what makes it work on a cluster — the central
Deployment's probes, ports, labels, volumes and configuration; the native gradwatch sidecar in a Job, a Kubeflow
PyTorchJob and a KubeRay RayJob, with every training container pointed at a server by environment.

No cluster here, and `kubectl apply --dry-run=client` needs one for API discovery, so these are static
checks: Kubernetes' own OpenAPI schemas (kubernetes-validate, strict, 1.29), gradwatch's own CLI parser and
config loader, and the rules in deploy_support."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from deploy_support import (
    RECOMMENDED_LABELS,
    check_env_names,
    check_native_sidecar,
    check_server_container,
    env_of,
    pod_specs,
    port_number,
    validate_kubernetes,
)
from gradwatch.server.config import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
JOBS = ["training-job.yaml", "pytorchjob.yaml", "rayjob.yaml"]


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: {doc.get('kind')}"
        assert doc["metadata"]["name"], name
    return docs


@pytest.mark.parametrize("name", sorted(p.name for p in K8S.glob("*.yaml")))
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    for doc in _docs(name):
        validate_kubernetes(doc)


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_parses_with_known_kinds() -> None:
    files = sorted(p.name for p in K8S.glob("*.yaml"))
    assert files == sorted(["central.yaml", "podmonitor.yaml", *JOBS])
    kinds = {name: [d["kind"] for d in _docs(name)] for name in files}
    assert kinds["central.yaml"] == ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"]
    assert kinds["training-job.yaml"] == ["Job"]
    assert kinds["pytorchjob.yaml"] == ["PyTorchJob", "Service"]
    assert kinds["rayjob.yaml"] == ["RayJob", "Service"]
    assert kinds["podmonitor.yaml"] == ["PodMonitor"]


def test_central_deployment_serves_with_probes_labels_config_and_a_data_volume() -> None:
    docs = _docs("central.yaml")
    [config_map] = _by_kind(docs, "ConfigMap")
    [claim] = _by_kind(docs, "PersistentVolumeClaim")
    [deployment] = _by_kind(docs, "Deployment")
    [service] = _by_kind(docs, "Service")
    for doc in docs:
        assert set(RECOMMENDED_LABELS) <= set(doc["metadata"]["labels"]), doc["kind"]
    _, meta, pod = next(pod_specs(deployment))
    assert _selects(deployment["spec"]["selector"]["matchLabels"], meta["labels"])
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # ReadWriteOnce volume
    [container] = pod["containers"]
    check_server_container(container)
    assert "readinessProbe" in container
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 10001
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/var/lib/gradwatch"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    env = env_of(container)
    assert env["GRADWATCH_DATA_DIR"] == "/var/lib/gradwatch"
    config_path = pathlib.PurePosixPath(env["GRADWATCH_CONFIG"])
    config_volume = volumes[mounts[str(config_path.parent)]]
    assert config_volume["configMap"]["name"] == config_map["metadata"]["name"]
    config = load_config(yaml.safe_load(config_map["data"][config_path.name]), source="central.yaml")
    assert config.alerting.alertmanager_urls  # a real, valid server configuration
    assert _selects(service["spec"]["selector"], meta["labels"])
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(container, ports["grpc"]["targetPort"]) == ports["grpc"]["port"] == 50051
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert port_number(container, ports["http"]["targetPort"]) == ports["http"]["port"] == 9400


@pytest.mark.parametrize("name", JOBS)
def test_job_runs_gradwatch_as_a_native_sidecar_and_points_every_agent_at_it(name: str) -> None:
    docs = _docs(name)
    services = _by_kind(docs, "Service")
    [workload] = [d for d in docs if d["kind"] != "Service"]
    pods = list(pod_specs(workload))
    assert len(pods) >= 1
    with_sidecar = [(where, meta, pod) for where, meta, pod in pods if pod.get("initContainers")]
    assert len(with_sidecar) == 1, "one server per job, so it sees every rank"
    _, sidecar_meta, sidecar_pod = with_sidecar[0]
    sidecar = check_native_sidecar(sidecar_pod)
    grpc_port = port_number(sidecar, "gw-grpc")
    assert sidecar_meta["labels"]["app.kubernetes.io/component"] == "sidecar"
    assert set(RECOMMENDED_LABELS) <= set(sidecar_meta["labels"])
    # Pods without the sidecar reach it through a Service selecting the sidecar's pod.
    reachable = {"localhost:50051": sidecar_pod}
    for service in services:
        assert _selects(service["spec"]["selector"], sidecar_meta["labels"]), service["metadata"]["name"]
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert port_number(sidecar, ports["grpc"]["targetPort"]) == grpc_port == ports["grpc"]["port"]
        reachable[f"{service['metadata']['name']}:{ports['grpc']['port']}"] = sidecar_pod
    for where, _meta, pod in pods:
        for container in pod["containers"]:
            check_env_names(container)
            server = env_of(container)["GRADWATCH_SERVER"]
            assert server in reachable, f"{where}/{container['name']}: GRADWATCH_SERVER={server} reaches nothing"
            if server.startswith("localhost:"):
                assert pod is sidecar_pod, f"{where}: localhost but no sidecar in this pod"
    if len(pods) > 1:
        assert services, "pods without the sidecar need a Service to reach it"


def test_training_job_names_the_run_after_the_job() -> None:
    [job] = _docs("training-job.yaml")
    _, _, pod = next(pod_specs(job))
    assert pod["restartPolicy"] == "Never"
    env = env_of(pod["containers"][0])
    for name in ("GRADWATCH_RUN", "GRADWATCH_JOB_NAME"):
        assert env[name]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"


def test_pytorchjob_and_rayjob_follow_their_operators_conventions() -> None:
    [pytorchjob, _] = _docs("pytorchjob.yaml")
    assert pytorchjob["apiVersion"] == "kubeflow.org/v1"
    assert set(pytorchjob["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
    for where, _, pod in pod_specs(pytorchjob):
        assert [c["name"] for c in pod["containers"]] == ["pytorch"], where  # the operator looks for `pytorch`
        assert env_of(pod["containers"][0])["GRADWATCH_RUN"] == pytorchjob["metadata"]["name"]
    [rayjob, _] = _docs("rayjob.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1"
    for where, _, pod in pod_specs(rayjob):
        assert pod["containers"][0]["name"].startswith("ray-"), where  # KubeRay takes the first container
        assert "GRADWATCH_RUN" not in env_of(pod["containers"][0])  # the Ray integration uses the experiment name


def test_podmonitor_scrapes_the_sidecars_http_port() -> None:
    [monitor] = _docs("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    for name in JOBS:
        for _, meta, pod in pod_specs(_docs(name)[0]):
            if pod.get("initContainers"):
                assert _selects(monitor["spec"]["selector"]["matchLabels"], meta["labels"]), name
                assert port_number(pod["initContainers"][0], endpoint["port"]) == 9400
