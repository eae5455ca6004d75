"""The diffusers adapters (models/hunyuan_video.py, models/wan.py) against diffusers' own forward.

Tiny random float32 configs; every parameter is perturbed with seeded noise so zero-initialised
diffusers layers do not make the comparisons trivial.
"""
from __future__ import annotations

import copy

import pytest
import torch

import diffusers  # noqa: E402,F401  (a hard dependency: fail, never skip)

from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel  # noqa: E402

from models.hunyuan_video import HunyuanVideoBackbone, joint_key_mask  # noqa: E402
from models.io import build_backbone, load_backbone, save_backbone  # noqa: E402
from models.layers import attention_backend  # noqa: E402
from models.protocol import FeatureHook, TextCond  # noqa: E402
from models.wan import WanBackbone  # noqa: E402

ATOL = 1e-5
TXT_DIM, POOL_DIM, L = 24, 20, 7

HV_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                 text_embed_dim=TXT_DIM, pooled_projection_dim=POOL_DIM, rope_axes_dim=(4, 6, 6))
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=TXT_DIM, freq_dim=32, ffn_dim=48, num_layers=1, rope_max_seq_len=32)


def _perturb(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def _hv_model(guidance_embeds: bool, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(seed)
    return _perturb(HunyuanVideoTransformer3DModel(**HV_CONFIG, guidance_embeds=guidance_embeds), seed)


def _wan_model(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return _perturb(WanTransformer3DModel(**WAN_CONFIG), seed)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 3, 8, 8, generator=gen)  # grid (3, 4, 4): 48 image tokens
    t = torch.tensor([0.3, 0.8])
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 4:] = False  # right padding on sample 1
    text = TextCond(torch.randn(2, L, TXT_DIM, generator=gen), mask, torch.randn(2, POOL_DIM, generator=gen))
    guidance = torch.tensor([4.0, 6.5])
    return x, t, text, guidance


@pytest.fixture(scope="module")
def hv():
    return HunyuanVideoBackbone(_hv_model(guidance_embeds=False))


@pytest.fixture(scope="module")
def wan():
    return WanBackbone(_wan_model())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class Recorder(FeatureHook):
    def __init__(self):
        self.keys: list[str] = []

    def observe(self, key, value):
        self.keys.append(key)

    def delta(self, key, fn):
        self.keys.append(key)
        return fn()


class ZeroBlocks(FeatureHook):
    def delta(self, key, fn):
        out = fn()
        return torch.zeros_like(out) if key == "blocks" else out


# --- HunyuanVideo ----------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_hunyuan_matches_diffusers(inputs, guidance_embeds):
    x, t, text, g = inputs
    model = _hv_model(guidance_embeds)
    bb = HunyuanVideoBackbone(model)
    captured = {}
    h1 = model.context_embedder.register_forward_hook(lambda m, a, out: captured.__setitem__("txt", out))
    h2 = model.norm_out.register_forward_pre_hook(lambda m, a: captured.__setitem__("hidden", a[0]))
    with torch.no_grad():
        ref = model(x, t * 1000, text.tokens, text.mask.long(), text.pooled,
                    guidance=g * 1000 if guidance_embeds else None).sample
        h1.remove(), h2.remove()
        out = bb.run(x, t, text, guidance=g if guidance_embeds else None, return_hidden=True)
        tokens = bb.embed(x, text, t)
    assert ref.abs().max() > 0.1
    assert out.velocity.shape == x.shape
    assert _max_diff(out.velocity, ref) < ATOL
    assert _max_diff(tokens.txt, captured["txt"]) < ATOL  # refined text incl. the padded rows
    assert _max_diff(out.hidden[:, : tokens.num_img], captured["hidden"]) < ATOL


def test_hunyuan_recompose_shapes_and_blocks(hv, inputs):
    x, t, text, _ = inputs
    with torch.no_grad():
        out = hv.run(x, t, text, return_hidden=True, feature_layers=[0, 1])
        tokens = hv.embed(x, text, t)
        vec = hv.condition(t, None, None, text.pooled)
        hidden, feats = hv.transformer(tokens, vec, feature_layers=[0, 1])
        v = hv.head(hidden, vec, tokens)
        assert torch.equal(v, out.velocity) and torch.equal(hidden, out.hidden)
        assert torch.equal(v, hv(x, t, text))
        assert out.hidden.shape == (2, 48 + L, hv.hidden_size) and vec.shape == (2, hv.hidden_size)
        assert [f.shape for f in out.features] == [(2, 48, hv.hidden_size)] * 2
        assert hv.num_blocks == 2 and tokens.rope[0].shape == (48, 16)
        with pytest.raises(ValueError, match="embed"):
            hv.embed(x, text)
        blocks = hv.make_single_blocks(2)
        y = hidden
        for blk in blocks:
            y = blk(y, vec, tokens)
        assert y.shape == hidden.shape and torch.isfinite(y).all()
        # a new block with the backbone's weights reproduces the backbone's single block
        blocks[0].block.load_state_dict(hv.model.single_transformer_blocks[0].state_dict())
        x_in = torch.randn_like(hidden)
        key_mask = joint_key_mask(tokens)[:, None, None]  # diffusers' (B, 1, 1, N) mask
        ref = hv.model.single_transformer_blocks[0](x_in[:, :48], x_in[:, 48:], vec, key_mask, tokens.rope)
        assert _max_diff(blocks[0](x_in, vec, tokens), torch.cat(ref, 1)) < ATOL
        # narrower blocks (a predictor of width 16, one head of the RoPE dim 16)
        narrow = hv.make_single_blocks(1, hidden_size=16, num_heads=1, mlp_ratio=2.0)
        y = narrow[0](torch.randn(2, 48 + L, 16), torch.randn(2, 16), tokens)
        assert y.shape == (2, 48 + L, 16) and torch.isfinite(y).all()


def test_hunyuan_from_pretrained_and_io_roundtrip(hv, inputs, tmp_path):
    x, t, text, g = inputs
    hv.model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = HunyuanVideoBackbone.from_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text), hv(x, t, text))
    # our own export (safetensors + config.json), with the stage extensions enabled
    ext = copy.deepcopy(hv)
    ext.enable_guidance_embedding()
    ext.enable_r_embedding("sum")
    _perturb(ext, seed=7, std=0.05)
    cfg = ext.config
    assert cfg["type"] == "hunyuan_video" and build_backbone(cfg).config == cfg
    save_backbone(ext, tmp_path / "export")
    back = load_backbone(tmp_path / "export")
    assert back.config == cfg
    r = t - 0.2
    with torch.no_grad():
        assert torch.equal(back(x, t, text, r, g), ext(x, t, text, r, g))


@pytest.mark.parametrize("mode", ["average", "sum"])
def test_hunyuan_new_embeddings_start_unchanged(hv, inputs, mode):
    x, t, text, g = inputs
    ext = copy.deepcopy(hv)
    ext.enable_guidance_embedding()
    ext.enable_r_embedding(mode)
    assert ext.config["diffusers_config"]["guidance_embeds"] and ext.config["r_embed"] == mode
    with torch.no_grad():
        base = hv(x, t, text)
        out = ext(x, t, text, r=t, guidance=g)
        assert torch.equal(out, base)
        assert torch.equal(ext.condition(t, t, g, text.pooled), hv.condition(t, None, None, text.pooled))
        # the diffusers model with its new guidance embedder is still the same function
        ref = ext.model(x, t * 1000, text.tokens, text.mask, text.pooled, guidance=g * 1000).sample
        assert _max_diff(ref, base) < ATOL
    # a model that already has a guidance embedder keeps it
    own = HunyuanVideoBackbone(_hv_model(guidance_embeds=True))
    emb = own.model.time_text_embed.guidance_embedder
    own.enable_guidance_embedding()
    assert own.model.time_text_embed.guidance_embedder is emb


def test_hunyuan_attention_backends_and_jvp(hv, inputs):
    x, t, text, _ = inputs
    with torch.no_grad():
        sdpa = hv(x, t, text)
        with attention_backend(hv, "math"):
            math = hv(x, t, text)
    assert _max_diff(sdpa, math) < ATOL
    assert all(m.attention_backend == "sdpa" for m in hv.modules() if hasattr(m, "attention_backend"))
    gen = torch.Generator().manual_seed(5)
    dx, dt = torch.randn(x.shape, generator=gen), torch.tensor([0.5, -1.0])
    with attention_backend(hv, "math"), torch.no_grad():
        out, tangent = torch.func.jvp(lambda x_, t_: hv(x_, t_, text), (x, t), (dx, dt))
        eps = 1e-4  # t enters as t * 1000: keep the step small
        fd = (hv(x + eps * dx, t + eps * dt, text) - hv(x - eps * dx, t - eps * dt, text)) / (2 * eps)
    assert _max_diff(out, math) < ATOL
    assert torch.isfinite(tangent).all()
    assert (tangent - fd).norm() / fd.norm() < 1e-2


