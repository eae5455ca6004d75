"""PAB: Pyramid Attention Broadcast (Zhao et al. 2024, "Real-time video generation with pyramid attention
broadcast", arXiv 2408.12588), with the schedule of its reference implementations (VideoSys; diffusers
`hooks/pyramid_attention_broadcast.py`, `PyramidAttentionBroadcastHook.new_forward`).

PAB broadcasts (reuses) attention outputs across steps inside a middle range of timesteps, where
attention changes least. MMDiT / HunyuanVideo have no separate spatial / temporal attention, so the
pyramid degenerates to one level, the self-attention of every block (`*.attn` keys: the attention
output BEFORE the adaLN gate, which the backbone multiplies by the current step's gate, as diffusers
does when it hooks the attention module). Wan's cross-attention (`*.cross`) and all MLPs are always
computed (diffusers' cross-attention level is off unless configured; DisCa appendix 6.3: N = 5, 8).

Schedule, as the reference: an ABSOLUTE counter (the step index s, one model call per step) and a
STRICT timestep range. Attention is recomputed when

    s == 0  or  not (low < t < high)  or  s % N == 0,

and reused otherwise. `t_range` is on the sampler's [0, 1] time (t = timestep / 1000); the default
(0.1, 0.8) is diffusers' default `spatial_attention_timestep_skip_range=(100, 800)`.
"""
from __future__ import annotations

from typing import Iterable

from torch import Tensor

from caching.base import CacheHook, positive_int

KEY_SUFFIX = ".attn"


class PAB(CacheHook):
    name = "pab"

    def __init__(self, num_steps: int, interval: int = 5, t_range: tuple[float, float] = (0.1, 0.8), *,
                 count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        if len(t_range) != 2 or not 0.0 <= float(t_range[0]) <= float(t_range[1]) <= 1.0:
            raise ValueError(f"t_range must be (low, high) with 0 <= low <= high <= 1, got {tuple(t_range)}")
        self.t_range = (float(t_range[0]), float(t_range[1]))
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.cache: dict[str, Tensor] = {}
        self.full = True

    def plan(self, step: int, t: float) -> None:
        inside = self.t_range[0] < t < self.t_range[1]
        self.full = step == 0 or not inside or step % self.interval == 0

    def lookup(self, key: str) -> Tensor | None:
        if self.full or not key.endswith(KEY_SUFFIX):
            return None
        if key not in self.cache:
            raise KeyError(f"PAB: no cached attention for {key!r}")
        return self.cache[key]

    def store(self, key: str, value: Tensor) -> None:
        if key.endswith(KEY_SUFFIX):
            self.cache[key] = value

    def held(self) -> Iterable[Tensor]:
        return self.cache.values()
