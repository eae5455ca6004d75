"""Peer tests: the project's caches against diffusers' own cache hooks (diffusers 0.42.1) on a tiny random
`HunyuanVideoTransformer3DModel`, sampled with the same Euler loop, noise and time grid.

- the uncached sampler == a plain diffusers forward loop;
- FORA == `TaylorSeerCacheConfig(max_order=0)` (pre-gate reuse) where both schedules coincide;
- TaylorSeer == `TaylorSeerCacheConfig(max_order=m)` with the same schedule;
- PAB == `PyramidAttentionBroadcastConfig` (absolute counter, strict timestep range (100, 800)).

diffusers' hooks cache the outputs of the attention / feed-forward MODULES, i.e. before the adaLN
gate, and the block applies the current step's gate; the project's caches do the same through the
pre-gate hook keys (models/protocol.py). The steps on which diffusers really computed are read from a
forward hook on the first block's attention projection, and must equal the project's full steps.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

from caching import make_cache
from models.hunyuan_video import TIMESTEP_SCALE, HunyuanVideoBackbone
from models.protocol import TextCond
from sampling.sampler import ModelVelocity, sample, time_grid

STEPS = 9  # grid 1, .889, ..., .111: no time on PAB's range bounds (0.1, 0.8)
ATOL = 2e-5
CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
              num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
              text_embed_dim=24, pooled_projection_dim=20, rope_axes_dim=(4, 6, 6), guidance_embeds=False)
# every attention and MLP module of the double and single blocks (diffusers' default hooks attention only);
# a single block's MLP output is `act_mlp`'s (proj_out is linear, so caching before it is the same)
MODULES = [r"transformer_blocks\.\d+\.attn", r"transformer_blocks\.\d+\.ff", r"transformer_blocks\.\d+\.ff_context",
           r"single_transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.act_mlp"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**CONFIG)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # right-padded prompt, as the pipeline pads
    text = TextCond(torch.randn(2, 6, 24, generator=gen), mask, torch.randn(2, 20, generator=gen))
    noise = torch.randn(2, 4, 2, 8, 8, generator=gen)
    return model, text, noise


def diffusers_loop(model, text: TextCond, noise: torch.Tensor, config=None) -> tuple[torch.Tensor, list[int]]:
    """Euler x <- x - (t - r) v with diffusers' forward (and its cache hooks when `config` is given);
    returns the sample and the steps on which block 0's attention really ran."""
    grid = time_grid(STEPS)
    state = {"step": 0, "timestep": 0.0}
    computed: list[int] = []
    probe = model.transformer_blocks[0].attn.to_q.register_forward_hook(
        lambda *_: computed.append(state["step"]))
    if config is not None:
        if isinstance(config, PyramidAttentionBroadcastConfig):
            config.current_timestep_callback = lambda: state["timestep"]
        model.enable_cache(config)
    try:
        x = noise
        with torch.no_grad():
            for i in range(STEPS):
                t, r = grid[i], grid[i + 1]
                timestep = (t * TIMESTEP_SCALE).expand(x.shape[0])
                state.update(step=i, timestep=float(timestep[0]))
                with model.cache_context("cond"):
                    v = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text.tokens,
                              encoder_attention_mask=text.mask, pooled_projections=text.pooled, return_dict=False)[0]
                x = x - (t - r) * v
    finally:
        probe.remove()
        if config is not None:
            model.disable_cache()
    return x, sorted(set(computed))


def project_loop(model, text: TextCond, noise: torch.Tensor, name: str, **kwargs) -> tuple[torch.Tensor, list[int]]:
    hook = make_cache(name, num_steps=STEPS, count_flops=False, **kwargs)
    out = sample(ModelVelocity(HunyuanVideoBackbone(model), text, mode="plain", hook=hook), noise, time_grid(STEPS))
    return out, hook.full_steps


def test_uncached_sampler_equals_diffusers_forward_loop(setup):
    model, text, noise = setup
    ours, steps = project_loop(model, text, noise, "none")
    theirs, computed = diffusers_loop(model, text, noise)
    assert steps == computed == list(range(STEPS))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert ours.abs().max() > 1.0  # a non-trivial sample


@pytest.mark.parametrize("name, kwargs, config", [
    # FORA: first step, then every 3rd counted from the last: {0, 2, 5, 8} = diffusers' warm-up 1, (s - 2) % 3 == 0
    ("fora", dict(interval=3),
     dict(cache_interval=3, disable_cache_before_step=1, max_order=0)),
    # TaylorSeer, reference schedule (3 warm-up steps, then every 2nd): equal to diffusers' for N = 2
    ("taylorseer", dict(interval=2, order=1, warmup=3),
     dict(cache_interval=2, disable_cache_before_step=3, max_order=1)),
    # TaylorSeer, diffusers' schedule at N = 3, second order
    ("taylorseer", dict(interval=3, order=2, warmup=2, schedule="diffusers"),
     dict(cache_interval=3, disable_cache_before_step=2, max_order=2)),
])
def test_fora_and_taylorseer_equal_diffusers_taylorseer_hook(setup, name, kwargs, config):
    model, text, noise = setup
    reference, _ = project_loop(model, text, noise, "none")
    ours, full = project_loop(model, text, noise, name, **kwargs)
    theirs, computed = diffusers_loop(model, text, noise, TaylorSeerCacheConfig(
        taylor_factors_dtype=torch.float32, cache_identifiers=MODULES, **config))
    assert full == computed and len(full) < STEPS, (full, computed)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert (ours - reference).abs().max() > 100 * ATOL  # the cache really changed the sample


@pytest.mark.parametrize("interval", [2, 3])
def test_pab_equals_diffusers_pyramid_attention_broadcast(setup, interval):
    model, text, noise = setup
    reference, _ = project_loop(model, text, noise, "none")
    ours, full = project_loop(model, text, noise, "pab", interval=interval)  # default range (0.1, 0.8)
    # diffusers' default identifiers also match the token refiner ("refiner_blocks"): hook the DiT blocks only
    theirs, computed = diffusers_loop(model, text, noise, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=interval, spatial_attention_timestep_skip_range=(100, 800),
        spatial_attention_block_identifiers=(r"^transformer_blocks\.", r"^single_transformer_blocks\.")))
    expected = [s for s in range(STEPS) if s == 0 or s % interval == 0 or not 0.1 < 1 - s / STEPS < 0.8]
    assert full == computed == expected, (full, computed)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    assert (ours - reference).abs().max() > 100 * ATOL
