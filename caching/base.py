"""The shared machinery of the training-free caches: one `FeatureHook` base class that does all the
accounting (block units computed vs reused, per-key FLOPs, bytes held), and the cost report.

How a cache plugs into a backbone (models/protocol.py): the sampler calls `begin_step(step, t)`
once per model call (with CFG, cond + uncond run batched in that one call), and the backbone
routes every cacheable output through `delta(key, fn)`. The keys nest: `blocks` (the whole stack's
residual) contains `double{i}.attn|cross|mlp` and `single_blocks`, which contains
`single{j}.attn|mlp` (block outputs before the adaLN gate; the backbone applies the current step's
gate to whatever `delta` returns). A method
only decides, per key, whether to compute (`lookup` returns None, then `store` sees the result) or
to return a stored / forecast tensor instead.

Accounting units. A *block unit* is one leaf output (one block's attention or its MLP).
The key tree is learned from the first (always full) call, so a reused composite key (e.g.
`blocks`) counts all the units under it as reused. For a run,

    nfe = (NFE per full call: 2 with batched CFG, else 1) * sum_calls computed_units / units_per_call

and the theoretical FLOPs are `calls * full_call_flops - sum of the FLOPs of every reused key`,
with each key's FLOPs counted once (torch.utils.flop_counter on its `fn` in the first call).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from models.protocol import PLAIN, FeatureHook, observes


# --- FLOPs and bytes -------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts PyTorch's CPU fused attention kernel
    (`_scaled_dot_product_flash_attention_for_cpu`, missing from torch's FLOP registry), so CPU and
    GPU runs report the same theoretical FLOPs. Nested counters each see the ops inside them."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops})


def model_fingerprint(model: torch.nn.Module, samples: int = 256) -> str:
    """A short id of a model's config and weights, to tie a calibration file to the model it was fitted
    on: sha256 over the config and every parameter and buffer's name, shape, dtype and the exact bytes of
    up to `samples` evenly spaced elements. Cheap (no full copy), device-independent (exact values, no
    float sums), and changed by any retraining; the same export loaded twice gives the same id."""
    digest = hashlib.sha256(json.dumps(getattr(model, "config", None), sort_keys=True, default=str).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(samples, flat.numel()), device=flat.device).long()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[idx].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """sum(numel * element_size) over distinct tensor objects."""
    seen: dict[int, Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


BLOCK_OUTPUTS = (".attn", ".cross", ".mlp")


def is_block_update(key: str) -> bool:
    """True for the per-block module outputs (`double{i}.attn`, `double{i}.cross`, `single{j}.mlp`, ...):
    the attention / MLP outputs before the adaLN gate (models/protocol.py)."""
    return key.endswith(BLOCK_OUTPUTS)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def interval_due(step: int, last_full: int | None, interval: int) -> bool:
    """The fixed-interval schedule of Delta-DiT and TaylorSeer: compute when nothing is cached yet or
    `interval` steps have passed since the last full computation."""
    return last_full is None or step - last_full >= interval


# --- the base hook -----------------------------------------------------------------------------------
@dataclass
class CallRecord:
    """What happened in one model call."""

    step: int
    t: float
    computed_units: int = 0
    reused: list[str] = field(default_factory=list)  # keys served from the cache in this call


class CacheHook(FeatureHook):
    """Base class of every training-free cache. Subclasses implement the policy only:

    `plan(step, t)`   decide what this step computes (called at `begin_step`);
    `lookup(key)`     a tensor to use instead of computing `key`, or None to compute;
    `store(key, v)`   see a computed value (keep it if the method caches that key);
    `held()`          the tensors currently held (for `cache_bytes`);
    `clear()`         drop all cached state.

    `begin_step(0, t)` starts a new sampling run: state and statistics are reset. Set
    `count_flops=False` when timing: counting runs the first call of each run under a FLOP counter.
    """

    name: ClassVar[str] = ""

    def __init__(self, num_steps: int, *, count_flops: bool = True):
        self.num_steps = positive_int("num_steps", num_steps)
        self.count_flops = bool(count_flops)
        self.reset()

    # --- policy interface (overridden by the methods) ---------------------------------------------
    def plan(self, step: int, t: float) -> None:
        """Decide this step's schedule."""

    def lookup(self, key: str) -> Tensor | None:
        return None

    def store(self, key: str, value: Tensor) -> None:
        """Keep a computed value if the method caches `key`."""

    def held(self) -> Iterable[Tensor]:
        return ()

    def clear(self) -> None:
        """Drop every cached tensor and the schedule state."""

    # --- FeatureHook ------------------------------------------------------------------------------
    def reset(self) -> None:
        self.records: list[CallRecord] = []
        self.children: dict[str, list[str]] = {}  # key -> child keys, learned from the calls
        self.roots: list[str] = []  # keys called outside any other key
        self.key_flops: dict[str, int] = {}
        self.peak_bytes = 0
        self._stack: list[str] = []
        self.clear()

    def begin_step(self, step: int, t: float) -> None:
        step = int(step)
        if step == 0:
            self.reset()
        elif not self.records or step <= self.records[-1].step:
            last = self.records[-1].step if self.records else None
            raise ValueError(f"{type(self).__name__}: step {step} after step {last}; a sampling run must start at "
                             "step 0 and steps must increase")
        if step >= self.num_steps:
            raise ValueError(f"{type(self).__name__} was built for num_steps={self.num_steps} but the sampler is at "
                             f"step {step}: build it with num_steps = len(grid) - 1")
        self.records.append(CallRecord(step, float(t)))
        self.plan(step, float(t))

    def delta(self, key: str, fn: Callable[[], Tensor]) -> Tensor:
        if not self.records:
            raise RuntimeError(f"{type(self).__name__}.delta({key!r}) before begin_step: run the model through "
                               "sampling.sampler.ModelVelocity (it calls begin_step each step)")
        parent = self.children.setdefault(self._stack[-1], []) if self._stack else self.roots
        if key not in parent:
            parent.append(key)
        record = self.records[-1]
        cached = self.lookup(key)
        if cached is not None:
            record.reused.append(key)
            return cached
        self._stack.append(key)
        try:
            if self.count_flops and key not in self.key_flops:
                with flop_counter() as counter:
                    out = fn()
                self.key_flops[key] = counter.get_total_flops()
            else:
                out = fn()
        finally:
            self._stack.pop()
        if key not in self.children:  # a leaf: one block unit
            record.computed_units += 1
        self.store(key, out)
        self.track_peak()
        return out

    # --- accounting -------------------------------------------------------------------------------
    def track_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        """Bytes of the tensors held right now (`peak_bytes` is the maximum over the run)."""
        return tensor_bytes(self.held())

    def units(self, key: str) -> int:
        """Block units (leaf outputs) under `key`."""
        kids = self.children.get(key)
        return 1 if not kids else sum(self.units(k) for k in kids)

    @property
    def units_per_call(self) -> int:
        return sum(self.units(k) for k in self.roots)

    @property
    def nfe_fraction(self) -> float:
        """Computed block units / all block units, over the calls of this run."""
        if not self.records or not self.units_per_call:
            return 0.0
        return sum(r.computed_units for r in self.records) / (len(self.records) * self.units_per_call)

    @property
    def full_steps(self) -> list[int]:
        """Steps on which nothing was reused."""
        return [r.step for r in self.records if not r.reused]

    def reused_flops(self) -> int:
        """FLOPs not spent because of the cache, summed over the run (needs count_flops)."""
        if not self.count_flops:
            raise ValueError(f"{type(self).__name__} was built with count_flops=False: no FLOPs were counted")
        return sum(self.key_flops[k] for r in self.records for k in r.reused)

    def stack_flops(self) -> int:
        """FLOPs of one full call's block stack (every root key)."""
        if not self.count_flops:
            raise ValueError(f"{type(self).__name__} was built with count_flops=False: no FLOPs were counted")
        return sum(self.key_flops[k] for k in self.roots)


