"""The server image without a container engine: the Dockerfile's one install step
(deploy/docker/install-server.sh) run in a fresh virtual environment gives a server that imports and serves
without torch, and the image's HEALTHCHECK script tells a serving server from an absent one."""

from __future__ import annotations

import fnmatch
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from paging_support import refused_port
from wait_support import wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
HEALTHCHECK = DOCKER / "healthcheck.py"
READY_TIMEOUT_S = 60.0


def _ignore_patterns() -> list[str]:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _build_context(target: pathlib.Path) -> pathlib.Path:
    """A copy of the checkout filtered by Dockerfile.dockerignore: what `COPY . .` puts in /src."""
    patterns = _ignore_patterns()

    def ignore(directory: str, names: list[str]) -> set[str]:
        relative = pathlib.Path(directory).relative_to(ROOT)
        dropped = set()
        for name in names:
            path = (relative / name).as_posix()
            for pattern in patterns:
                if fnmatch.fnmatch(path, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(name, pattern[3:])):
                    dropped.add(name)
        return dropped

    shutil.copytree(ROOT, target, ignore=ignore)
    return target


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    base = tmp_path_factory.mktemp("image")
    source = _build_context(base / "src")
    venv = base / "venv"
    result = subprocess.run(
        ["sh", str(source / "deploy" / "docker" / "install-server.sh"), str(source), str(venv)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed without torch" in result.stdout
    yield venv


def _python(venv: pathlib.Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120, check=False,
        cwd=venv,  # not the checkout: nothing may be imported from the source tree
    )  # fmt: skip


def _healthcheck(venv: pathlib.Path, grpc_port: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "GRADWATCH_GRPC_PORT": str(grpc_port)}
    return subprocess.run(
        [str(venv / "bin" / "python"), str(HEALTHCHECK)], capture_output=True, text=True, timeout=60, check=False,
        env=env, cwd=venv,
    )  # fmt: skip


def test_build_context_holds_what_the_install_needs_and_not_the_local_venv(tmp_path: pathlib.Path) -> None:
    context = _build_context(tmp_path / "ctx")
    for needed in ("pyproject.toml", "README.md", "server/app.py", "src/gradwatch/cli.py", "proto/gradwatch/v1",
                   "agent/config.py", "deploy/docker/install-server.sh", "deploy/docker/healthcheck.py"):
        assert (context / needed).exists(), needed
    for dropped in (".venv", ".git", "tests", "bench"):
        assert not (context / dropped).exists(), dropped
    assert not list(context.rglob("__pycache__"))


def test_dockerfile_runs_the_tested_install_script_as_non_root_with_both_ports() -> None:
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    keywords = [parts[0] for parts in instructions]
    assert keywords.count("FROM") == 2 and all("python:" in p[1] for p in instructions if p[0] == "FROM")
    runs = [p[1] for p in instructions if p[0] == "RUN"]
    assert "sh deploy/docker/install-server.sh /src /opt/gradwatch" in runs
    assert "torch" not in text.replace("without torch", "").replace("no torch", "")
    [user] = [p[1] for p in instructions if p[0] == "USER"]
    assert not user.startswith(("root", "0"))
    [expose] = [p[1] for p in instructions if p[0] == "EXPOSE"]
    assert expose.split() == ["50051", "9400"]
    assert 'CMD ["python", "/opt/gradwatch/healthcheck.py"]' in text
    assert 'ENTRYPOINT ["gradwatch"]' in text and 'CMD ["serve"]' in text


@pytest.mark.slow
def test_image_install_serves_without_torch(server_venv: pathlib.Path) -> None:
    result = _python(server_venv, "import gradwatch.server.app, gradwatch.cli; import torch")
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'torch'" in result.stderr, result.stderr
    result = _python(server_venv, "import sys, gradwatch, gradwatch.server.app; print(gradwatch.__file__)")
    assert result.returncode == 0, result.stderr
    assert str(server_venv) in result.stdout  # installed, not the checkout
    version = subprocess.run([str(server_venv / "bin" / "gradwatch"), "--version"], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
    assert version.returncode == 0 and version.stdout.startswith("gradwatch "), version.stderr


@pytest.mark.slow
def test_image_healthcheck_passes_on_a_serving_server_and_fails_without_one(
    server_venv: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    with refused_port() as nobody:
        assert _healthcheck(server_venv, nobody).returncode == 1  # nothing listens
    log, port_file = tmp_path / "serve.log", tmp_path / "ports.json"
    env = {"PATH": os.environ.get("PATH", ""), "GRADWATCH_GRPC_PORT": "0", "GRADWATCH_HTTP_PORT": "0",
           "GRADWATCH_HTTP_HOST": "127.0.0.1", "GRADWATCH_GRPC_HOST": "127.0.0.1"}  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen([str(server_venv / "bin" / "gradwatch"), "serve", "--port-file", str(port_file)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)  # fmt: skip
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S  # one deadline for both waits

        def written() -> bool:
            assert port_file.exists() or proc.poll() is None, log.read_text()
            return port_file.exists()

        wait_until(written, READY_TIMEOUT_S, what="the port file", interval=0.2, detail=log.read_text)
        grpc_port = json.loads(port_file.read_text())["grpc"]

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return _healthcheck(server_venv, grpc_port).returncode == 0

        wait_until(healthy, deadline - time.monotonic(), what="a passing healthcheck", interval=0.2,
                   detail=lambda: _healthcheck(server_venv, grpc_port).stderr + log.read_text())  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()
    failed = _healthcheck(server_venv, grpc_port)
    assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr
