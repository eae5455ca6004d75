"""Attach DisCa (or a training-free cache of `caching/`) to a loaded diffusers pipeline.

    from diffusers import HunyuanVideoPipeline
    from integration.attach import apply_disca

    pipe = HunyuanVideoPipeline.from_pretrained("/models/HunyuanVideo")
    hook = apply_disca(pipe, "outputs/hunyuan_video/predictor_gan/export",
                       transformer_dir="outputs/hunyuan_video/transformer", schedule="official_hunyuan")
    video = pipe(prompt, num_inference_steps=20).frames[0]
    hook.full_steps, hook.predicted_steps     # which steps ran the DiT, which the predictor

It follows diffusers' own cache API: a stateful `ModelHook` registered in the transformer's `HookRegistry`
(diffusers/hooks/hooks.py, as `transformer.enable_cache(...)` does for its caches), whose `new_forward`
replaces the transformer's forward for the pipeline's unchanged denoising loop. The hook reads the step from
the pipeline's scheduler (the timestep's index in `scheduler.timesteps`), so the MeanFlow model gets its
interval (t, r) = (sigma_i, sigma_{i+1}) and the scheduler's Euler update `x + (sigma_{i+1} - sigma_i) v` is
exactly the MeanFlow step x_r = x_t - (t - r) u. At scheduled steps the full transformer runs and its final
hidden state becomes the cache (ONE tensor, replaced each time); at the other steps the predictor runs.
The pipeline's memory grows by the predictor's weights, the added embedders of the export and that tensor.

The hook calls the transformer's submodules directly (through the backbone adapter), so attach it before
`pipe.enable_model_cpu_offload()` (whose hook should then move the whole transformer on entry; not tested here,
there was no GPU); sequential per-layer
offload is not supported.

Guidance: HunyuanVideo's pipeline feeds `guidance_scale * 1000` to the guidance embedder (used as is);
for a CFG-distilled Wan (stage 1 added a guidance embedder the pipeline does not know) give
`apply_disca(..., guidance=5.0)` and call the pipeline with `guidance_scale=1.0` (no real CFG).
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch
from diffusers.hooks import ModelHook
from torch import Tensor, nn

from models.protocol import FeatureHook, TextCond

HOOK_NAME = "disca"
FEATURE_HOOK_NAME = "disca_feature_cache"


def _resolve_schedule(schedule: str | Sequence[int]) -> list[int]:
    from sampling.cached import SCHEDULE_PRESETS, check_schedule

    if isinstance(schedule, str):
        if schedule not in SCHEDULE_PRESETS:
            raise ValueError(f"unknown schedule preset {schedule!r}; presets: {sorted(SCHEDULE_PRESETS)}")
        schedule = SCHEDULE_PRESETS[schedule]
    return check_schedule(schedule)


def _check_scheduler(pipe) -> None:
    """The cached sampler is the Euler / MeanFlow update: the pipeline must step with flow-matching Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = pipe.scheduler
    if not isinstance(sched, FlowMatchEulerDiscreteScheduler) or sched.config.get("stochastic_sampling"):
        raise ValueError(f"the pipeline's scheduler is {type(sched).__name__}; DisCa's MeanFlow steps need "
                         "FlowMatchEulerDiscreteScheduler (deterministic): pipe.scheduler = "
                         "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=...)")


