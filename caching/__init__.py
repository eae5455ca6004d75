"""Training-free caching baselines on the one sampler API (SPEC §5; DisCa appendix 6.3).

    from caching import make_cache, cache_cost, measure_call_flops
    from sampling.sampler import ModelVelocity, sample, time_grid

    hook = make_cache("fora", num_steps=20, interval=3)
    velocity = ModelVelocity(model, text, mode="cfg", cfg_scale=5.0, null_text=null, hook=hook)
    video = sample(velocity, noise, time_grid(20, shift))
    call_flops = measure_call_flops(velocity, noise, grid[0], grid[1])  # one full call, uncached
    cost = cache_cost(hook, velocity, call_flops)  # NFE, FLOPs, full steps, peak cache bytes

Methods (`CACHE_METHODS`): 'none' (reference), 'fora', 'delta_dit', 'pab', 'teacache',
'taylorseer'. They work in every ModelVelocity mode: with CFG the cond and uncond halves run in
one batched call, so one cache entry serves both (and counts 2 NFE per full call).

diffusers' own block caches (First Block Cache, MagCache with its calibration pass) are baselines for the
diffusers backbones only: caching/diffusers_caches.py (`DiffusersCache`, `calibrate_magcache`).

The fewer-steps baseline is not a cache: sample with `make_cache("none", num_steps=k)` on
`time_grid(k, shift)` (e.g. the 50-step original at 10 steps is 5x fewer NFE); its `cache_cost`
then reports NFE and FLOPs on the same scale as the caches.
"""
from __future__ import annotations

import inspect

from caching.base import (CacheCost, CacheHook, NoCache, cache_cost, flop_counter, measure_call_flops,
                          nfe_per_call, tensor_bytes)
from caching.delta_dit import DeltaDiT
from caching.fora import FORA
from caching.pab import PAB
from caching.taylorseer import TaylorSeer
from caching.teacache import TeaCache

CACHE_METHODS: dict[str, type[CacheHook]] = {cls.name: cls for cls in (NoCache, FORA, DeltaDiT, PAB, TeaCache,
                                                                       TaylorSeer)}


def make_cache(name: str, **kwargs) -> CacheHook:
    """Build a cache by registry name; `num_steps` (the sampler's step count) is always required."""
    if name not in CACHE_METHODS:
        raise ValueError(f"unknown cache method {name!r}; known: {sorted(CACHE_METHODS)}")
    cls = CACHE_METHODS[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"cache method {name!r} has no parameter(s) {unknown}; its parameters: {params}")
    if "num_steps" not in kwargs:
        raise ValueError(f"make_cache({name!r}, ...) needs num_steps (the sampler's number of steps)")
    return cls(**kwargs)


__all__ = ["CACHE_METHODS", "CacheCost", "CacheHook", "DeltaDiT", "FORA", "NoCache", "PAB", "TaylorSeer", "TeaCache",
           "cache_cost", "flop_counter", "make_cache", "measure_call_flops", "nfe_per_call", "tensor_bytes"]
