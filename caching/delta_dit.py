"""Delta-DiT: a training-free acceleration method tailored for diffusion transformers (Chen et al. 2024,
arXiv 2406.01125), in the MMDiT form of DisCa's appendix 6.3.

Delta-DiT caches the *residual* (the deviation output - input) of a stack of blocks instead of its
output. For HunyuanVideo's MMDiT the DisCa comparison skips all single-stream blocks through that
residual cache: after a full step, the next `interval - 1` steps run the double-stream blocks and
add the cached single-stream residual (appendix: N = 5 and 8). One tensor is held.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from caching.base import CacheHook, interval_due, positive_int

KEY = "single_blocks"


class DeltaDiT(CacheHook):
    name = "delta_dit"

    def __init__(self, num_steps: int, interval: int = 5, *, count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.residual: Tensor | None = None
        self.last_full: int | None = None
        self.full = True

    def plan(self, step: int, t: float) -> None:
        self.full = interval_due(step, self.last_full, self.interval)
        if self.full:
            self.last_full = step
        elif self.residual is None:
            raise ValueError(f"Delta-DiT caches the {KEY!r} residual, but the backbone routed no {KEY!r} update in "
                             "its full steps (a backbone without single-stream blocks?)")

    def lookup(self, key: str) -> Tensor | None:
        return self.residual if key == KEY and not self.full else None

    def store(self, key: str, value: Tensor) -> None:
        if key == KEY:
            self.residual = value

    def held(self) -> Iterable[Tensor]:
        return () if self.residual is None else (self.residual,)
