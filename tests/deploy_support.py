"""Checks shared by the Kubernetes manifest and Helm chart tests: where pod specs live in each workload kind,
what a gradwatch native sidecar and a gradwatch server container must carry, and that every GRADWATCH_*
variable and `gradwatch serve` flag they use is one gradwatch reads."""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes_validate

from gradwatch.agent import config as agent_config
from gradwatch.cli import build_parser
from gradwatch.server import config as server_config
from gradwatch.server.grpc_service import INGEST_SERVICE

RECOMMENDED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance")
#: Native sidecars need 1.29; validating against the oldest supported release catches newer-only fields.
KUBERNETES_VERSION = "1.29.0"
#: Custom resources: no schema in kubernetes-validate. Their pod templates are validated as PodTemplates.
CUSTOM_KINDS = frozenset({"PyTorchJob", "RayJob", "ServiceMonitor", "PodMonitor", "PrometheusRule"})
#: Variables the manifests may set before the server or agent declares them (none now): every other name must
#: be one gradwatch declares, so a misspelt or renamed variable fails the test.
PENDING_ENV: frozenset[str] = frozenset()


def declared_env() -> set[str]:
    """Every GRADWATCH_* name the server and agent configuration modules declare."""
    names = set()
    for module in (server_config, agent_config):
        for attr, value in vars(module).items():
            if attr.startswith("ENV_") and isinstance(value, str) and value.startswith("GRADWATCH_"):
                names.add(value)
    return names


def pod_specs(doc: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod template metadata, pod spec) for every pod template in a workload document."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield kind, spec["template"].get("metadata", {}), spec["template"]["spec"]
    elif kind == "CronJob":
        template = spec["jobTemplate"]["spec"]["template"]
        yield kind, template.get("metadata", {}), template["spec"]
    elif kind == "PyTorchJob":
        for role, replica in spec["pytorchReplicaSpecs"].items():
            yield f"{kind}.{role}", replica["template"].get("metadata", {}), replica["template"]["spec"]
    elif kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        head = cluster["headGroupSpec"]["template"]
        yield f"{kind}.head", head.get("metadata", {}), head["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind}.{group['groupName']}", group["template"].get("metadata", {}), group["template"]["spec"]


def validate_kubernetes(doc: Mapping[str, Any]) -> None:
    """Validate against Kubernetes' own OpenAPI schemas (strict: unknown fields fail), offline, with the
    kubernetes-validate package. Custom resources get their embedded pod templates validated."""
    if doc["kind"] not in CUSTOM_KINDS:
        kubernetes_validate.validate(dict(doc), KUBERNETES_VERSION, strict=True)
        return
    for where, meta, pod in pod_specs(doc):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": where.lower().replace(".", "-")},
                    "template": {"metadata": meta, "spec": pod}}  # fmt: skip
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)


def env_of(container: Mapping[str, Any]) -> dict[str, Any]:
    """Name -> value (or valueFrom mapping) of a container's env list."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def check_env_names(container: Mapping[str, Any]) -> None:
    known = declared_env() | PENDING_ENV
    for name in env_of(container):
        if name.startswith("GRADWATCH_"):
            assert name in known, f"{container['name']}: gradwatch reads no variable {name}"


def check_serve_args(container: Mapping[str, Any]) -> argparse.Namespace:
    """The container's command line parsed by gradwatch's own CLI parser (fails on an unknown flag)."""
    args = [*container.get("command", [])[1:], *container.get("args", [])]
    if container.get("command"):
        assert container["command"][0] == "gradwatch", container["command"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parsed = build_parser().parse_args(args)
        except SystemExit:
            raise AssertionError(f"{container['name']}: gradwatch rejects {args}: {stderr.getvalue()}") from None
    assert parsed.command == "serve", args
    return parsed


def port_number(container: Mapping[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port name) as a number declared by the container."""
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    number = ports[port] if isinstance(port, str) else port
    assert number in ports.values(), f"{container['name']}: port {port} is not a declared container port"
    return number


def check_server_container(container: Mapping[str, Any], *, tls: bool = False) -> argparse.Namespace:
    """What every gradwatch server container carries: the serve command, a gRPC and an HTTP port, health
    probes on the gRPC port's health service (TCP when the port speaks TLS, which kubelet's gRPC probes
    cannot), a locked-down security context, resource requests. Returns the parsed command line."""
    parsed = check_serve_args(container)
    check_env_names(container)
    ports = {p["name"].removeprefix("gw-"): p["containerPort"] for p in container["ports"]}
    assert set(ports) == {"grpc", "http"}, ports
    grpc_port = ports["grpc"]
    env = env_of(container)
    for var, port in (("GRADWATCH_GRPC_PORT", ports["grpc"]), ("GRADWATCH_HTTP_PORT", ports["http"])):
        assert env.get(var, str(port)) == str(port), f"{var} differs from the declared port {port}"
    for probe_name in ("startupProbe", "livenessProbe"):
        probe = container[probe_name]
        if tls:
            assert port_number(container, probe["tcpSocket"]["port"]) == grpc_port, probe_name
        else:
            assert port_number(container, probe["grpc"]["port"]) == grpc_port, probe_name
    if not tls:
        assert container["startupProbe"]["grpc"]["service"] == INGEST_SERVICE
    context = container.get("securityContext", {})
    assert context.get("allowPrivilegeEscalation") is False
    assert context.get("readOnlyRootFilesystem") is True
    assert context.get("capabilities", {}).get("drop") == ["ALL"]
    assert "requests" in container["resources"] and "memory" in container["resources"].get("limits", {})
    return parsed


def check_native_sidecar(pod: Mapping[str, Any], name: str = "gradwatch") -> dict[str, Any]:
    """The pod runs gradwatch as a native sidecar; returns that init container."""
    sidecars = [c for c in pod.get("initContainers", []) if c["name"] == name]
    assert len(sidecars) == 1, f"no init container {name!r}"
    [sidecar] = sidecars
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: runs beside the containers, pod still completes
    assert "startupProbe" in sidecar  # the training containers start only once it serves
    check_server_container(sidecar)
    context = {**pod.get("securityContext", {}), **sidecar["securityContext"]}
    assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) != 0
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for mount in sidecar.get("volumeMounts", []):
        assert mount["name"] in volumes, f"sidecar mounts undeclared volume {mount['name']}"
    return sidecar
