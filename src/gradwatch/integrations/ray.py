"""Ray Train: monitor each worker of a `TorchTrainer` from inside `train_loop_per_worker`.

    from gradwatch.integrations import ray as gradwatch_ray

    def train_loop_per_worker(config):
        model = ray.train.torch.prepare_model(build_model())      # DDP: attach after wrapping
        optimizer = torch.optim.AdamW(model.parameters())
        with gradwatch_ray.monitor(model, optimizer, server="gradwatch:50051") as monitor:
            for batch in loader:
                ...
                monitor.step(loss)

A loop that clips its gradients can use `gradwatch_ray.clip_grad_norm_` (gradwatch.clip_grad_norm_: torch's
clip_grad_norm_, same result, handing the agent the per-parameter norms of its pass; agent/clip.py).

Contract
- Rank, world size and local rank come from `ray.train.get_context()`; the run id defaults to the
  experiment name, which every worker of a run shares (`run=` or GRADWATCH_RUN override it).
- `monitor()` closes the monitor in a `finally` with a deadline (`close_timeout_s`, default 3 s): Ray kills
  workers about 5 s after the training function returns, so the flush cannot wait for `atexit`.
- Everything else is `gradwatch.attach`: same options, same environment variables, same ValueErrors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray.train

from gradwatch.agent.clip import clip_grad_norm_
from gradwatch.agent.monitor import Monitor
from gradwatch.agent.monitor import attach as _attach

__all__ = ["DEFAULT_CLOSE_TIMEOUT_S", "attach", "clip_grad_norm_", "monitor"]

DEFAULT_CLOSE_TIMEOUT_S = 3.0  # below Ray's ~5 s grace before it kills a finished worker


def attach(model: Any, optimizer: Any = None, **options: Any) -> Monitor:
    """`gradwatch.attach` with this worker's identity from the Ray Train context (call inside the loop)."""
    context = ray.train.get_context()
    identity = {
        "rank": context.get_world_rank(),
        "world_size": context.get_world_size(),
        "local_rank": context.get_local_rank(),
    }
    for key, value in identity.items():
        options.setdefault(key, value)
    if options.get("run") is None:
        options["run"] = _run_id(context)
    return _attach(model, optimizer, **options)


@contextlib.contextmanager
def monitor(
    model: Any, optimizer: Any = None, *, close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S, **options: Any
) -> Iterator[Monitor]:
    """`attach()` as a context manager that always flushes within `close_timeout_s` on the way out."""
    monitored = attach(model, optimizer, **options)
    try:
        yield monitored
    finally:
        monitored.close(timeout=close_timeout_s)


def _run_id(context: Any) -> str | None:
    """The experiment name (shared by the run's workers), unless GRADWATCH_RUN decides later."""
    import os

    if os.environ.get("GRADWATCH_RUN", "").strip():
        return None
    name = context.get_experiment_name()
    return str(name) if name else None
