"""A DataLoader that Lightning can resume mid-epoch with nothing lost or repeated.

Lightning saves `state_dict()` of every training loader that implements it and calls
`load_state_dict()` on resume (lightning/pytorch/loops/fit_loop.py). The state is the sampler's
epoch and how many batches of that epoch the trainer has *processed*, read from the trainer's own
progress counter rather than counted here: Lightning prefetches one batch ahead, so the number of
batches this loader has yielded is one more than the number trained on.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> batches of the current epoch already trained on
        self._resume: dict | None = None

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"epoch", "batches_done"} <= set(state):
            raise ValueError(f"dataloader state {state} lacks 'epoch'/'batches_done'")
        self._resume = dict(state)

    def __iter__(self) -> Iterator:
        skip = 0
        if self._resume is not None and self._resume["epoch"] == self.epoch:
            skip = self._resume["batches_done"]
        self._resume = None
        it = super().__iter__()
        for _ in range(skip):  # indices only would be cheaper, but batches are mmap reads: cheap
            next(it)
        return it
