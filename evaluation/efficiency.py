"""Efficiency measurements of one sampling run (SPEC §7): NFE, FLOPs, latency, peak and cache memory.

A run is a zero-argument callable that builds a FRESH velocity (fresh NFE counters and empty
caches), samples one batch from fixed noise and returns `(videos, velocity)`. Each measurement
calls it anew, so warm-up, timing, FLOP counting and memory tracking never share cache state.

- NFE: read from the velocity after a run (`velocity_nfe`): full backbone evaluations (a CFG step
  costs 2) and predictor evaluations, as counted by the velocity/cache objects themselves.
- FLOPs: PyTorch's FLOP formulas (`torch.utils.flop_counter`, as FlopCounterMode counts) summed over
  every op of one whole sampling run (not per call x calls, so skipped blocks and predictor calls
  are counted as executed). They cover matmul/conv/attention ops (the DiT's cost); elementwise ops
  are not counted. PyTorch has no formula for the CPU fused-attention kernel, so `FLOP_FORMULAS`
  adds the one it uses for the CUDA kernels.
- Latency: wall time of whole runs, measured INTERLEAVED with the reference method
  (`interleaved_times`): each round times one run of the method and one of the reference, the order
  alternating between rounds, so both see the same machine load (a busy shared CPU changes speed
  within minutes). The measured speedup is the median of the per-round ratios reference / method, with
  their quartiles and range (`speedup_stats`); a wide spread means the machine was too noisy to
  conclude. `torch.cuda.synchronize()` comes before every clock read on CUDA. FLOPs and memory are
  measured together on one more run, outside the timed ones (the tracking slows it).
- Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over one run (weights, inputs and
  activations). On CPU there is no allocator statistic, so `CostTracker` tracks the bytes of
  tensor storages created during the run that are alive at the same time (exact for tensors, it
  ignores allocator fragmentation and op-internal scratch buffers); the reported peak is that
  plus the bytes of the weights and inputs that existed before the run. RSS was rejected: it
  cannot be reset per run and includes the allocator's cached pages.
- Cache memory: `cache_bytes()` of the velocity's cache objects after a run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper

Run = Callable[[], tuple[Tensor, Any]]  # () -> (videos, velocity)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's FLOP formulas by op (shape-wrapped: they take the op's args and out_val), plus the CPU
# fused-attention kernel, which the registry lacks, with the formula of the CUDA kernels.
FLOP_FORMULAS = {**flop_registry,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: shape_wrapper(_cpu_sdpa_flops)}


@dataclass
class Efficiency:
    """Measured cost of one sampling run of the latency batch (latency: `interleaved_times`)."""

    nfe_dit: float  # backbone calls (CFG counts 2 per step)
    nfe_dit_effective: float  # the same, counting only the computed fraction of a cached call
    nfe_predictor: float  # learned-predictor evaluations (DisCa)
    flops: int  # counted FLOPs of one run
    peak_memory_bytes: int
    cache_bytes: int
    memory_method: str  # 'cuda_max_memory_allocated' | 'tracked_tensor_bytes'

    def as_dict(self) -> dict:
        return asdict(self)


def velocity_nfe(velocity: Any) -> tuple[float, float, float]:
    """(DiT NFE, effective DiT NFE, predictor NFE) from a velocity's counters after a run.

    DiT NFE is the velocity's `nfe` (model calls; a CFG call counts 2). A training-free cache that
    skips part of a call reports the computed fraction of block updates (`hook.nfe_fraction`), so the
    effective NFE is `nfe * nfe_fraction`; without such a hook it equals `nfe`. Predictor NFE is the
    velocity's `predictor_nfe` or `predictor_calls` (DisCa), else 0."""
    if not hasattr(velocity, "nfe"):
        raise ValueError(f"{type(velocity).__name__} has no `nfe` counter; every sampler velocity must count NFE")
    nfe = float(velocity.nfe)
    fraction = getattr(getattr(velocity, "hook", None), "nfe_fraction", None)
    effective = nfe * float(fraction) if fraction is not None else nfe
    predictor = getattr(velocity, "predictor_nfe", getattr(velocity, "predictor_calls", 0.0))
    return nfe, effective, float(predictor)


def velocity_cache_bytes(velocity: Any) -> int:
    """Peak bytes held by the velocity's cache over the run: `peak_bytes` of the velocity or its hook,
    else their current `cache_bytes()`, else 0 (no cache)."""
    for owner in (velocity, getattr(velocity, "hook", None)):
        if owner is None:
            continue
        if hasattr(owner, "peak_bytes"):
            return int(owner.peak_bytes)
        if callable(getattr(owner, "cache_bytes", None)):
            return int(owner.cache_bytes())
    return 0


def module_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of parameters and buffers, each storage counted once (shared modules are not double-counted)."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(run: Run) -> int:
    """FLOPs of one run (matmul-like ops, see module docstring)."""
    with CostTracker(track_memory=False) as tracker:
        run()
    return tracker.flops


