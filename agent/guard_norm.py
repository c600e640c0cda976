"""The guard's gradient norm: over every gradient the optimizer applies, the same on every rank.

Contract
- `GradNorm.share()` returns this rank's share of the squared global gradient norm (0-d float32 on the
  guard's device, queued kernels only, nothing read on the host): the sum over the optimizer's parameters of
  |grad|² of what this rank holds (a DTensor's local shard: FSDP2, HSDP, tensor parallel), each divided by the
  number of ranks holding the same values (`schema.replication_of`: the product of the mesh sizes along a
  DTensor's `Replicate` dimensions; a plain tensor is replicated across the data-parallel group). Summed over
  the ranks (the guard's one SUM all-reduce) it is the exact global squared norm, the one the server computes
  from the reports; without torch.distributed every weight is 1 and the share is the norm².
- Per-parameter norms the agent's optimizer tap already computed in this step's pre-hook (before the guard's:
  torch runs global step pre-hooks first) are used when offered (`shared()` returns the layout's parameters
  and their norms): no second pass over the gradients. Otherwise (no tap, a tap error) one foreach norm
  over the local gradients.
- A parameter the optimizer applies but the model layout lacks makes the guard compute its own pass.
Call on the training thread only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gradwatch.agent.guard_state import optimizer_params
from gradwatch.agent.schema import local_tensor, replication_of

__all__ = ["GradNorm", "SharedNorms"]

#: The layout's parameters and their gradient L2 norms (0-d tensors, same order), or None this step.
SharedNorms = Callable[[], tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None]


class GradNorm:
    """This rank's share of the squared global gradient norm (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, *, distributed: bool,
                 plain_replication: int, shared: SharedNorms | None = None) -> None:  # fmt: skip
        self._optimizer = optimizer
        self._device = device
        self._distributed = distributed
        self._plain_replication = plain_replication
        self.shared = shared
        self._key: tuple[int, ...] = ()
        self._weights = torch.ones(0, device=device)
        self._weighted = False  # some weight is not 1
        self._layout_key: tuple[int, int] = (0, 0)
        self._index: torch.Tensor | None = None  # optimizer params' positions in the layout (None: identity)
        self._indexable = False
        self.shared_steps = 0  # steps that used the tap's norms (for tests and the bench)
        self._zero = torch.zeros((), device=device)

    def share(self) -> torch.Tensor:
        params = optimizer_params(self._optimizer)
        self._refresh(params)
        offered = self.shared() if self.shared is not None else None
        if offered is not None and self._map_layout(params, offered[0]):
            norms = torch.stack(list(offered[1])).to(self._device, torch.float32)
            if self._index is not None:
                norms = norms.index_select(0, self._index)
            self.shared_steps += 1
            return self._combine(norms.square())
        grads = [local_tensor(p.grad.detach()) for p in params if p.grad is not None]
        if not grads:
            return self._zero
        found = iter(torch._foreach_norm(grads))
        # A parameter without a gradient counts 0 (a cached device zero: no host-to-device copy in the step).
        each = [self._zero if p.grad is None else next(found).to(self._device, torch.float32) for p in params]
        return self._combine(torch.stack(each).square())

    def _combine(self, squares: torch.Tensor) -> torch.Tensor:
        return (squares * self._weights).sum() if self._weighted else squares.sum()

    def _refresh(self, params: list[torch.Tensor]) -> None:
        """Per-parameter weights (1 / replication), rebuilt when the optimizer's parameters change."""
        key = tuple(map(id, params))
        if key == self._key:
            return
        self._key, self._layout_key = key, (0, 0)
        weights = [1.0 / replication_of(p, self._plain_replication) if self._distributed else 1.0 for p in params]
        self._weights = torch.tensor(weights, dtype=torch.float32, device=self._device)
        self._weighted = any(w != 1.0 for w in weights)

    def _map_layout(self, params: list[torch.Tensor], layout: Sequence[torch.Tensor]) -> bool:
        """Whether every optimizer parameter is in `layout` (then `_index` picks them), cached per layout."""
        layout_key = (id(layout), len(layout))
        if layout_key != self._layout_key:
            self._layout_key = layout_key
            position = {id(p): i for i, p in enumerate(layout)}
            found = [position.get(id(p)) for p in params]
            self._indexable = all(i is not None for i in found)
            identity = self._indexable and found == list(range(len(layout)))
            self._index = None if identity or not self._indexable else torch.tensor(found, device=self._device)
        return self._indexable
