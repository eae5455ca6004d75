"""Benchmark methods: a `MethodSpec` (one YAML entry) -> models -> a fresh sampler velocity per run.

Kinds (SPEC §5, the rows of the paper's Tables 1-4):

| kind          | velocity                                                        | NFE per step |
|---------------|-----------------------------------------------------------------|--------------|
| teacher_cfg   | `ModelVelocity(mode='cfg', cfg_scale, null_text)` (Euler + CFG)  | 2            |
| cfg_distilled | `ModelVelocity(mode='plain', guidance)` (stage 1 student)         | 1            |
| meanflow      | `ModelVelocity(mode='meanflow', guidance)` (stage 2 student)      | 1            |
| cache         | one of the above (`base`) with a training-free cache hook        | < base       |
|               | (caching.CACHE_METHODS), or diffusers' own block caches 'fbcache' / |              |
|               | 'magcache' (caching/diffusers_caches.py; diffusers backbones only) |              |
| disca         | `sampling.cached.CachedVelocity`: full DiT on scheduled steps,    | 1 or 0       |
|               | the learned predictor from the cached hidden state in between    | (+predictor) |

`model` is an export directory (models.io.save_backbone) or `random:<size>`: a seeded random
built-in MMDiT of that size with perturbed weights (adaLN-Zero makes a fresh one output zeros), so
smoke runs need no trained export. A disca `predictor` is an export directory, `reuse` (the
training-free reuse ablation) or `random`.

Every method of a benchmark runs on one `PromptSet` (the same prompts and the same noise):
`generate` samples all of it, `benchmark` measures one run of its first videos and `sampling_run` is
that run, for the interleaved latency (efficiency.py).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from caching.diffusers_caches import DIFFUSERS_CACHES
from evaluation import efficiency
from models.io import CONFIG_NAME, load_backbone
from models.protocol import TextCond
from sampling.sampler import ModelVelocity, sample, time_grid

KINDS = ("teacher_cfg", "cfg_distilled", "meanflow", "cache", "disca")
BASE_KINDS = ("teacher_cfg", "cfg_distilled", "meanflow")
ABLATION_KEYS = ("restricted_meanflow", "learnable_predictor", "gan")  # the paper's Table 3 columns
VELOCITY_MODES = {"teacher_cfg": "cfg", "cfg_distilled": "plain", "meanflow": "meanflow"}
RANDOM_PREFIX = "random:"
RANDOM_STD = 0.05  # std of the perturbation added to every weight of a random model
MAGCACHE_CALIBRATION_PROMPTS = 4  # prompts (and their noise) of MagCache's calibration pass


class MissingExport(FileNotFoundError):
    """A method's model/predictor export (or another file it needs) is not on disk."""


