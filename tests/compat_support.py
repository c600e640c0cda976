"""Worker functions for tests/test_compat.py that run in spawned processes. This module imports torch only,
never gradwatch: whatever a pickled model drags into the worker shows up in its sys.modules."""

from __future__ import annotations

import sys

import torch


def agent_modules() -> list[str]:
    """gradwatch modules loaded in this process."""
    return sorted(name for name in sys.modules if name == "gradwatch" or name.startswith("gradwatch."))


def hogwild_worker(model: torch.nn.Module, seed: int, steps: int, queue: torch.multiprocessing.Queue) -> None:
    """Train the shared `model` in place (Hogwild) and report what the unpickled model carried."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    queue.put((seed, agent_modules(), hooks))
