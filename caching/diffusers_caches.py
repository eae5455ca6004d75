"""diffusers' own block-level caches as baselines on the diffusers backbones (the caches users of
diffusers already have):

- 'fbcache': First Block Cache (diffusers `hooks/first_block_cache.py`, from ParaAttention): block 0
  always runs; when its residual changed by less than `threshold` (relative mean absolute change)
  since the last full call, the remaining blocks are skipped and their cached residual is added;
- 'magcache': MagCache (diffusers `hooks/mag_cache.py`; Ma et al. 2025, github.com/Zehong-Ma/MagCache):
  skips the whole stack while the accumulated error predicted from per-step residual magnitude ratios
  stays below `threshold` (at most `max_skip_steps` in a row, never in the first `retention_ratio` of
  the steps). The ratios are model- and schedule-specific: `calibrate_magcache` runs diffusers' own
  calibration pass (`MagCacheConfig(calibrate=True)`: one uncached sampling run) and returns them.

Both hook diffusers' transformer BLOCKS (`TransformerBlockRegistry`), so the backbone runs diffusers'
own forward (`native_forward` of models/hunyuan_video.py and models/wan.py), not the adapter's
re-implemented one, and the built-in MMDiT (no diffusers blocks) is refused. A stage-2 (MeanFlow)
model's r input is not a diffusers input either, so these caches serve the teacher (CFG) and the
CFG-distilled samplers.

Usage (the same sampler as every other method): `cache = DiffusersCache(backbone, 'fbcache', num_steps,
threshold=0.05)`, `ModelVelocity(cache, text, mode=..., hook=cache)`: the object is both the velocity's
model (its `run` calls `native_forward`) and its hook (`begin_step` enables a fresh cache at step 0).
It reports `nfe_fraction` (diffusers blocks that ran / all blocks, per call) and `peak_bytes` (the
tensors held in the hooks' states) like the project's caches (caching/base.py).
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import torch
from torch import Tensor, nn

from caching.base import positive_int, tensor_bytes
from models.protocol import BackboneOutput, FeatureHook, TextCond

DIFFUSERS_CACHES = ("fbcache", "magcache")
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")  # HunyuanVideo, Wan


def check_diffusers_backbone(backbone: nn.Module, method: str) -> None:
    """A clear error unless `backbone` is a diffusers adapter whose own diffusers forward can run."""
    if not callable(getattr(backbone, "native_forward", None)) or not isinstance(getattr(backbone, "model", None),
                                                                                  nn.Module):
        kind = (getattr(backbone, "config", None) or {}).get("type", type(backbone).__name__)
        raise ValueError(f"cache {method!r} is one of diffusers' block hooks ({DIFFUSERS_CACHES}): it needs a "
                         f"diffusers backbone (hunyuan_video or wan), got {kind!r}; the built-in MMDiT has no "
                         "diffusers blocks")
    if getattr(backbone, "r_embed", None):
        raise ValueError(f"cache {method!r} runs diffusers' own forward, which has no r input: the model has an r "
                         "embedding (a stage-2 MeanFlow model); use it with the teacher or CFG-distilled model")


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [blk for name in BLOCK_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)
            for blk in getattr(model, name)]


class DiffusersCache(FeatureHook):
    """One of diffusers' block caches on a diffusers backbone, as sampler model + hook (module docstring)."""

    def __init__(self, backbone: nn.Module, method: str, num_steps: int, *, threshold: float | None = None,
                 max_skip_steps: int = 3, retention_ratio: float = 0.2, mag_ratios: Sequence[float] | None = None,
                 calibrate: bool = False):
        if method not in DIFFUSERS_CACHES:
            raise ValueError(f"unknown diffusers cache {method!r}; known: {DIFFUSERS_CACHES}")
        check_diffusers_backbone(backbone, method)
        self.backbone, self.method = backbone, method
        self.num_steps = positive_int("num_steps", num_steps)
        from diffusers import FirstBlockCacheConfig, MagCacheConfig

        if method == "fbcache":
            if mag_ratios is not None or calibrate:
                raise ValueError("fbcache takes no mag_ratios / calibrate (MagCache options)")
            self.config = FirstBlockCacheConfig(threshold=0.05 if threshold is None else float(threshold))
        else:
            if calibrate == (mag_ratios is not None):
                raise ValueError("magcache needs exactly one of mag_ratios=[...] (from calibrate_magcache) or "
                                 "calibrate=True (the calibration pass)")
            if mag_ratios is not None and len(mag_ratios) != self.num_steps:
                raise ValueError(f"magcache: {len(mag_ratios)} mag_ratios were calibrated for another step count; "
                                 f"this run has num_steps={self.num_steps}: calibrate for it")
            self.config = MagCacheConfig(threshold=0.06 if threshold is None else float(threshold),
                                         max_skip_steps=positive_int("max_skip_steps", max_skip_steps),
                                         retention_ratio=float(retention_ratio), num_inference_steps=self.num_steps,
                                         mag_ratios=None if mag_ratios is None else [float(m) for m in mag_ratios],
                                         calibrate=bool(calibrate))
        self.blocks = _blocks(backbone.model)
        self._probes: list = []
        self.calls: list[int] = []  # diffusers blocks that ran, per call
        self.steps: list[int] = []
        self.peak_bytes = 0
        self.calibration_ratios: list[float] = []
        self._ratios_ref: list[float] | None = None

    # --- enabling (fresh state per sampling run) ---------------------------------------------------
    def _enable(self) -> None:
        self._disable()
        self.backbone.model.enable_cache(self.config)
        # a block ran iff its first child did: count it (only while the cache is on, so the adapter's own
        # re-implemented forward, which calls the same children, is never counted)
        self._probes = [next(blk.children()).register_forward_pre_hook(lambda *_: self._count()) for blk in self.blocks]

    def _disable(self) -> None:
        for probe in self._probes:
            probe.remove()
        self._probes = []
        if getattr(self.backbone.model, "is_cache_enabled", False):
            self.backbone.model.disable_cache()

    def _count(self) -> None:
        self.calls[-1] += 1

    def begin_step(self, step: int, t: float) -> None:
        step = int(step)
        if step == 0:
            self.calls, self.steps, self.peak_bytes, self._ratios_ref = [], [], 0, None
            self._enable()
        elif not self.steps or step != self.steps[-1] + 1:
            raise ValueError(f"DiffusersCache({self.method}): step {step} after {self.steps[-1:]}; a sampling run "
                             "starts at step 0 and runs every step in order")
        if step >= self.num_steps:
            raise ValueError(f"DiffusersCache was built for num_steps={self.num_steps} but the sampler is at "
                             f"step {step}")
        self.steps.append(step)

    # --- the sampler's model -----------------------------------------------------------------------
    def run(self, x: Tensor, t: Tensor, text: TextCond, r: Tensor | None = None, guidance: Tensor | None = None,
            **_) -> BackboneOutput:
        if not self.steps:
            raise RuntimeError("DiffusersCache.run before begin_step: sample through sampling.sampler.ModelVelocity "
                               "with hook=<this object>")
        if r is not None and not torch.equal(r, t):
            raise ValueError("diffusers' block caches run models without an r input (got r != t)")
        self.calls.append(0)
        quiet = io.StringIO()  # MagCache's calibration prints its ratios; they are returned instead
        with torch.no_grad(), self.backbone.model.cache_context("sample"), contextlib.redirect_stdout(quiet):
            out = self.backbone.native_forward(x, t, text, guidance)
            self._grab_ratios()
        self.peak_bytes = max(self.peak_bytes, tensor_bytes(self.held()))
        if self.steps[-1] == self.num_steps - 1:
            if self._ratios_ref is not None:
                self.calibration_ratios = [float(v) for v in self._ratios_ref]
            self._disable()
        return BackboneOutput(out)

    def _states(self):
        for module in self.backbone.model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in (registry.hooks.values() if registry is not None else ()):
                for attr in vars(hook).values():
                    yield from getattr(attr, "_state_cache", {}).values()

    def _grab_ratios(self) -> None:
        """Keep a reference to MagCache's calibration list: diffusers replaces it with a new empty list after
        the last step (`MagCacheBlockHook._advance_step`), after printing it."""
        if self.method == "magcache" and self.config.calibrate and self._ratios_ref is None:
            for state in self._states():
                if isinstance(getattr(state, "calibration_ratios", None), list):
                    self._ratios_ref = state.calibration_ratios

    def held(self) -> list[Tensor]:
        """The tensors held in the cache hooks' states right now."""
        out = []
        for state in self._states():
            for value in vars(state).values():
                items = value if isinstance(value, (tuple, list)) else (value,)
                out += [v for v in items if isinstance(v, Tensor)]
        return out

    def cache_bytes(self) -> int:
        return tensor_bytes(self.held())

    # --- accounting, as caching.base.CacheHook -----------------------------------------------------
    @property
    def nfe_fraction(self) -> float:
        """diffusers blocks that ran / all blocks, over the calls of the last run."""
        return sum(self.calls) / (len(self.calls) * len(self.blocks)) if self.calls else 0.0

    @property
    def full_steps(self) -> list[int]:
        """Steps on which every block ran."""
        return [s for s, n in zip(self.steps, self.calls) if n == len(self.blocks)]


def calibrate_magcache(backbone: nn.Module, text: TextCond, noise: Tensor, grid: Tensor, *, mode: str = "plain",
                       cfg_scale: float | None = None, null_text: TextCond | None = None,
                       guidance: float | None = None) -> list[float]:
    """MagCache's per-step magnitude ratios for this model, sampler and time grid: diffusers' calibration
    pass (`MagCacheConfig(calibrate=True)`, no step skipped) over one sampling run from `noise`."""
    from sampling.sampler import ModelVelocity, sample

    cache = DiffusersCache(backbone, "magcache", len(grid) - 1, calibrate=True)
    sample(ModelVelocity(cache, text, mode=mode, cfg_scale=cfg_scale, null_text=null_text, guidance=guidance,
                         hook=cache), noise, grid)
    if len(cache.calibration_ratios) != cache.num_steps:
        raise RuntimeError(f"MagCache calibration returned {len(cache.calibration_ratios)} ratios for "
                           f"{cache.num_steps} steps (diffusers' MagCache state changed?)")
    return cache.calibration_ratios
