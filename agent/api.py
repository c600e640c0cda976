"""The public interface of what `attach()` returns: `Monitor`.

Two implementations: `AgentMonitor` (monitor.py: hooks, statistics, the sender thread) and `NoopMonitor`
(monitor.py: what a disabled agent, the kill switch or a forked child gets; nothing is hooked, started or
imported). Both derive from this class and nothing else of each other, so a member added to one and not the
other fails at construction (abstract) and in tests/test_agent_config.py (same public members, same
signatures). Code that holds a monitor type-annotates it as `gradwatch.Monitor`.
"""

from __future__ import annotations

import abc
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from gradwatch.agent.actions import AlertNotice
    from gradwatch.agent.config import AgentConfig
    from gradwatch.agent.guard import Guard
    from gradwatch.agent.schema import LayerSchema

__all__ = ["DEFAULT_CLOSE_TIMEOUT_S", "Monitor"]

DEFAULT_CLOSE_TIMEOUT_S = 5.0


class Monitor(abc.ABC):
    """Streams training-health statistics of one model to a gradwatch server. Create with `attach()`.

    Every method is safe to call on the training thread and never raises into it (a `TrainingAlert` from
    `step()` with on_alert="raise" is asked for); the implementations document the details."""

    # ------------------------------------------------------------------ identity

    @property
    @abc.abstractmethod
    def config(self) -> AgentConfig: ...

    @property
    def run_id(self) -> str:
        return self.config.run_id

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def local_rank(self) -> int:
        return self.config.local_rank

    @property
    def exit_flush_timeout_s(self) -> float:
        return self.config.exit_flush_timeout_s

    @property
    @abc.abstractmethod
    def session_id(self) -> str: ...

    @property
    @abc.abstractmethod
    def step_count(self) -> int: ...

    @property
    @abc.abstractmethod
    def schema(self) -> LayerSchema: ...

    # ------------------------------------------------------------------ training-thread API

    @abc.abstractmethod
    def step(
        self,
        loss: torch.Tensor | float | None = None,
        labels: torch.Tensor | None = None,
        *,
        batch_ids: Any = None,
        sample_losses: torch.Tensor | None = None,
    ) -> None: ...

    @abc.abstractmethod
    def observe_loss(self, loss: torch.Tensor | float) -> None: ...

    @property
    @abc.abstractmethod
    def guard(self) -> Guard | None: ...

    @property
    @abc.abstractmethod
    def stop_requested(self) -> bool: ...

    @property
    @abc.abstractmethod
    def last_alert(self) -> AlertNotice | None: ...

    @abc.abstractmethod
    def event(self, kind: str, message: str = "", **attributes: str) -> None: ...

    @abc.abstractmethod
    def pause(self, reason: str = "paused") -> contextlib.AbstractContextManager[None]: ...

    @abc.abstractmethod
    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT_S) -> bool: ...

    @abc.abstractmethod
    def counters(self) -> dict[str, Any]: ...

    def __enter__(self) -> Monitor:
        return self

    @abc.abstractmethod
    def __exit__(self, exc_type: object, *exc_info: object) -> None: ...
