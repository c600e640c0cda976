"""Shared fixtures.

Agent internal errors are swallowed in production; here they re-raise so a bug
in a hook or the sender fails the test that triggered it.
"""

from __future__ import annotations

import os

# What attach() sets for applications (see agent/process.py): grpcio's fork handlers can abort forked
# children that never use gRPC. grpc reads the variable at import, so set it before any test imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import importlib.util
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _strict_agent_errors() -> Iterator[None]:
    if importlib.util.find_spec("torch") is None:
        yield
        return
    from gradwatch.agent import errors

    errors.set_strict(True)
    try:
        yield
    finally:
        errors.set_strict(False)


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `gradwatch serve` a test starts keeps its database in a directory of its own (unless the test
    passes --data-dir), never in ./gradwatch-data of the checkout, so no test restores another's alerts."""
    monkeypatch.setenv("GRADWATCH_DATA_DIR", str(tmp_path_factory.mktemp("gradwatch-data")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests on machines without CUDA, saying why."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print measurements tests record with `record_property("report:<name>", value)`, even without -s."""
    lines = []
    for outcome in ("passed", "failed"):
        for report in terminalreporter.getreports(outcome):
            for name, value in report.user_properties:
                if name.startswith("report:") and report.when == "call":
                    lines.append(f"{report.nodeid}: {name.removeprefix('report:')} = {value}")
    if lines:
        terminalreporter.write_sep("-", "measurements")
        for line in lines:
            terminalreporter.write_line(line)