@dataclass
class MethodSpec:
    """One benchmarked method (one row of the report)."""

    name: str
    """unique id: file names (samples/<name>.gif) and CSV rows"""
    kind: str
    """teacher_cfg | cfg_distilled | meanflow | cache | disca"""
    model: str
    """backbone export directory, or 'random:<size>' (seeded random MMDiT, smoke runs)"""
    num_steps: int = 50
    """sampling steps"""
    shift: float = 1.0
    """timestep shift of the sampling grid (SPEC §2)"""
    cfg_scale: float | None = None
    """CFG scale of a teacher_cfg sampler (2 NFE per step)"""
    guidance: float | None = None
    """guidance input of CFG-distilled / MeanFlow models"""
    base: str | None = None
    """cache: the sampler it accelerates (teacher_cfg | cfg_distilled | meanflow)"""
    cache: str | None = None
    """cache: name in caching.CACHE_METHODS (fora, delta_dit, pab, teacache, taylorseer) or one of diffusers'
    block caches (fbcache, magcache: diffusers backbones, teacher_cfg / cfg_distilled bases; MagCache runs its
    calibration pass on the benchmark's first prompts unless `mag_ratios` is given)"""
    cache_kwargs: dict = field(default_factory=dict)
    """cache: its parameters (interval, threshold, ...)"""
    predictor: str | None = None
    """disca: predictor export directory, 'reuse' or 'random'"""
    schedule: list[int] | str | None = None
    """disca: steps that run the full DiT, or a sampling.cached.SCHEDULE_PRESETS name (None: from max_interval)"""
    max_interval: int | None = None
    """disca: N, a full step every N steps (sampling.cached.schedule_from_interval)"""
    warmup: int | None = None
    """disca: leading full steps with max_interval (None: the paper's warm-up for N in 2..4)"""
    label: str | None = None
    """display name in the report (default: name)"""
    train_config: str | None = None
    """the YAML that produces `model` (named in the missing-export error)"""
    predictor_train_config: str | None = None
    """disca: the YAML that produces `predictor`"""
    random_config: dict = field(default_factory=dict)
    """MMDiT config overrides of a random:<size> model"""
    ablation: dict[str, bool | None] | None = None
    """a row of the paper's Table 3: which DisCa components it uses, keys `ABLATION_KEYS`
    (restricted_meanflow, learnable_predictor, gan; None = not applicable)"""

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"method name {self.name!r} must be non-empty without '/', '\\' or spaces")
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} not in {KINDS}")
        if self.num_steps < 1:
            raise ValueError(f"method {self.name!r}: num_steps must be >= 1, got {self.num_steps}")
        if self.kind == "cache":
            if self.base not in BASE_KINDS:
                raise ValueError(f"method {self.name!r}: a cache method needs base in {BASE_KINDS}, got {self.base!r}")
            if not self.cache:
                raise ValueError(f"method {self.name!r}: a cache method needs `cache` (a caching.CACHE_METHODS name)")
            if self.cache in DIFFUSERS_CACHES and self.base == "meanflow":
                raise ValueError(f"method {self.name!r}: diffusers' {self.cache!r} runs diffusers' own forward, which "
                                 "has no r input: use base teacher_cfg or cfg_distilled")
        elif self.base is not None or self.cache is not None:
            raise ValueError(f"method {self.name!r}: base/cache only apply to kind 'cache', not {self.kind!r}")
        if self.sampler_kind == "teacher_cfg" and self.cfg_scale is None:
            raise ValueError(f"method {self.name!r}: a CFG teacher sampler needs cfg_scale")
        if self.kind == "disca" and not self.predictor:
            raise ValueError(f"method {self.name!r}: a disca method needs `predictor` "
                             "(an export dir, 'reuse' or 'random')")
        if self.kind != "disca" and (self.predictor or self.schedule or self.max_interval or self.warmup):
            raise ValueError(f"method {self.name!r}: predictor/schedule/max_interval/warmup only apply to kind 'disca'")
        if self.ablation is not None and set(self.ablation) != set(ABLATION_KEYS):
            raise ValueError(f"method {self.name!r}: ablation needs exactly the keys {list(ABLATION_KEYS)}, "
                             f"got {sorted(self.ablation)}")
        if self.kind == "disca" and (self.schedule is None) == (self.max_interval is None):
            raise ValueError(f"method {self.name!r}: a disca method needs exactly one of `schedule` (full steps or a "
                             "preset name) and `max_interval` (N)")

    @property
    def sampler_kind(self) -> str:
        """The base sampler: the kind itself, a cache's `base`, or 'meanflow' for DisCa."""
        if self.kind == "cache":
            return self.base
        return "meanflow" if self.kind == "disca" else self.kind

    @property
    def cfg_distilled(self) -> bool:
        """True when one model call replaces the cond + uncond pair (the paper's "CFG distilled" column)."""
        return self.sampler_kind != "teacher_cfg"

    @property
    def display(self) -> str:
        return self.label or self.name

    @property
    def is_random(self) -> bool:
        return self.model.startswith(RANDOM_PREFIX)


# --- models ------------------------------------------------------------------------------------------
def _seed_of(*parts: Any) -> int:
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode())


def random_backbone(size: str, sampler_kind: str, config: dict | None = None, seed: int = 0) -> nn.Module:
    """A seeded random built-in MMDiT with every weight perturbed by N(0, RANDOM_STD^2), with the
    guidance embedder (distilled kinds) and r embedder (meanflow) a stage would have added."""
    from models.mmdit import MMDiT

    torch.manual_seed(seed)
    model = MMDiT(size=size, config=dict(config or {}))
    if sampler_kind in ("cfg_distilled", "meanflow"):
        model.enable_guidance_embedding()
    if sampler_kind == "meanflow":
        model.enable_r_embedding("average")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * RANDOM_STD)
    return model.eval()


