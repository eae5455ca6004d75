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

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.sampler, "resume_at"):
            raise TypeError(f"ResumableDataLoader needs a sampler with resume_at(epoch, samples_done), "
                            f"got {type(self.sampler).__name__}")
        self.progress = progress  # () -> batches of the current epoch already trained on

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_done": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"epoch", "batches_done"} <= set(state):
            raise ValueError(f"dataloader state {state} lacks 'epoch'/'batches_done'")
        self.sampler.resume_at(state["epoch"], state["batches_done"] * self.batch_size)
