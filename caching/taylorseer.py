"""TaylorSeer: "From reusing to forecasting: accelerating diffusion models with TaylorSeers" (Liu et al.
2025, arXiv 2503.06923); DisCa paper section 3.1.

Per block output (every `double{i}.attn|cross|mlp`, `single{j}.attn|mlp`: the attention / MLP output
BEFORE the adaLN gate; the backbone multiplies the forecast by the CURRENT step's gate, as the
official TaylorSeer-HunyuanVideo code (github.com/ywlq/TaylorSeer, `TaylorSeer-HunyuanVideo/hyvideo/
modules/models.py`) and diffusers' `hooks/taylorseer_cache.py` do) the cache holds the feature and
its finite-difference derivatives up to `order`, refreshed at each full step. On a cached step k
steps after the last full step s the feature is forecast (DisCa eq. in section 3.1):

    F_pred,m(x_{t-k}) = F(x_t) + sum_{i=1..m} Delta^i F(x_t) / (i! N^i) * (-k)^i.

Time unit = the step index. The paper's x_t runs in timestep direction (t decreases as sampling
proceeds), so its differences are taken towards the earlier, noisier full step:
Delta F(x_t) = F(x_{t+N}) - F(x_t), and Delta^i F / N^i * (-1)^i equals the i-th backward divided
difference along the step index, D_i = (D_{i-1}(s) - D_{i-1}(s - N)) / N with D_0 = F. We store D_i,
so the forecast is F + sum_i D_i k^i / i!. As in TaylorSeer's reference code, D_i is recomputed at
each full step from the previous full step's D_{i-1}, divided by the actual distance between the
two full steps (= N after warm-up); the first `warmup` steps are always full (appendix 6.3: 3).

Schedules (`schedule`):
- 'reference' (default), the official code (`hyvideo/modules/cache_functions/cal_type.py`): the
  first `warmup` steps, then a full step whenever N steps have passed since the last one;
- 'diffusers', diffusers' `TaylorSeerCacheHook._measure_should_compute`: the first `warmup` steps
  (`disable_cache_before_step`), then the steps s with (s - warmup - 1) % N == 0. The two agree for
  N <= 2; this option lets the project's cache be compared with diffusers' hook at any N.

Note: D_i is the exact i-th derivative of a degree-i polynomial feature, so order 1 forecasts a
linear-in-step feature exactly; on a quadratic, order 2 gets the curvature exactly but D_1 is the
slope at the midpoint s - N/2, leaving an error of -a N k for F = a s^2 (this is the paper's formula;
a Newton backward-difference forecast would be exact).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from torch import Tensor

from caching.base import CacheHook, interval_due, is_block_update, positive_int


def update_taylor_factors(previous: Sequence[Tensor] | None, feature: Tensor, distance: int | None,
                          order: int) -> list[Tensor]:
    """[F, D_1, ..., D_m] at a new full step: D_i = (D_{i-1} - previous D_{i-1}) / distance, for as many
    orders (<= `order`) as the previous full step provides."""
    factors = [feature]
    if previous is None or not distance:
        return factors
    for i in range(min(order, len(previous))):
        factors.append((factors[i] - previous[i]) / distance)
    return factors


def taylor_forecast(factors: Sequence[Tensor], k: float) -> Tensor:
    """F + sum_i D_i k^i / i!: the feature k steps after the full step the factors were taken at."""
    out = factors[0]
    for i in range(1, len(factors)):
        out = out + factors[i] * (k ** i / math.factorial(i))
    return out


SCHEDULES = ("reference", "diffusers")


class TaylorSeer(CacheHook):
    name = "taylorseer"

    def __init__(self, num_steps: int, interval: int = 3, order: int = 1, warmup: int = 3,
                 schedule: str = "reference", *, count_flops: bool = True):
        self.interval = positive_int("interval", interval)
        self.order = positive_int("order", order)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (always-full first steps), got {warmup!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"TaylorSeer schedule {schedule!r} not in {SCHEDULES}")
        self.warmup = warmup
        self.schedule = schedule
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.factors: dict[str, list[Tensor]] = {}
        self.last_full: int | None = None
        self.distance: int | None = None
        self.full = True
        self.k = 0

    def plan(self, step: int, t: float) -> None:
        if self.schedule == "reference":
            due = interval_due(step, self.last_full, self.interval)
        else:
            due = self.last_full is None or (step - self.warmup - 1) % self.interval == 0
        self.full = step < self.warmup or due
        if self.full:
            self.distance = None if self.last_full is None else step - self.last_full
            self.last_full = step
        self.k = step - self.last_full

    def lookup(self, key: str) -> Tensor | None:
        if self.full or not is_block_update(key):
            return None
        if key not in self.factors:
            raise KeyError(f"TaylorSeer: no cached factors for {key!r}")
        return taylor_forecast(self.factors[key], self.k)

    def store(self, key: str, value: Tensor) -> None:
        if is_block_update(key):
            self.factors[key] = update_taylor_factors(self.factors.get(key), value, self.distance, self.order)

    def held(self) -> Iterable[Tensor]:
        return [t for factors in self.factors.values() for t in factors]