def interleaved_times(run: Callable[[], Any], reference: Callable[[], Any], rounds: int, warmup: int = 1, *,
                      sync: Callable[[], None] = lambda: None,
                      clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """(method seconds, reference seconds), one pair per round.

    `warmup` untimed pairs first; then each round times `run` and `reference` back to back, the
    reference first in even rounds and second in odd ones (so neither always follows the other).
    `sync` is called before every clock read (CUDA: `torch.cuda.synchronize`); `clock` is injectable
    so the pairing can be tested on fake timers."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds (timing.repeats) >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    for _ in range(warmup):
        reference()
        run()

    def timed(fn: Callable[[], Any]) -> float:
        sync()
        start = clock()
        fn()
        sync()
        return clock() - start

    method_s, reference_s = [], []
    for k in range(rounds):
        if k % 2 == 0:
            reference_s.append(timed(reference))
            method_s.append(timed(run))
        else:
            method_s.append(timed(run))
            reference_s.append(timed(reference))
    return method_s, reference_s


@dataclass(frozen=True)
class SpeedupStats:
    """Per-round speedups reference / method of interleaved timing: median, quartiles and range."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    ratios: list[float]

    @property
    def relative_iqr(self) -> float:
        """(q3 - q1) / median: the spread that decides whether a measured speedup can be read."""
        return (self.q3 - self.q1) / self.median

    def too_wide(self, max_spread: float) -> bool:
        return self.relative_iqr > max_spread


def speedup_stats(reference_s: list[float], method_s: list[float]) -> SpeedupStats:
    """Median and spread (linear-interpolated quartiles, min, max) of the per-round ratios."""
    if len(reference_s) != len(method_s) or not method_s:
        raise ValueError(f"need one reference time per method time, got {len(reference_s)} and {len(method_s)}")
    if min(method_s) <= 0 or min(reference_s) <= 0:
        raise ValueError(f"timings must be positive, got method {method_s} and reference {reference_s}")
    ratios = np.asarray(reference_s, dtype=np.float64) / np.asarray(method_s, dtype=np.float64)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return SpeedupStats(float(median), float(q1), float(q3), float(ratios.min()), float(ratios.max()),
                        ratios.tolist())


class CostTracker(TorchDispatchMode):
    """Counts FLOPs and (optionally) the peak bytes of tensor storages alive together, for the ops
    run under it.

    FLOPs use PyTorch's own formulas (`torch.utils.flop_counter.flop_registry`, the table behind
    FlopCounterMode; equal counts, tested) looked up directly, which is several times cheaper per op
    than FlopCounterMode's module tracking and decomposition attempts. Memory: when an op creates a
    new storage, the storages whose last reference died are dropped first, then the new ones added
    (views of an existing storage are not counted twice); `peak` is the maximum of the running total.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode wraps __torch_dispatch__ in torch._disable_dynamo unless this is False; the
        # wrapper imports torch._dynamo on first use (seconds), and nothing here is ever compiled.
        return False

    def __init__(self, track_memory: bool = True) -> None:
        super().__init__()
        self.track_memory = track_memory
        self.flops = 0
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        if self.track_memory:
            self._track(out)
        return out

    def _track(self, out) -> None:
        new = {}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                known = self.live.get(ptr)
                if nbytes and (known is None or known[0].expired()):  # not a view / in-place result
                    new[ptr] = (StorageWeakRef(storage), nbytes)
        if not new:  # nothing allocated, so the peak cannot grow here
            return
        for ptr, (ref, nbytes) in list(self.live.items()):  # drop storages freed since the last allocation
            if ref.expired():
                del self.live[ptr]
                self.current -= nbytes
        self.live.update(new)
        self.current += sum(nbytes for _, nbytes in new.values())
        self.peak = max(self.peak, self.current)


def measure_flops_and_memory(run: Run, device: torch.device, resident_bytes: int) -> tuple[int, int, str]:
    """(FLOPs, peak bytes, memory method) of ONE run, counted and tracked together.

    `resident_bytes` (weights + inputs that exist before the run) is added to the CPU tracker's peak;
    CUDA's allocator statistic already includes them."""
    on_cuda = device.type == "cuda"
    if on_cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    with CostTracker(track_memory=not on_cuda) as tracker:
        run()
    if on_cuda:
        _sync(device)
        return tracker.flops, int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return tracker.flops, resident_bytes + tracker.peak, "tracked_tensor_bytes"


def measure(run: Run, device: torch.device, resident_bytes: int) -> Efficiency:
    """NFE, cache size, FLOPs and memory of one method; each measurement calls `run` afresh."""
    _, velocity = run()
    nfe_dit, nfe_eff, nfe_pred = velocity_nfe(velocity)
    cache = velocity_cache_bytes(velocity)
    flops, peak, method = measure_flops_and_memory(run, device, resident_bytes)
    return Efficiency(nfe_dit=nfe_dit, nfe_dit_effective=nfe_eff, nfe_predictor=nfe_pred, flops=flops,
                      peak_memory_bytes=peak, cache_bytes=cache, memory_method=method)


def device_sync(device: torch.device) -> Callable[[], None]:
    """The `sync` of `interleaved_times` for `device`."""
    return lambda: _sync(device)


def speedup(reference: float, value: float) -> float:
    """reference / value (latency or FLOPs): > 1 means faster than the reference."""
    if value <= 0:
        raise ValueError(f"cannot compute a speedup over a non-positive cost {value}")
    return reference / value
