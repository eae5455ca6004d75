"""What a rank actually holds: elements of a module's parameters on this rank vs in the full model."""
from __future__ import annotations

from torch import Tensor, nn


def local_numel(p: Tensor) -> int:
    """Elements of `p` stored on this rank: a ZeRO-3 partition (`ds_tensor`, padded to equal parts), an
    FSDP2 DTensor's local shard, or the whole tensor."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor.numel()
    if hasattr(p, "to_local"):
        return p.to_local().numel()
    return p.numel()


def full_numel(p: Tensor) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def held_elements(module: nn.Module) -> tuple[int, int]:
    """(elements of `module`'s parameters held on this rank, elements of the full parameters)."""
    params = list(module.parameters())
    return sum(local_numel(p) for p in params), sum(full_numel(p) for p in params)
