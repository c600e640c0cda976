"""FSDP2 (`fully_shard`) pieces for the guard's 2-rank gloo tests on the CPU: a tiny sharded MLP, per-rank
data with injected bad batches, the true global gradient norm, and exact comparisons of local shards."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# A bad batch: (rank that gets it, "nan" or "spike").
Bad = tuple[int, str]


def init_gloo(rank: int, world_size: int, master_port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(master_port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def build(mesh_shape: tuple[int, ...] = (2,)) -> nn.Module:
    """The same initial weights on every rank, each Linear and the whole net `fully_shard`ed; a 2-d mesh is
    HSDP (replicate x shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    names = ("replicate", "shard") if len(mesh_shape) == 2 else None
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for layer in list(net)[::2]:
        fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def optimizer(kind: str, net: nn.Module) -> torch.optim.Optimizer:
    """Adam for "adam_fused"/"adam_foreach", else AdamW ("adamw_fused": fused); fused SGD has no DTensor
    sharding rule in torch 2.13."""
    if kind.startswith("adam_"):
        return torch.optim.Adam(net.parameters(), lr=3e-3, fused=kind == "adam_fused")
    return torch.optim.AdamW(net.parameters(), lr=3e-3, fused=kind == "adamw_fused")


def data(index: int, rank: int, bad: dict[int, Bad]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` of `rank` (different data per rank); `bad[index]` makes it NaN or spiking on one rank."""
    generator = torch.Generator().manual_seed(100 * index + rank)
    x = torch.randn(64, 8, generator=generator)
    y = x.sum(dim=1, keepdim=True).sin()
    bad_rank, kind = bad.get(index, (-1, ""))
    if bad_rank == rank and kind == "nan":
        x[3, 2] = float("nan")
    elif bad_rank == rank and kind == "spike":
        y = y + 1e3
    return x, y


def true_norm(net: nn.Module) -> float:
    """The global gradient norm over every rank's shards (a collective)."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]).full_tensor())


def local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def shards(net: nn.Module, opt: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """Copies of this rank's parameter shards and optimizer state (named, in order), to compare exactly."""
    out: list[tuple[str, torch.Tensor]] = []
    for i, p in enumerate(net.parameters()):
        out.append((f"param{i}", local(p).detach().clone()))
        for key, value in sorted(opt.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                out.append((f"param{i}.{key}", local(value).detach().clone()))
    return out


def same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    """Bit for bit the same names and values."""
    return [n for n, _ in a] == [n for n, _ in b] and all(
        torch.equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True)
    )


def agree(value: Any) -> bool:
    """Whether every rank holds the same `value` (a collective)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return all(v == everyone[0] for v in everyone)