class NoCache(CacheHook):
    """Computes everything: the reference sampler (and the fewer-steps baseline) with the same
    accounting as the caches."""

    name = "none"


# --- cost of a run ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheCost:
    method: str
    steps: int  # model calls (sampling steps)
    nominal_nfe: float  # NFE if every call were full (2 per step with batched CFG)
    nfe: float  # effective NFE: nominal_nfe * computed block units / all block units
    full_steps: tuple[int, ...]  # steps with no reuse
    cache_bytes_peak: int
    flops: float | None = None  # theoretical FLOPs of the run (None without call_flops)
    flops_uncached: float | None = None  # the same steps without any reuse

    @property
    def flops_fraction(self) -> float | None:
        return None if self.flops is None else self.flops / self.flops_uncached


def nfe_per_call(velocity) -> float:
    """NFE of one full call of a `ModelVelocity`, as it counts them (2 for batched CFG)."""
    return 2.0 if getattr(velocity, "mode", "plain") == "cfg" else 1.0


class _ObservingPlain(FeatureHook):
    """Computes everything, caches nothing, and lets the backbone compute its observed signals."""

    def observe(self, key: str, value: Tensor) -> None:
        pass


def measure_call_flops(velocity, x: Tensor, t: Tensor, r: Tensor) -> int:
    """Theoretical FLOPs of one full, uncached call of `velocity` (a `ModelVelocity`) at (x, t, r):
    the hook is swapped for the plain one during the measurement and the NFE count restored. A cache
    that observes signals (TeaCache) gets a plain hook that observes too: backbones compute the signals
    only for hooks that use them, and every step of such a cache pays for them."""
    hook, nfe = velocity.hook, velocity.nfe
    velocity.hook = _ObservingPlain() if observes(hook) else PLAIN
    try:
        with torch.no_grad(), flop_counter() as counter:
            velocity(x, t, r, 0)
    finally:
        velocity.hook, velocity.nfe = hook, nfe
    return counter.get_total_flops()


def cache_cost(hook: CacheHook, velocity, call_flops: int | None = None) -> CacheCost:
    """The cost of the run `hook` just served through `velocity`. `call_flops` (from
    `measure_call_flops`) adds theoretical FLOPs: calls * call_flops - FLOPs of every reused key."""
    if not hook.records:
        raise ValueError("the hook has served no sampling run yet")
    per_call = nfe_per_call(velocity)
    steps = len(hook.records)
    flops = uncached = None
    if call_flops is not None:
        uncached = float(call_flops) * steps
        flops = uncached - hook.reused_flops()
    return CacheCost(hook.name, steps, per_call * steps, per_call * steps * hook.nfe_fraction,
                     tuple(hook.full_steps), hook.peak_bytes, flops, uncached)