def require_export(spec: MethodSpec, directory: str, what: str = "model") -> Path:
    """The export directory, or MissingExport naming the method, the path and how to produce it."""
    path = Path(directory)
    if not (path / CONFIG_NAME).is_file():
        config = spec.predictor_train_config if what == "predictor" else spec.train_config
        how = (f"produce it with `python train.py --config {config}`" if config
               else "train the stage that exports it (`python train.py --config configs/<stage>.yaml`)")
        raise MissingExport(f"method {spec.name!r}: {what} export {str(path)!r} not found (no {CONFIG_NAME}); {how}")
    return path


def check_capabilities(spec: MethodSpec, model: nn.Module) -> None:
    """Fail early when the export cannot serve the method's sampler (e.g. a teacher given as MeanFlow)."""
    cfg = getattr(model, "config", {}) or {}
    if spec.sampler_kind == "meanflow" and "r_embed" in cfg and not cfg["r_embed"]:
        raise ValueError(f"method {spec.name!r} samples with MeanFlow but the model in {spec.model!r} has no r "
                         "embedding (r_embed is null): give a stage-2 (Restricted MeanFlow) export")
    if spec.kind == "cache" and spec.cache in DIFFUSERS_CACHES:
        from caching.diffusers_caches import check_diffusers_backbone

        try:
            check_diffusers_backbone(model, spec.cache)
        except ValueError as err:
            raise ValueError(f"method {spec.name!r}: {err}") from err
    distilled = cfg.get("guidance_embed")
    if distilled is True and spec.guidance is None:
        raise ValueError(f"method {spec.name!r}: the model in {spec.model!r} is guidance-distilled; set `guidance`")
    if distilled is False and spec.sampler_kind != "teacher_cfg" and spec.guidance is not None:
        raise ValueError(f"method {spec.name!r} sets guidance={spec.guidance} but the model in {spec.model!r} has no "
                         "guidance embedding: use kind teacher_cfg with cfg_scale, or a CFG-distilled export")