def test_hunyuan_hooks(hv, inputs):
    x, t, text, _ = inputs
    rec = Recorder()
    with torch.no_grad():
        base = hv(x, t, text)
        out = hv.run(x, t, text, hook=rec).velocity
        zero = hv.run(x, t, text, hook=ZeroBlocks(), return_hidden=True)
        tokens = hv.embed(x, text, t)
    assert torch.equal(out, base)
    assert set(rec.keys) == {"modulated_input", "blocks", "single_blocks", "double0.attn", "double0.mlp",
                             "single0.attn", "single0.mlp"}
    assert rec.keys[0] == "modulated_input" and len(rec.keys) == 7
    assert _max_diff(zero.velocity, base) > 1e-2
    assert torch.equal(zero.hidden, torch.cat([tokens.img, tokens.txt], 1))


# --- Wan -------------------------------------------------------------------------------------------
def test_wan_matches_diffusers_and_recomposes(wan, inputs):
    x, t, text, _ = inputs
    with torch.no_grad():
        ref = wan.model(x, t * 1000, text.tokens * text.mask[..., None]).sample  # the pipeline zero-pads
        out = wan.run(x, t, text, return_hidden=True, feature_layers=[0])
        tokens = wan.embed(x, text)
        vec = wan.condition(t, None, None, text.pooled)
        hidden, feats = wan.transformer(tokens, vec, feature_layers=[0])
        v = wan.head(hidden, vec, tokens)
    assert ref.abs().max() > 0.1
    assert _max_diff(out.velocity, ref) < ATOL
    assert torch.equal(v, out.velocity) and torch.equal(hidden, out.hidden)
    assert out.hidden.shape == (2, 48 + L, wan.hidden_size)
    assert [f.shape for f in out.features] == [(2, 48, wan.hidden_size)]
    blocks = wan.make_single_blocks(2)
    y = hidden
    for blk in blocks:
        y = blk(y, vec, tokens)
    assert y.shape == hidden.shape and torch.isfinite(y).all()
    assert sum(p.numel() for p in blocks.parameters()) == 2 * sum(p.numel() for p in wan.model.blocks[0].parameters())
    narrow = wan.make_single_blocks(1, hidden_size=12, num_heads=1)
    y = narrow[0](torch.randn(2, 48 + L, 12), torch.randn(2, 12), tokens)
    assert y.shape == (2, 48 + L, 12) and torch.isfinite(y).all()


@pytest.mark.parametrize("mode", ["average", "sum"])
def test_wan_new_embeddings_start_unchanged(wan, inputs, mode):
    x, t, text, g = inputs
    ext = copy.deepcopy(wan)
    ext.enable_guidance_embedding()
    ext.enable_r_embedding(mode)
    with torch.no_grad():
        assert torch.equal(ext(x, t, text, r=t, guidance=g), wan(x, t, text))


