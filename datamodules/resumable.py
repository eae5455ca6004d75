"""A DataLoader that Lightning can resume mid-epoch with nothing lost or repeated.

Lightning saves `state_dict()` of every training loader that implements it and calls
`load_state_dict()` on resume (lightning/pytorch/loops/fit_loop.py). The state is the sampler's
epoch and how many batches of that epoch the trainer has *processed*, read from the trainer's own
progress counter rather than counted here: Lightning prefetches one batch ahead, so the number of
batches this loader has yielded is one more than the number trained on. The skip itself is done by
the sampler (`resume_at`), lazily, because Lightning builds the iterator before calling `set_epoch`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


def resumable_sampler(sampler: Sampler) -> tuple[Sampler, int]:
    """The sampler that implements `resume_at`, and how many ranks share its index list. Under DDP
    Lightning wraps ours in a DistributedSamplerWrapper (ours sits at `.dataset._sampler`); each rank
    then takes every world_size-th index of our order, so a skip of k batches per rank is
    k * batch_size * world_size indices of ours."""
    if hasattr(sampler, "resume_at"):
        return sampler, 1
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    if inner is not None and hasattr(inner, "resume_at"):
        return inner, getattr(sampler, "num_replicas", dist.get_world_size() if dist.is_initialized() else 1)
    raise TypeError(f"ResumableDataLoader needs a sampler with resume_at(epoch, samples_done), "
                    f"got {type(sampler).__name__}")


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        resumable_sampler(self.sampler)  # fail at construction, not at resume time
        self.progress = progress  # () -> batches of the current epoch already trained on

    def state_dict(self) -> dict[str, Any]:
        sampler, _ = resumable_sampler(self.sampler)
        return {"epoch": getattr(sampler, "epoch", 0), "batches_done": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"epoch", "batches_done"} <= set(state):
            raise ValueError(f"dataloader state {state} lacks 'epoch'/'batches_done'")
        sampler, replicas = resumable_sampler(self.sampler)
        sampler.resume_at(state["epoch"], state["batches_done"] * self.batch_size * replicas)