class ModelStore:
    """Loads each backbone/predictor once (methods often share an export) and checks it fits its method."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device, self.seed = device, seed
        self.backbones: dict[str, nn.Module] = {}
        self.predictors: dict[tuple[str, str], nn.Module] = {}
        self.fingerprints: dict[int, str] = {}
        self.mag_ratios: dict[str, list[float]] = {}  # calibration key -> MagCache ratios

    def backbone(self, spec: MethodSpec) -> nn.Module:
        if spec.is_random:
            key = json.dumps([spec.model, spec.sampler_kind, spec.random_config], sort_keys=True)
        else:
            key = str(require_export(spec, spec.model).resolve())
        if key not in self.backbones:
            if spec.is_random:
                model = random_backbone(spec.model[len(RANDOM_PREFIX):], spec.sampler_kind, spec.random_config,
                                        seed=_seed_of(self.seed, key))
            else:
                try:
                    model = load_backbone(spec.model)
                except (ValueError, FileNotFoundError) as err:
                    raise type(err)(f"method {spec.name!r}: {err}") from err
            self.backbones[key] = model.to(self.device).eval().requires_grad_(False)
        model = self.backbones[key]
        check_capabilities(spec, model)
        return model

    def predictor(self, spec: MethodSpec, backbone: nn.Module) -> nn.Module:
        from models.predictor import PREDICTOR_PRESETS, Predictor, ReusePredictor, load_predictor

        key = (spec.predictor, str(id(backbone)))
        if key not in self.predictors:
            if spec.predictor == "reuse":
                pred = ReusePredictor()
            elif spec.predictor == "random":
                size = spec.model[len(RANDOM_PREFIX):] if spec.is_random else None
                torch.manual_seed(_seed_of(self.seed, spec.predictor, spec.model))
                pred = Predictor(backbone, **PREDICTOR_PRESETS.get(size, {}))
                gen = torch.Generator().manual_seed(_seed_of(self.seed, "predictor", spec.model))
                with torch.no_grad():
                    for p in pred.parameters():
                        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * RANDOM_STD)
            else:
                require_export(spec, spec.predictor, "predictor")
                try:
                    pred = load_predictor(spec.predictor, backbone)
                except (ValueError, FileNotFoundError) as err:
                    raise type(err)(f"method {spec.name!r}: {err}") from err
            self.predictors[key] = pred.to(self.device).eval().requires_grad_(False)
        return self.predictors[key]

    def fingerprint(self, model: nn.Module) -> str:
        """caching.base.model_fingerprint of a loaded model, computed once."""
        from caching.base import model_fingerprint

        if id(model) not in self.fingerprints:
            self.fingerprints[id(model)] = model_fingerprint(model)
        return self.fingerprints[id(model)]

    def calibrate(self, spec: MethodSpec, prompts: "PromptSet") -> None:
        """Run what a method must calibrate before it samples: MagCache's calibration pass (diffusers'
        `MagCacheConfig(calibrate=True)`, one uncached run on the first prompts of `prompts`), once per
        model, sampler and grid. A no-op for every other method."""
        if spec.kind != "cache" or spec.cache != "magcache" or "mag_ratios" in spec.cache_kwargs:
            return
        key = _calibration_key(spec)
        if key in self.mag_ratios:
            return
        from caching.diffusers_caches import calibrate_magcache

        n = min(MAGCACHE_CALIBRATION_PROMPTS, prompts.noise.shape[0])
        mode = VELOCITY_MODES[spec.sampler_kind]
        self.mag_ratios[key] = calibrate_magcache(
            self.backbone(spec), prompts.text.index(slice(0, n)), prompts.noise[:n],
            time_grid(spec.num_steps, spec.shift, device=prompts.noise.device), mode=mode, cfg_scale=spec.cfg_scale,
            null_text=prompts.null_text if mode == "cfg" else None, guidance=spec.guidance if mode != "cfg" else None)

    def modules(self, spec: MethodSpec) -> list[nn.Module]:
        """Every module a method runs (for weight bytes)."""
        backbone = self.backbone(spec)
        return [backbone] + ([self.predictor(spec, backbone)] if spec.kind == "disca" else [])


# --- velocities ---------------------------------------------------------------------------------------
def make_velocity(spec: MethodSpec, store: ModelStore, text: TextCond, null_text: TextCond, *,
                  count_flops: bool = False):
    """A fresh velocity (zeroed NFE counters, empty cache) for one sampling run of `spec`.

    `count_flops` is passed to training-free caches that can count per-key FLOPs themselves; the
    benchmark keeps it off (efficiency.py counts whole runs itself) so timing is not disturbed."""
    backbone = store.backbone(spec)
    mode = VELOCITY_MODES[spec.sampler_kind]
    common = dict(mode=mode, cfg_scale=spec.cfg_scale, null_text=null_text if mode == "cfg" else None,
                  guidance=spec.guidance if mode != "cfg" else None)
    if spec.kind in BASE_KINDS:
        return ModelVelocity(backbone, text, **common)
    if spec.kind == "cache" and spec.cache in DIFFUSERS_CACHES:
        from caching.diffusers_caches import DiffusersCache

        kwargs = dict(spec.cache_kwargs)
        if spec.cache == "magcache" and "mag_ratios" not in kwargs:
            key = _calibration_key(spec)
            if key not in store.mag_ratios:
                raise ValueError(f"method {spec.name!r}: MagCache is not calibrated for this model and grid yet; call "
                                 "store.calibrate(spec, prompts) first (generate and benchmark do)")
            kwargs["mag_ratios"] = store.mag_ratios[key]
        cache = DiffusersCache(backbone, spec.cache, spec.num_steps, **kwargs)
        return ModelVelocity(cache, text, hook=cache, **common)
    if spec.kind == "cache":
        from caching import make_cache

        kwargs = dict(spec.cache_kwargs)
        if spec.cache == "teacache" and kwargs.get("calibration"):  # refuse another model's calibration
            kwargs["model_fingerprint"] = store.fingerprint(backbone)
        try:
            hook = make_cache(spec.cache, num_steps=spec.num_steps, count_flops=count_flops, **kwargs)
        except ValueError as err:
            raise ValueError(f"method {spec.name!r}: {err}") from err
        return ModelVelocity(backbone, text, hook=hook, **common)
    return _disca_velocity(spec, store, backbone, text)


def _calibration_key(spec: MethodSpec) -> str:
    """What a calibration depends on: the model, the sampler and its grid."""
    return json.dumps([spec.model, spec.random_config, spec.sampler_kind, spec.num_steps, spec.shift, spec.cfg_scale,
                       spec.guidance], default=str)


def _disca_velocity(spec: MethodSpec, store: ModelStore, backbone: nn.Module, text: TextCond):
    from sampling.cached import CachedVelocity

    return CachedVelocity(backbone, store.predictor(spec, backbone), text, schedule=disca_schedule(spec),
                          guidance=spec.guidance, mode="meanflow", num_steps=spec.num_steps)


def disca_schedule(spec: MethodSpec) -> list[int]:
    """The steps that run the full DiT: `schedule` (a list or a preset name), else
    `schedule_from_interval(num_steps, max_interval, warmup)` with the paper's warm-up by default."""
    from sampling.cached import PAPER_WARMUP, SCHEDULE_PRESETS, schedule_from_interval

    if isinstance(spec.schedule, str):
        if spec.schedule not in SCHEDULE_PRESETS:
            raise ValueError(f"method {spec.name!r}: schedule preset {spec.schedule!r} not in "
                             f"{sorted(SCHEDULE_PRESETS)}")
        return list(SCHEDULE_PRESETS[spec.schedule])
    if spec.schedule is not None:
        return [int(s) for s in spec.schedule]
    warmup = spec.warmup if spec.warmup is not None else PAPER_WARMUP.get(spec.max_interval)
    if warmup is None:
        raise ValueError(f"method {spec.name!r}: no paper warm-up for N={spec.max_interval} "
                         f"(known: {sorted(PAPER_WARMUP)}); set `warmup`")
    return schedule_from_interval(spec.num_steps, spec.max_interval, warmup)


