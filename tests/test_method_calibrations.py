"""Calibrated baselines in evaluation/methods.py: a TeaCache calibration fitted for another step count,
sampler or model is refused before sampling; diffusers' First Block Cache and MagCache (with its
calibration pass) run as methods on a diffusers backbone and are refused on the built-in MMDiT."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from caching.base import model_fingerprint
from caching.diffusers_caches import DiffusersCache
from caching.teacache_calibration import calibrate_teacache
from evaluation.methods import MethodSpec, ModelStore, PromptSet, check_available, generate, make_velocity
from models.hunyuan_video import HunyuanVideoBackbone
from models.io import save_backbone
from models.mmdit import MMDiT
from models.protocol import TextCond
from sampling.sampler import ModelVelocity, sample, time_grid
from tests.conftest import perturb, tiny_text

STEPS = 6
HV = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
          num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=24,
          pooled_projection_dim=20, rope_axes_dim=(4, 6, 6), guidance_embeds=True)


def _text(n: int, seed: int) -> TextCond:
    gen = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(n, 5, 24, generator=gen), torch.ones(n, 5, dtype=torch.bool),
                    torch.randn(n, 20, generator=gen))


@pytest.fixture(scope="module")
def hv_export(tmp_path_factory):
    """A tiny guidance-distilled HunyuanVideo export (as a stage-1 export of a diffusers backbone)."""
    torch.manual_seed(0)
    backbone = HunyuanVideoBackbone(perturb(HunyuanVideoTransformer3DModel(**HV), std=0.1).eval())
    return str(save_backbone(backbone, tmp_path_factory.mktemp("hv") / "export"))


@pytest.fixture(scope="module")
def prompts() -> PromptSet:
    noise = torch.randn(3, 4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = {k: torch.zeros(3, dtype=torch.long) for k in ("digit", "color", "direction")}
    return PromptSet(_text(3, 2), labels, noise, noise.clone(), _text(1, 3))


# --- TeaCache: a calibration of another step count or model is refused -------------------------------------
def test_model_fingerprint_is_stable_and_tells_models_apart(tiny_mmdit):
    assert model_fingerprint(tiny_mmdit) == model_fingerprint(copy.deepcopy(tiny_mmdit))
    assert model_fingerprint(tiny_mmdit) != model_fingerprint(perturb(copy.deepcopy(tiny_mmdit), std=1e-3, seed=9))


def test_teacache_calibration_of_another_step_count_or_model_is_refused_before_sampling(tmp_path):
    torch.manual_seed(0)
    model = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4)}), seed=3).eval()
    export = save_backbone(model, tmp_path / "teacher")
    text, null = tiny_text(2, 5), tiny_text(1, 3, seed=5)
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    path = calibrate_teacache(model, text, noise, num_steps=STEPS, mode="cfg", cfg_scale=4.0, null_text=null,
                              degree=2).save(tmp_path / "teacache_cfg_6.json")

    def spec(**kw) -> MethodSpec:
        fields = dict(name="tc", kind="cache", base="teacher_cfg", cache="teacache", model=str(export), cfg_scale=4.0,
                      num_steps=STEPS, cache_kwargs={"threshold": 0.1, "calibration": str(path)})
        return MethodSpec(**{**fields, **kw})

    check_available(spec())  # the file fits
    velocity = make_velocity(spec(), ModelStore(torch.device("cpu")), text, null)
    assert torch.isfinite(sample(velocity, noise, time_grid(STEPS))).all()
    # another step count: refused at the availability check, before any model is loaded
    with pytest.raises(ValueError, match=r"method 'tc': .*calibrated for num_steps=6, but the cache is for "
                                         r"num_steps=10.*calibrate_teacache.py"):
        check_available(spec(num_steps=10))
    # another sampler (CFG-free mode on a distilled model): refused too
    with pytest.raises(ValueError, match="calibrated for sampler mode 'cfg', not 'plain'"):
        check_available(spec(base="cfg_distilled", cfg_scale=None, guidance=4.0))
    # another model: refused when the velocity is built, before it samples
    other = save_backbone(perturb(copy.deepcopy(model), std=1e-3, seed=7), tmp_path / "retrained")
    check_available(spec(model=str(other)))  # same step count and sampler: only the model differs
    with pytest.raises(ValueError, match=r"method 'tc': .*calibrated on another model \(fingerprint [0-9a-f]{16}, "
                                         r"this model's is [0-9a-f]{16}\)"):
        make_velocity(spec(model=str(other)), ModelStore(torch.device("cpu")), text, null)


# --- diffusers' First Block Cache and MagCache as methods -------------------------------------------------
def _spec(export: str, name: str, cache: str | None, **kwargs) -> MethodSpec:
    if cache is None:
        return MethodSpec(name=name, kind="cfg_distilled", model=export, guidance=4.0, num_steps=STEPS)
    return MethodSpec(name=name, kind="cache", base="cfg_distilled", model=export, guidance=4.0, num_steps=STEPS,
                      cache=cache, cache_kwargs=kwargs)


def test_first_block_cache_method(hv_export, prompts):
    store = ModelStore(torch.device("cpu"))
    reference = generate(_spec(hv_export, "ref", None), store, prompts, batch_size=3)
    exact = generate(_spec(hv_export, "fbc0", "fbcache", threshold=0.0), store, prompts, batch_size=3)
    torch.testing.assert_close(exact, reference, rtol=0, atol=2e-5)  # diffusers' forward == the adapter's
    spec = _spec(hv_export, "fbc", "fbcache", threshold=10.0)  # every step after the first reuses the tail
    velocity = make_velocity(spec, store, prompts.text, prompts.null_text)
    out = sample(velocity, prompts.noise, time_grid(STEPS))
    cache = velocity.hook
    assert isinstance(cache, DiffusersCache) and cache.full_steps == [0]
    assert cache.nfe_fraction == pytest.approx((3 + (STEPS - 1) * 1) / (STEPS * 3))  # block 0 of 3 always runs
    assert cache.peak_bytes > 0 and (out - reference).abs().max() > 1e-2
    assert not store.backbone(spec).model.is_cache_enabled  # the shared model is left without hooks


def test_magcache_method_runs_its_calibration_pass(hv_export, prompts):
    store = ModelStore(torch.device("cpu"))
    spec = _spec(hv_export, "mag", "magcache", threshold=0.5, max_skip_steps=2, retention_ratio=0.2)
    with pytest.raises(ValueError, match="MagCache is not calibrated"):
        make_velocity(spec, store, prompts.text, prompts.null_text)
    out = generate(spec, store, prompts, batch_size=3)  # calibrates first, on the first prompts
    (ratios,) = store.mag_ratios.values()
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    velocity = make_velocity(spec, store, prompts.text, prompts.null_text)
    again = sample(velocity, prompts.noise, time_grid(STEPS))
    torch.testing.assert_close(again, out)
    assert velocity.hook.full_steps[0] == 0 and velocity.hook.nfe_fraction < 1.0  # step 0: retention, no residual yet
    with pytest.raises(ValueError, match="calibrated for another step count"):
        DiffusersCache(store.backbone(spec), "magcache", STEPS + 1, mag_ratios=ratios)


def test_diffusers_caches_refuse_the_builtin_mmdit_and_meanflow_models():
    store = ModelStore(torch.device("cpu"))
    spec = MethodSpec(name="fbc_mmdit", kind="cache", base="cfg_distilled", model="random:tiny", guidance=4.0,
                      num_steps=STEPS, cache="fbcache")
    with pytest.raises(ValueError, match="method 'fbc_mmdit': .*needs a diffusers backbone .*got 'mmdit'"):
        store.backbone(spec)
    with pytest.raises(ValueError, match="has no r input: use base teacher_cfg or cfg_distilled"):
        MethodSpec(name="m", kind="cache", base="meanflow", model="random:tiny", guidance=4.0, cache="magcache")
    torch.manual_seed(0)
    stage2 = HunyuanVideoBackbone(HunyuanVideoTransformer3DModel(**HV), r_embed="average")
    with pytest.raises(ValueError, match="r embedding"):
        DiffusersCache(stage2, "fbcache", STEPS)
    plain = ModelVelocity(DiffusersCache(HunyuanVideoBackbone(HunyuanVideoTransformer3DModel(**HV)), "fbcache", 2),
                          _text(1, 0), mode="plain", guidance=4.0)
    with pytest.raises(RuntimeError, match="before begin_step"):
        plain(torch.zeros(1, 4, 2, 8, 8), torch.tensor(1.0), torch.tensor(0.5), 0)
