"""gradwatch: training-health monitoring for PyTorch.

    monitor = gradwatch.attach(model, optimizer, run="my-run", server="localhost:50051")
    for batch in data:
        loss = ...
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        monitor.step(loss)
    monitor.close()

Importing this package does not import torch: the agent is loaded on first use
of `attach` or `Monitor`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gradwatch._version import __version__

if TYPE_CHECKING:
    from gradwatch.agent.monitor import Monitor

__all__ = ["Monitor", "__version__", "attach", "clip_grad_norm_"]


def attach(model: Any, optimizer: Any = None, **options: Any) -> Monitor:
    """Hook `model` (and `optimizer`) and start streaming statistics.

    See gradwatch.agent.monitor.attach for every option.
    """
    from gradwatch.agent.monitor import attach as _attach

    return _attach(model, optimizer, **options)


def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Any:  # fmt: skip
    """`torch.nn.utils.clip_grad_norm_`, same arguments and result, that also hands the attached monitors the
    per-parameter gradient norms it computed (no second pass over the gradients). See gradwatch.agent.clip."""
    from gradwatch.agent.clip import clip_grad_norm_ as _clip

    return _clip(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from gradwatch.agent.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
