"""DisCa cached sampling (paper §3.3 "Inference Process", Eqs. 4-5; appendix 6.3).

A schedule is the sorted list of step indices that run the full DiT; each full step refreshes the
cache C (the final hidden state, ONE tensor), and every other step asks the predictor
P(C, x_t, r, t, c). With a MeanFlow model the steps are contiguous intervals [r_i, t_i] of the
sampler's grid, and the update is x_r = x_t - (t - r) u (sampling/sampler.py).

Schedules for 20 steps. The official DisCa HunyuanVideo 1.0 code runs the full model at
[0, 1, 2, 5, 9, 13, 17, 19] (8 full / 12 predicted, the paper's N = 4). The paper gives only counts
for N = 2 (13 / 7) and N = 3 (11 / 9) (appendix 6.3). One rule reproduces all three:

    full(s) = s < warmup  or  s == num_steps - 1  or  (s - 1) % N == 0

i.e. a warm-up of full steps, then a full step every N steps counted from step 1 (the phase of the
official list), and always the last step. N = 4 with warm-up 3 gives exactly the official list;
N = 3 and N = 2 with warm-up 6 give 11 and 13 full steps (`PAPER_WARMUP`; derived, not published).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from models.protocol import TextCond

OFFICIAL_HUNYUAN_SCHEDULE = (0, 1, 2, 5, 9, 13, 17, 19)
OFFICIAL_HUNYUAN_SCHEDULE_10 = (0, 1, 2, 5, 9, 11, 13, 15, 17, 19)  # the official single-GPU script: 10 of 20
PAPER_WARMUP = {2: 6, 3: 6, 4: 3}  # N -> warm-up reproducing the paper's counts for 20 steps
PAPER_FULL_COUNTS = {2: 13, 3: 11, 4: 8}  # appendix 6.3: 13 / 11 / 8 DiT steps of 20


def schedule_from_interval(num_steps: int, interval: int, warmup: int) -> list[int]:
    """Full-model steps: the first `warmup`, every `interval`-th from step 1, and the last step."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if interval < 1:
        raise ValueError(f"cache interval N must be >= 1, got {interval}")
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (step 0 has no cache yet), got {warmup}")
    return [s for s in range(num_steps) if s < warmup or s == num_steps - 1 or (s - 1) % interval == 0]


def paper_schedule(interval: int, num_steps: int = 20) -> list[int]:
    """The schedule for the paper's DisCa(N) rows (N in 2, 3, 4) with the warm-up of `PAPER_WARMUP`."""
    if interval not in PAPER_WARMUP:
        raise ValueError(f"the paper reports N in {sorted(PAPER_WARMUP)}, got N={interval}; "
                         "use schedule_from_interval(num_steps, N, warmup)")
    return schedule_from_interval(num_steps, interval, PAPER_WARMUP[interval])


SCHEDULE_PRESETS: dict[str, list[int]] = {
    "official_hunyuan": list(OFFICIAL_HUNYUAN_SCHEDULE),
    "official_hunyuan_10": list(OFFICIAL_HUNYUAN_SCHEDULE_10),
    "disca_n2": paper_schedule(2),
    "disca_n3": paper_schedule(3),
    "disca_n4": paper_schedule(4),
}


def check_schedule(schedule: Sequence[int], num_steps: int | None = None) -> list[int]:
    """Validate a schedule: distinct ascending ints, starting at step 0 (the cache must exist first)."""
    steps = [int(s) for s in schedule]
    if not steps or steps[0] != 0:
        raise ValueError(f"a cache schedule must start with full step 0, got {steps}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"a cache schedule must be strictly ascending, got {steps}")
    if num_steps is not None and steps[-1] >= num_steps:
        raise ValueError(f"schedule step {steps[-1]} is out of range for {num_steps} sampling steps")
    return steps


class CachedVelocity:
    """Sampler velocity (sampling.sampler.Velocity) that runs the full model on scheduled steps and the
    predictor elsewhere.

    mode 'meanflow' passes r (stage-2 models, the DisCa setting); 'plain' passes r = None (an
    instantaneous-velocity model). `guidance` is the distilled CFG scale (None for models without a
    guidance input). `nfe` counts full-model calls, `predictor_calls` the predictor's. Exactly one
    cache tensor is held at a time (`cache`, `cache_bytes()`).
    """

    MODES = ("meanflow", "plain")

    def __init__(self, model: nn.Module, predictor: nn.Module, text: TextCond, schedule: Sequence[int], *,
                 guidance: float | None = None, mode: str = "meanflow", num_steps: int | None = None):
        if mode not in self.MODES:
            raise ValueError(f"cached velocity mode {mode!r} not in {self.MODES}")
        self.model, self.predictor, self.text, self.mode = model, predictor, text, mode
        self.schedule = check_schedule(schedule, num_steps)
        self._full = set(self.schedule)
        self.guidance = guidance
        self.cache: Tensor | None = None
        self.nfe = 0.0
        self.predictor_calls = 0

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.numel() * self.cache.element_size()

    def __call__(self, x: Tensor, t: Tensor, r: Tensor, step: int) -> Tensor:
        b = x.shape[0]
        tb = t.expand(b).float()
        rb = r.expand(b).float() if self.mode == "meanflow" else None
        g = None if self.guidance is None else torch.full((b,), float(self.guidance), device=x.device)
        if step in self._full:
            out = self.model.run(x, tb, self.text, r=rb, guidance=g, return_hidden=True)
            self.cache = out.hidden.detach()  # replaces the previous cache: one tensor at a time
            self.nfe += 1
            return out.velocity
        if self.cache is None:
            raise ValueError(f"step {step} is a cached step but no full step has filled the cache yet")
        self.predictor_calls += 1
        return self.predictor(self.model, x, tb, rb, self.text, self.cache, g)
