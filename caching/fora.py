"""FORA: Fast-Forward Caching in Diffusion Transformer Acceleration (Selvaraju et al. 2024,
arXiv 2407.01425), as its reference code does it (github.com/prathebaselva/FORA, `src/models.py`,
`DiTBlock.forward`, mode 'boost_infer_static').

What is cached: on a full step every block's attention and MLP output BEFORE the adaLN gate (the
reference stores `self.attn(...)` / `self.mlp(...)` and adds `gate * cache`); on the steps in
between each block recomputes only its modulation and adds the cached outputs multiplied by the
CURRENT step's gates (models/protocol.py: the backbone applies the gate outside the hook).

Schedule: the reference loops over the timestep index i = num_steps - 1, ..., 0 and computes when
`i == num_steps - 1 or i % N == 0`. In this project's step index s = num_steps - 1 - i that is

    full(s) = s == 0  or  (num_steps - 1 - s) % N == 0,

i.e. the first and the last step always compute and the interval is anchored to the END of
sampling (DisCa appendix 6.3 uses N = 3 and 6).
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from caching.base import CacheHook, is_block_update, positive_int


def fora_full_steps(num_steps: int, interval: int) -> list[int]:
    """The steps FORA's reference computes fully (see the module docstring)."""
    return [s for s in range(num_steps) if s == 0 or (num_steps - 1 - s) % interval == 0]


class FORA(CacheHook):
    name = "fora"

    def __init__(self, num_steps: int, interval: int = 3, *, count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        super().__init__(num_steps, count_flops=count_flops)
        self._full_steps = set(fora_full_steps(self.num_steps, self.interval))

    def clear(self) -> None:
        self.cache: dict[str, Tensor] = {}
        self.full = True

    def plan(self, step: int, t: float) -> None:
        self.full = step in self._full_steps

    def lookup(self, key: str) -> Tensor | None:
        if self.full or not is_block_update(key):
            return None
        if key not in self.cache:
            raise KeyError(f"FORA: no cached output for {key!r} (was it computed on a full step?)")
        return self.cache[key]

    def store(self, key: str, value: Tensor) -> None:
        if is_block_update(key):
            self.cache[key] = value

    def held(self) -> Iterable[Tensor]:
        return self.cache.values()
