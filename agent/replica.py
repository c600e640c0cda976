"""Which ranks hold the same parameter values as this one: the replica group sent in Hello.

The server compares the parameter checksums (stats.StatsEngine.checksum) of the ranks of one replica group at
the same step (detector replica_mismatch); the group is named by its lowest global rank. It is the
intersection, over the model's parameters, of the ranks holding the same values as this rank:

- A DTensor parameter (FSDP2, HSDP, tensor parallel) says so through its placements: the ranks of its device
  mesh that share this rank's coordinates on every non-Replicate dimension (Shard, Partial). A pure FSDP2
  shard therefore has no replica; HSDP shards have one per replicate-dimension index.
- Plain parameters are replicated only where something keeps them so: the attached model is a
  DistributedDataParallel wrapper, whose process group (all ranks by default) holds identical weights. Plain
  parameters of any other model (independent per-rank models, pipeline stages) are assumed distinct: no
  replica, nothing compared, no false alarm.

Computed once at attach from static structure: no collective, no device work.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradwatch.agent.schema import ModelLayout

__all__ = ["replica_group"]


def replica_group(model: nn.Module, layout: ModelLayout, rank: int, world_size: int) -> tuple[int, int]:
    """(lowest rank, size) of this rank's replica group; (rank, 1) when it has no known replica."""
    if world_size <= 1:
        return rank, 1
    members: set[int] | None = None
    seen: set[tuple[int, tuple[str, ...]]] = set()
    for p in layout.params:
        placements = getattr(p, "placements", None)
        mesh = getattr(p, "device_mesh", None)
        if placements is None or mesh is None:
            group = _plain_group(model, world_size)
        else:
            key = (id(mesh), tuple(str(placement) for placement in placements))
            if key in seen:
                continue
            seen.add(key)
            group = _mesh_group(mesh, placements)
        if group is None:
            return rank, 1
        members = group if members is None else members & group
    if not members or rank not in members:
        return rank, 1
    return min(members), len(members)


def _plain_group(model: nn.Module, world_size: int) -> set[int] | None:
    """Ranks holding the same plain parameters: DDP's process group, else none known."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    import torch.distributed as dist

    group = getattr(model, "process_group", None)
    if group is None:
        return set(range(world_size))
    return {int(r) for r in dist.get_process_group_ranks(group)}


def _mesh_group(mesh: Any, placements: Any) -> set[int] | None:
    """Ranks of `mesh` sharing this rank's coordinates on every dimension that is not Replicate."""
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    index = tuple(slice(None) if placement.is_replicate() else coordinate[dim]
                  for dim, placement in enumerate(placements))  # fmt: skip
    return {int(r) for r in mesh.mesh[index].reshape(-1).tolist()}
