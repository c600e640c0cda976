"""The distribution's shape: generated code, import boundaries, public surface."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_generated_protos_match_regeneration(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    committed = ROOT / "proto" / "gradwatch" / "v1"
    fresh = tmp_path / "gradwatch" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    assert "gradwatch_pb2.py" in generated and "gradwatch_pb2_grpc.py" in generated
    _match, mismatch, errors = filecmp.cmpfiles(committed, fresh, generated, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/gen_protos.py: {mismatch + errors}"


@pytest.mark.parametrize(
    "module", ["gradwatch", "gradwatch.server", "gradwatch.cli", "gradwatch.v1", "gradwatch.v1.vocabulary"]
)
def test_import_does_not_import_torch(module: str) -> None:
    result = _run_python(f"import sys, {module}; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_every_server_module_imports_without_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, gradwatch.server as s\n"
        "names = [m.name for m in pkgutil.walk_packages(s.__path__, 'gradwatch.server.')]\n"
        "assert len(names) > 5, names\n"
        "[importlib.import_module(n) for n in names]\n"
        "print('torch' in sys.modules)\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_agent_does_not_import_server() -> None:
    pytest.importorskip("torch")
    code = (
        "import importlib, pkgutil, sys, gradwatch.agent as a\n"
        "for m in pkgutil.walk_packages(a.__path__, 'gradwatch.agent.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(n for n in sys.modules if n.startswith('gradwatch.server')))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_api_snapshot() -> None:
    import gradwatch

    assert sorted(gradwatch.__all__) == ["Monitor", "__version__", "attach", "clip_grad_norm_"]
    assert gradwatch.__version__.count(".") == 2


def test_wire_protocol_version_is_one() -> None:
    from gradwatch.v1 import gradwatch_pb2 as pb

    assert pb.PROTOCOL_VERSION_CURRENT == 1
    assert pb.DESCRIPTOR.package == "gradwatch.v1"
