"""What the training thread hands to the sender thread, and who this agent is.

Plain data, no protobuf: the training thread only builds these (cheap), the sender thread turns them into
wire frames (wire.py) after the device values have reached the host.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from gradwatch.agent.activations import ActivationItem, ActivationTap
from gradwatch.agent.autopsy import TailItem
from gradwatch.agent.config import AgentConfig
from gradwatch.agent.fold import LayerFold
from gradwatch.agent.schema import LayerSchema
from gradwatch.agent.snapshot import HostCopy
from gradwatch.agent.vector import VectorLayout

__all__ = ["AgentIdentity", "EventItem", "ReportItem"]


@dataclass(frozen=True)
class AgentIdentity:
    """Everything Hello says about this agent (fixed for the Monitor's lifetime)."""

    run_id: str
    job_name: str
    rank: int
    world_size: int
    local_rank: int
    host: str
    pid: int
    session_id: str
    agent_version: str
    torch_version: str
    device_kind: str
    full_stats_interval: int
    schema: LayerSchema
    activation_names: tuple[str, ...] = ()
    activation_types: tuple[str, ...] = ()
    #: Lowest rank and size of the ranks holding the same parameter values (replica.py); size 1: none known.
    replica_group: int = 0
    replica_group_size: int = 1
    #: ("detector.setting", JSON value) pairs: this run's detector settings (AgentConfig.detector_settings).
    detector_settings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(
        cls,
        config: AgentConfig,
        *,
        session_id: str,
        agent_version: str,
        torch_version: str,
        device_kind: str,
        schema: LayerSchema,
        activations: ActivationTap | None,
        replica_group: tuple[int, int] | None = None,
    ) -> AgentIdentity:
        """This process's identity for `config` (host and pid read here)."""
        return cls(
            run_id=config.run_id,
            job_name=config.job_name,
            rank=config.rank,
            world_size=config.world_size,
            local_rank=config.local_rank,
            host=socket.gethostname(),
            pid=os.getpid(),
            session_id=session_id,
            agent_version=agent_version,
            torch_version=torch_version,
            device_kind=device_kind,
            full_stats_interval=config.full_stats_interval,
            schema=schema,
            activation_names=() if activations is None else activations.names,
            activation_types=() if activations is None else activations.module_types,
            replica_group=replica_group[0] if replica_group else config.rank,
            replica_group_size=replica_group[1] if replica_group else 1,
            detector_settings=config.detector_settings,
        )


@dataclass(slots=True)  # not frozen: built on every step, and a frozen __init__ costs 5x
class Assembled:
    """The device part of one report, plus the host-side values that describe it (assembly.py builds it).

    `loss` is the loss when it was a plain number (the vector's loss slot is then unused); `learning_rates`
    holds NaN at `tensor_lr_slots`, filled from the vector's tail by the sender.
    """

    values: HostCopy
    layout: VectorLayout
    fold: LayerFold
    has_loss: bool
    loss_in_vector: bool
    loss: float
    learning_rates: list[float]
    tensor_lr_slots: tuple[int, ...]
    optimizer_step: int
    micro_steps: int
    activations: ActivationItem | None
    #: The guard and autopsy values at the end of the vector (autopsy.py), when guarded or given.
    tail: TailItem | None = None


@dataclass(slots=True)
class ReportItem:
    """One monitor.step(): its timing and cadence, plus the assembled device vector on its way to the host."""

    step: int
    wall_time: float
    step_duration_s: float
    agent_time_s: float
    payload: Assembled
    full_stats_interval: int = 0
    over_budget: bool = False
    #: Seconds from the previous step to this step's first forward pass (timing.py), when one was seen.
    pre_forward_s: float | None = None
    #: Seconds worked between collectives during the step (collectives.py), when the DDP hook saw them.
    between_collectives_s: float | None = None


@dataclass(slots=True)
class EventItem:
    """An agent event (e.g. "cadence_changed") for the server's timeline."""

    kind: str
    step: int
    wall_time: float
    message: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