def check_available(spec: MethodSpec) -> None:
    """MissingExport if any export or file the method needs is absent (cheap: nothing is loaded)."""
    if not spec.is_random:
        require_export(spec, spec.model)
    if spec.kind == "disca" and spec.predictor not in ("reuse", "random"):
        require_export(spec, spec.predictor, "predictor")
    check_files(spec)


def check_files(spec: MethodSpec) -> None:
    """MissingExport for a file a method needs besides its exports (a TeaCache calibration), with the
    command that writes it; ValueError when that calibration was fitted for another step count, sampler
    mode or grid shift (its model fingerprint is checked when the model is loaded, in make_velocity)."""
    calibration = spec.cache_kwargs.get("calibration") if spec.kind == "cache" else None
    if not calibration:
        return
    mode = VELOCITY_MODES[spec.sampler_kind]
    scale = f"--cfg_scale {spec.cfg_scale}" if mode == "cfg" else f"--guidance {spec.guidance}"
    command = (f"python calibrate_teacache.py --model_dir {spec.model} --data_dir <data dir> --num_steps "
               f"{spec.num_steps} --mode {mode} {scale} --shift {spec.shift} --out {calibration}")
    if not Path(calibration).is_file():
        raise MissingExport(f"method {spec.name!r}: TeaCache calibration {calibration!r} not found; write it with "
                            f"`{command}`")
    from caching.teacache import load_coefficients

    try:  # fitted for this step count and sampler? (the model itself is checked when it is loaded)
        load_coefficients(calibration, spec.num_steps, mode=mode, shift=spec.shift)
    except ValueError as err:
        raise ValueError(f"method {spec.name!r}: {err} (`{command}`)") from err