class _PipelineHook(ModelHook):
    """Shared plumbing: diffusers transformer arguments -> the backbone protocol, step from the scheduler."""

    _is_stateful = True

    def __init__(self, backbone: nn.Module, scheduler, *, meanflow: bool, guidance: float | None = None):
        super().__init__()
        self.backbone, self.scheduler, self.meanflow, self.guidance = backbone, scheduler, meanflow, guidance
        self._signature = None
        self.reset_state(None)

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module):
        """Called by diffusers after each pipeline call (`maybe_free_model_hooks`): drop the state that holds
        memory; `calls` (the record of the last call) is kept until the next call starts."""
        self.last_step = None
        if not hasattr(self, "calls"):
            self.calls: list[tuple[int, str]] = []
        return module

    def _step(self, timestep: Tensor) -> int:
        ts = self.scheduler.timesteps
        if ts is None or len(ts) == 0:
            raise RuntimeError("the scheduler has no timesteps yet: the hook runs inside a pipeline call")
        step = int((ts.to(timestep.device).float() - timestep.flatten()[0].float()).abs().argmin())
        if step == 0 and self.last_step != 0:  # a new pipeline call
            self.reset_state(None)
            self.calls = []
        if step == self.last_step:
            raise RuntimeError(f"the transformer was called twice at step {step}: the pipeline runs real CFG "
                               "(cond + uncond); a CFG-distilled DisCa model samples with guidance_scale=1.0 "
                               "(Wan) or without a negative prompt (HunyuanVideo), the scale given to apply_disca")
        self.last_step = step
        return step

    def new_forward(self, module: nn.Module, *args, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        x = a["hidden_states"]
        b, device = x.shape[0], x.device
        step = self._step(a["timestep"])
        sigmas = self.scheduler.sigmas
        t = torch.full((b,), float(sigmas[step]), dtype=torch.float32, device=device)
        r = torch.full((b,), float(sigmas[step + 1]), dtype=torch.float32, device=device) if self.meanflow else None
        tokens = a["encoder_hidden_states"]
        mask = a.get("encoder_attention_mask")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.bool()
        pooled = a.get("pooled_projections")
        pooled = torch.zeros(b, 1, device=device, dtype=tokens.dtype) if pooled is None else pooled
        text = TextCond(tokens, mask, pooled)
        g = None
        if self.backbone.guidance_embed:
            if self.guidance is not None:
                g = torch.full((b,), float(self.guidance), dtype=torch.float32, device=device)
            elif a.get("guidance") is not None:
                g = a["guidance"].float().flatten().expand(b) / 1000.0  # pipelines feed guidance * 1000
            else:
                raise ValueError("this transformer has a guidance embedder: give apply_disca(..., guidance=scale)")
        with torch.no_grad():
            velocity = self.velocity(x, t, r, text, g, step).to(x.dtype)
        return Transformer2DModelOutput(sample=velocity) if a.get("return_dict", True) else (velocity,)

    def velocity(self, x, t, r, text, g, step) -> Tensor:
        raise NotImplementedError


class DisCaHook(_PipelineHook):
    """Full transformer on the scheduled steps (refreshing the one-tensor cache), the predictor elsewhere."""

    def __init__(self, backbone: nn.Module, predictor: nn.Module, schedule: Sequence[int], scheduler, *,
                 guidance: float | None = None):
        self.predictor, self.schedule = predictor, list(schedule)
        super().__init__(backbone, scheduler, meanflow=backbone.r_embed is not None, guidance=guidance)

    def reset_state(self, module):
        self.cache: Tensor | None = None  # freed after each pipeline call
        if not hasattr(self, "max_cache_bytes"):
            self.cache_shape, self.max_cache_bytes = None, 0
        return super().reset_state(module)

    @property
    def full_steps(self) -> list[int]:
        return [s for s, kind in self.calls if kind == "full"]

    @property
    def predicted_steps(self) -> list[int]:
        return [s for s, kind in self.calls if kind == "predicted"]

    def cache_bytes(self) -> int:
        return 0 if self.cache is None else self.cache.numel() * self.cache.element_size()

    def velocity(self, x, t, r, text, g, step) -> Tensor:
        if step == 0 and len(self.scheduler.timesteps) <= self.schedule[-1]:
            raise ValueError(f"schedule {self.schedule} needs at least {self.schedule[-1] + 1} inference steps, the "
                             f"pipeline runs {len(self.scheduler.timesteps)}")
        if step in self.schedule:
            out = self.backbone.run(x, t, text, r=r, guidance=g, return_hidden=True)
            self.cache = out.hidden  # replaces the previous one: one tensor at a time
            self.cache_shape = tuple(self.cache.shape)
            self.max_cache_bytes = max(self.max_cache_bytes, self.cache_bytes())
            self.calls.append((step, "full"))
            return out.velocity
        if self.cache is None:
            raise RuntimeError(f"step {step} is a predicted step but no full step has filled the cache")
        self.calls.append((step, "predicted"))
        return self.predictor(self.backbone, x, t, r, text, self.cache, g)


class FeatureCacheHook(_PipelineHook):
    """A training-free cache (`caching.make_cache(...)`, a FeatureHook) inside the pipeline's transformer."""

    def __init__(self, backbone: nn.Module, cache: FeatureHook, scheduler, *, guidance: float | None = None):
        self.cache = cache
        super().__init__(backbone, scheduler, meanflow=getattr(backbone, "r_embed", None) is not None,
                         guidance=guidance)

    def reset_state(self, module):
        if hasattr(self.cache, "reset"):
            self.cache.reset()
        return super().reset_state(module)

    def velocity(self, x, t, r, text, g, step) -> Tensor:
        self.cache.begin_step(step, float(t[0]))
        self.calls.append((step, "call"))
        return self.backbone.run(x, t, text, r=r, guidance=g, hook=self.cache).velocity


def _backbone_for(pipe, transformer_dir: str | Path | None) -> nn.Module:
    """The adapter around the pipeline's transformer: swapped for `transformer_dir`'s export if given, else
    the pipeline's own (with the export's added embedders when it was loaded from one)."""
    from integration.transformer import _adapter_class, is_disca_export, load_diffusers_export, wrap_diffusers

    current = pipe.transformer
    if transformer_dir is not None:
        backbone = load_diffusers_export(transformer_dir)
        backbone.to(device=current.device, dtype=current.dtype)
        pipe.register_modules(transformer=backbone.model)
        return backbone
    source = current.config.get("_name_or_path")
    if source and is_disca_export(source):
        return wrap_diffusers(current, source).to(device=current.device)
    kinds = {"HunyuanVideoTransformer3DModel": "hunyuan_video", "WanTransformer3DModel": "wan"}
    kind = kinds.get(type(current).__name__)
    if kind is None:
        raise ValueError(f"no adapter for the pipeline's transformer {type(current).__name__}")
    return _adapter_class(kind)(current)


def _register(pipe, hook, name: str):
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    if registry.get_hook(name) is not None:
        registry.remove_hook(name)
    registry.register_hook(hook, name)
    return hook


def apply_disca(pipe, predictor_dir: str | Path, transformer_dir: str | Path | None = None,
                schedule: str | Sequence[int] = "official_hunyuan", guidance: float | None = None) -> DisCaHook:
    """Make `pipe(prompt, num_inference_steps=20, ...)` sample with DisCa. `transformer_dir`: the distilled
    transformer (an `export_diffusers` directory) to put into the pipeline; omit it when the pipeline was
    loaded with that transformer already. `schedule`: a preset of sampling/cached.py or a list of full steps."""
    from models.predictor import load_predictor

    _check_scheduler(pipe)
    steps = _resolve_schedule(schedule)
    backbone = _backbone_for(pipe, transformer_dir)
    if backbone.r_embed is None:
        raise ValueError("DisCa needs the stage-2 (Restricted MeanFlow) transformer: this one has no r embedder; "
                         "give transformer_dir=<export_diffusers of the stage-2 export>")
    ref = next(pipe.transformer.parameters())
    predictor = load_predictor(predictor_dir, backbone).to(device=ref.device, dtype=ref.dtype).eval()
    return _register(pipe, DisCaHook(backbone, predictor, steps, pipe.scheduler, guidance=guidance), HOOK_NAME)


def apply_feature_cache(pipe, cache: FeatureHook, transformer_dir: str | Path | None = None,
                        guidance: float | None = None) -> FeatureCacheHook:
    """Attach a training-free cache of `caching/` (e.g. `make_cache("fora", num_steps=20, interval=3)`)."""
    _check_scheduler(pipe)
    backbone = _backbone_for(pipe, transformer_dir)
    return _register(pipe, FeatureCacheHook(backbone, cache, pipe.scheduler, guidance=guidance), FEATURE_HOOK_NAME)


def remove_disca(pipe) -> None:
    from diffusers.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
    for name in (HOOK_NAME, FEATURE_HOOK_NAME):
        if registry.get_hook(name) is not None:
            registry.remove_hook(name)
