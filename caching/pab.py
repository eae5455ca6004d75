"""PAB: Pyramid Attention Broadcast (Zhao et al. 2024, "Real-time video generation with pyramid attention
broadcast", arXiv 2408.12588), in the MMDiT form of DisCa's appendix 6.3.

PAB broadcasts (reuses) attention outputs across steps inside a middle range of timesteps, where
attention changes least. MMDiT has no separate spatial / temporal / cross attention, so the
pyramid degenerates to one interval for all attention: inside `t_range` (sampler time, 1 = noise)
the attention updates are recomputed every `interval` steps and reused in between; outside it they
are always recomputed. MLPs are always computed (appendix: N = 5 and 8).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from caching.base import CacheHook, interval_due, positive_int


class PAB(CacheHook):
    name = "pab"

    def __init__(self, num_steps: int, interval: int = 5, t_range: tuple[float, float] = (0.1, 0.9), *,
                 count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        if len(t_range) != 2 or not 0.0 <= float(t_range[0]) <= float(t_range[1]) <= 1.0:
            raise ValueError(f"t_range must be (low, high) with 0 <= low <= high <= 1, got {tuple(t_range)}")
        self.t_range = (float(t_range[0]), float(t_range[1]))
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.cache: dict[str, Tensor] = {}
        self.last_full: int | None = None
        self.full = True

    def plan(self, step: int, t: float) -> None:
        inside = self.t_range[0] <= t <= self.t_range[1]
        self.full = not inside or interval_due(step, self.last_full, self.interval)
        if self.full:
            self.last_full = step

    def lookup(self, key: str) -> Tensor | None:
        if self.full or not key.endswith(".attn"):
            return None
        if key not in self.cache:
            raise KeyError(f"PAB: no cached attention for {key!r}")
        return self.cache[key]

    def store(self, key: str, value: Tensor) -> None:
        if key.endswith(".attn"):
            self.cache[key] = value

    def held(self) -> Iterable[Tensor]:
        return self.cache.values()
