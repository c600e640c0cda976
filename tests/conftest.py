"""Shared fixtures.

Agent internal errors are swallowed in production; here they re-raise so a bug
in a hook or the sender fails the test that triggered it.
"""

from __future__ import annotations

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
