"""Which tensors the agent watches, and in what order: the layer schema sent in Hello.

A *layer* is a module that owns parameters directly (`parameters(recurse=False)`), in `named_modules()`
order; every per-layer column on the wire is indexed by that order. A parameter shared by two modules
(tied embeddings) belongs to both layers but is counted once in model-wide sums.

The unique parameters are kept grouped by (device, dtype) so the statistics can run one foreach kernel per
group; `ParamGroup` slices index into `ModelLayout.params`.

Replication (for the exact global gradient norm across ranks): `ModelLayout.replication[i]` is the number of
ranks holding the same values of params[i]'s gradient. A DTensor (FSDP2, HSDP, tensor parallel) says so
through its placements: the product of the mesh sizes along its `Replicate` dimensions (1 for a pure shard).
A plain tensor is assumed replicated across the data-parallel group: `plain_replication` (the DDP group's
size, else the world size). A model that keeps distinct plain parameters on each rank (pipeline stages
without DDP) breaks that assumption; its global norm is then overcounted, never its per-rank statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ROOT_LAYER_NAME",
    "LayerSchema",
    "ModelLayout",
    "ParamGroup",
    "build_layout",
    "data_parallel_size",
    "is_stale",
    "local_tensor",
    "regroup",
    "replication_of",
]

# The root module's name in named_modules() is "": give it a visible one on the wire.
ROOT_LAYER_NAME = "<root>"


@dataclass(frozen=True)
class LayerSchema:
    """Names, module types and parameter counts of the layers, in wire order (mirrors the proto)."""

    names: tuple[str, ...]
    module_types: tuple[str, ...]
    param_counts: tuple[int, ...]
    #: Elements of each layer this rank holds (the local shard of DTensors); filled by the layout.
    local_param_counts: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class ParamGroup:
    """A run of `ModelLayout.params` sharing one device and dtype: [start, stop)."""

    device: torch.device
    dtype: torch.dtype
    start: int
    stop: int


@dataclass(frozen=True)
class ModelLayout:
    """The static structure the statistics are computed over.

    `member_params[k]` belongs to layer `member_layers[k]` (one entry per (layer, parameter) pair, so a tied
    parameter appears once per owning layer). `local_numels[i]` is the element count of params[i] as this
    rank holds it (the local shard for a DTensor).
    """

    schema: LayerSchema
    params: tuple[nn.Parameter, ...]
    groups: tuple[ParamGroup, ...]
    member_params: tuple[int, ...]
    member_layers: tuple[int, ...]
    local_numels: tuple[int, ...]
    has_dtensor: bool
    replication: tuple[int, ...] = ()
    plain_replication: int = 1

    @property
    def num_layers(self) -> int:
        return len(self.schema)

    @property
    def device(self) -> torch.device:
        """Where the per-report tensor is assembled: the first group's device."""
        return self.groups[0].device


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor (no collective), else `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def replication_of(p: torch.Tensor, plain_replication: int) -> int:
    """Ranks holding the same values as this rank's part of `p` (see the module docstring)."""
    placements = getattr(p, "placements", None)
    mesh = getattr(p, "device_mesh", None)
    if placements is None or mesh is None:
        return plain_replication
    count = 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            count *= mesh.size(dim)
    return count


def data_parallel_size(model: nn.Module, world_size: int) -> int:
    """Ranks that hold the same plain (non-DTensor) parameters: the DDP group's size, else the world's."""
    group = getattr(model, "process_group", None)
    if isinstance(model, nn.parallel.DistributedDataParallel) and group is not None:
        import torch.distributed as dist

        return int(dist.get_world_size(group))
    return world_size


def build_layout(model: nn.Module, plain_replication: int = 1) -> ModelLayout:
    """Discover the layers of `model`. Raises ValueError if it has no (initialised) parameters.

    `plain_replication`: ranks sharing each plain (non-DTensor) parameter, see the module docstring."""
    names: list[str] = []
    types: list[str] = []
    counts: list[int] = []
    layer_params: list[list[nn.Parameter]] = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        for p in own:
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"gradwatch: layer {name or ROOT_LAYER_NAME!r} has uninitialised (lazy) parameters: "
                    "run one forward pass before attach()"
                )
        names.append(name or ROOT_LAYER_NAME)
        types.append(type(module).__name__)
        counts.append(sum(p.numel() for p in own))
        layer_params.append(own)
    if not names:
        raise ValueError("gradwatch: the model has no parameters to monitor")

    return _arrange(LayerSchema(tuple(names), tuple(types), tuple(counts)), layer_params, plain_replication)


def regroup(layout: ModelLayout) -> ModelLayout:
    """The same layers and parameters, regrouped by their *current* (device, dtype).

    For a model moved (`.to()`) or cast after attach: the Parameter objects stay, their placement changes.
    """
    layer_params: list[list[nn.Parameter]] = [[] for _ in range(layout.num_layers)]
    for param_index, layer in zip(layout.member_params, layout.member_layers, strict=True):
        layer_params[layer].append(layout.params[param_index])
    return _arrange(layout.schema, layer_params, layout.plain_replication)


def is_stale(layout: ModelLayout) -> bool:
    """True when some group's parameters no longer sit on the group's device/dtype."""
    for group in layout.groups:
        first = layout.params[group.start]
        if first.device != group.device or first.dtype != group.dtype:
            return True
    return False


def _arrange(schema: LayerSchema, layer_params: list[list[nn.Parameter]], plain_replication: int) -> ModelLayout:
    # Unique parameters in first-seen order, then stably grouped by (device, dtype).
    first_seen: dict[int, nn.Parameter] = {}
    for own in layer_params:
        for p in own:
            first_seen.setdefault(id(p), p)
    keyed: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in first_seen.values():
        keyed.setdefault((p.device, p.dtype), []).append(p)
    params: list[nn.Parameter] = []
    groups: list[ParamGroup] = []
    for (device, dtype), members in keyed.items():
        groups.append(ParamGroup(device, dtype, len(params), len(params) + len(members)))
        params.extend(members)

    position = {id(p): i for i, p in enumerate(params)}
    member_params: list[int] = []
    member_layers: list[int] = []
    for layer, own in enumerate(layer_params):
        for p in own:
            member_params.append(position[id(p)])
            member_layers.append(layer)

    local_numels = tuple(local_tensor(p).numel() for p in params)
    local_counts = [0] * len(schema.names)
    for param, layer in zip(member_params, member_layers, strict=True):
        local_counts[layer] += local_numels[param]
    return ModelLayout(
        schema=dataclasses.replace(schema, local_param_counts=tuple(local_counts)),
        params=tuple(params),
        groups=tuple(groups),
        member_params=tuple(member_params),
        member_layers=tuple(member_layers),
        local_numels=local_numels,
        has_dtensor=any(hasattr(p, "to_local") for p in params),
        replication=tuple(replication_of(p, plain_replication) for p in params),
        plain_replication=plain_replication,
    )