def test_wan_io_backends_jvp_hooks(wan, inputs, tmp_path):
    x, t, text, g = inputs
    wan.model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = WanBackbone.from_pretrained(tmp_path / "pipe")
    with torch.no_grad():
        base = wan(x, t, text)
        assert torch.equal(loaded(x, t, text), base)
    ext = copy.deepcopy(wan)
    ext.enable_guidance_embedding()
    ext.enable_r_embedding("interval")
    _perturb(ext, seed=3, std=0.05)
    cfg = ext.config
    assert cfg["type"] == "wan" and build_backbone(cfg).config == cfg
    save_backbone(ext, tmp_path / "export")
    back = load_backbone(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(back(x, t, text, t - 0.1, g), ext(x, t, text, t - 0.1, g))
        with attention_backend(wan, "math"):
            math = wan(x, t, text)
    assert _max_diff(math, base) < ATOL
    gen = torch.Generator().manual_seed(9)
    dx, dt = torch.randn(x.shape, generator=gen), torch.tensor([1.0, 0.5])
    with attention_backend(wan, "math"), torch.no_grad():
        _, tangent = torch.func.jvp(lambda x_, t_: wan(x_, t_, text), (x, t), (dx, dt))
        eps = 1e-4  # t enters as t * 1000: keep the step small
        fd = (wan(x + eps * dx, t + eps * dt, text) - wan(x - eps * dx, t - eps * dt, text)) / (2 * eps)
    assert (tangent - fd).norm() / fd.norm() < 1e-2
    rec = Recorder()
    with torch.no_grad():
        assert torch.equal(wan.run(x, t, text, hook=rec).velocity, base)
        zero = wan.run(x, t, text, hook=ZeroBlocks()).velocity
    assert set(rec.keys) == {"modulated_input", "blocks", "double0.attn", "double0.cross", "double0.mlp"}
    assert _max_diff(zero, base) > 1e-2


@pytest.mark.parametrize("kind", ["hunyuan_video", "wan"])
def test_predictor_runs_on_adapters(hv, wan, inputs, kind):
    from models import predictor
    x, t, text, _ = inputs
    bb = hv if kind == "hunyuan_video" else wan
    with torch.no_grad():
        cache = bb.run(x, t, text, return_hidden=True).hidden
        for width in (None, 16 if kind == "hunyuan_video" else 12):
            p = predictor.Predictor(bb, hidden_size=width, num_blocks=2)
            u = p(bb, x, t - 0.1, None, text, cache)
            assert u.shape == x.shape and torch.isfinite(u).all()


@pytest.mark.parametrize("cls, dcfg", [(HunyuanVideoBackbone, HV_CONFIG), (WanBackbone, WAN_CONFIG)])
def test_adapter_config_errors_name_the_bad_value(cls, dcfg):
    other = "wan" if cls is HunyuanVideoBackbone else "hunyuan_video"
    with pytest.raises(ValueError, match=f"config type '{other}' is not '{cls.TYPE}'"):
        cls.from_config({"type": other, "diffusers_config": dcfg})
    with pytest.raises(ValueError, match="needs a 'diffusers_config'"):
        cls.from_config({"type": cls.TYPE})
    with pytest.raises(ValueError, match=r"unknown .* config keys \['r_embedd'\]"):
        cls.from_config({"type": cls.TYPE, "diffusers_config": dcfg, "r_embedd": "sum"})
    built = cls.from_config({"diffusers_config": dcfg, "r_embed": "sum"})  # "type" optional
    assert built.config["type"] == cls.TYPE and built.config["r_embed"] == "sum"


def test_native_forward_is_diffusers_own_forward(hv, wan, inputs):
    """`native_forward` (what diffusers' block caches run on) equals the adapters' re-implemented forward,
    and refuses models whose added embedders diffusers' forward cannot see."""
    x, t, text, g = inputs
    with torch.no_grad():
        assert _max_diff(hv.native_forward(x, t, text), hv.run(x, t, text).velocity) < ATOL
        assert _max_diff(wan.native_forward(x, t, text), wan.run(x, t, text).velocity) < ATOL
        guided = HunyuanVideoBackbone(_hv_model(guidance_embeds=True))
        assert _max_diff(guided.native_forward(x, t, text, g), guided.run(x, t, text, guidance=g).velocity) < ATOL
    with pytest.raises(ValueError, match="pass guidance"):
        guided.native_forward(x, t, text)
    stage2 = HunyuanVideoBackbone(_hv_model(guidance_embeds=False), r_embed="sum")
    with pytest.raises(ValueError, match="no r input"):
        stage2.native_forward(x, t, text)
    distilled_wan = WanBackbone(_wan_model(), guidance_embed=True)
    with pytest.raises(ValueError, match="added guidance embedding"):
        distilled_wan.native_forward(x, t, text, g)