# --- the prompt set and the two ways a method is run ------------------------------------------------
@dataclass
class PromptSet:
    """The benchmark's inputs, shared by every method."""

    text: TextCond  # (N, L, D): one row per sample, the prompts repeated once per seed
    labels: dict[str, Tensor]  # digit / color / direction, (N,) int64
    noise: Tensor  # (N, C, F, H, W): seed s fills rows [s * num_videos, (s + 1) * num_videos)
    real: Tensor  # (num_videos, C, F, H, W): the prompts' real videos, in [-1, 1]
    null_text: TextCond  # (1, L, D): the CFG null prompt


def load_prompt_set(data_dir: str, num_videos: int, seeds: list[int], device: torch.device, *,
                    batch_size: int = 32, verify_checksums: bool = True,
                    prepare_if_missing: dict | None = None) -> PromptSet:
    """The first `num_videos` validation samples and one N(0, I) noise draw per (seed, prompt)."""
    from datamodules.latent_video import LatentVideoDataModule, batch_text

    dm = LatentVideoDataModule(data_dir, batch_size=batch_size, val_batch_size=batch_size,
                               verify_checksums=verify_checksums, prepare_if_missing=prepare_if_missing)
    dm.prepare_data()
    dm.setup()
    batches, count = [], 0
    for batch in dm.val_dataloader():
        batches.append(batch)
        count += batch["latents"].shape[0]
        if count >= num_videos:
            break
    if count < num_videos:
        raise ValueError(f"num_videos={num_videos} but the validation split of {data_dir} has only {count} "
                         "samples: lower num_videos or prepare more validation videos")
    cat = {k: torch.cat([b[k] for b in batches])[:num_videos] for k in
           ("latents", "text_tokens", "text_mask", "pooled", "digit", "color", "direction")}
    repeat = len(seeds)
    text = batch_text({k: v.repeat(repeat, *([1] * (v.ndim - 1))) for k, v in cat.items()})
    noise = torch.cat([torch.randn(cat["latents"].shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    labels = {k: cat[k].repeat(repeat) for k in ("digit", "color", "direction")}
    return PromptSet(text.to(device=device), labels, noise.to(device), cat["latents"], dm.null_text.to(device=device))


def generate(spec: MethodSpec, store: ModelStore, prompts: PromptSet, batch_size: int) -> Tensor:
    """(N, C, F, H, W) float32 CPU videos of the whole prompt set, a fresh velocity per batch."""
    store.calibrate(spec, prompts)
    grid = time_grid(spec.num_steps, spec.shift, device=prompts.noise.device)
    out = []
    for start in tqdm(range(0, prompts.noise.shape[0], batch_size), desc=f"{spec.name}: sampling", leave=False):
        sl = slice(start, start + batch_size)
        velocity = make_velocity(spec, store, prompts.text.index(sl), prompts.null_text)
        out.append(sample(velocity, prompts.noise[sl], grid).float().cpu())
    return torch.cat(out)


def sampling_run(spec: MethodSpec, store: ModelStore, prompts: PromptSet, device: torch.device, *,
                 batch_size: int = 1) -> tuple[efficiency.Run, int]:
    """The timed run of `spec` (a fresh velocity sampling the first `batch_size` prompts) and the bytes
    of its weights and inputs (resident before the run)."""
    store.calibrate(spec, prompts)
    grid = time_grid(spec.num_steps, spec.shift, device=device)
    text, noise = prompts.text.index(slice(0, batch_size)), prompts.noise[:batch_size]

    def run():
        velocity = make_velocity(spec, store, text, prompts.null_text)
        return sample(velocity, noise, grid), velocity

    resident = efficiency.module_bytes(store.modules(spec)) + efficiency.tensor_bytes(
        [noise, text.tokens, text.mask, text.pooled])
    return run, resident


def benchmark(spec: MethodSpec, store: ModelStore, prompts: PromptSet, device: torch.device, *,
              batch_size: int = 1) -> efficiency.Efficiency:
    """NFE, FLOPs and memory of sampling the first `batch_size` prompts (efficiency.measure); latency is
    timed interleaved with the reference by the evaluator (efficiency.interleaved_times)."""
    run, resident = sampling_run(spec, store, prompts, device, batch_size=batch_size)
    return efficiency.measure(run, device, resident)
