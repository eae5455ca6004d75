"""A DataLoader that Lightning can resume mid-epoch with nothing lost or repeated.

Lightning saves `state_dict()` of every training loader that implements it and calls
`load_state_dict()` on resume (lightning/pytorch/loops/fit_loop.py). The state is the sampler's
epoch and how many batches of that epoch the trainer has *processed*, read from the trainer's own
progress counter rather than counted here: Lightning prefetches one batch ahead, so the number of
batches this loader has yielded is one more than the number trained on.

On resume the first `batches_done` batches of that epoch are drawn and dropped. The skip is lazy
(it runs at the first `next()`): Lightning creates the iterator before it calls `set_epoch`, and only
then is the sampler's order for the resumed epoch known. Working on batches rather than sampler
indices keeps it correct under DDP, where Lightning wraps the sampler in a DistributedSampler.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> batches of the current epoch already trained on
        self._resume: dict[str, int] | None = None

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"epoch", "batches_done"} <= set(state):
            raise ValueError(f"dataloader state {state} lacks 'epoch'/'batches_done'")
        self._resume = {"epoch": int(state["epoch"]), "batches_done": int(state["batches_done"])}

    def __iter__(self) -> Iterator:
        return self._skip_then_yield(super().__iter__())

    def _skip_then_yield(self, batches: Iterator) -> Iterator:
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == self.epoch:
            for _ in range(resume["batches_done"]):
                next(batches)
        yield from batches
