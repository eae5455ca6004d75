"""FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al. 2024,
arXiv 2407.01425).

Every `interval` steps the model runs fully and the residual update of every block's attention and
MLP is cached; on the steps in between each block recomputes only its cheap modulation and adds the
cached updates (paper: "reuse attention and MLP outputs for N-1 steps"; DisCa appendix 6.3 uses
N = 3 and 6).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from caching.base import CacheHook, interval_due, is_block_update, positive_int


class FORA(CacheHook):
    name = "fora"

    def __init__(self, num_steps: int, interval: int = 3, *, count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.cache: dict[str, Tensor] = {}
        self.last_full: int | None = None
        self.full = True

    def plan(self, step: int, t: float) -> None:
        self.full = interval_due(step, self.last_full, self.interval)
        if self.full:
            self.last_full = step

    def lookup(self, key: str) -> Tensor | None:
        if self.full or not is_block_update(key):
            return None
        if key not in self.cache:
            raise KeyError(f"FORA: no cached update for {key!r} (was it computed at step {self.last_full}?)")
        return self.cache[key]

    def store(self, key: str, value: Tensor) -> None:
        if is_block_update(key):
            self.cache[key] = value

    def held(self) -> Iterable[Tensor]:
        return self.cache.values()
