"""The learnable predictor (models/predictor.py): architecture, parameter budget, ownership, export."""
from __future__ import annotations

import pytest
import torch

from models.io import save_backbone
from models.mmdit import MMDiT
from models.predictor import (PREDICTOR_PRESETS, Predictor, ReusePredictor, load_predictor, parameter_count,
                              parameter_share, save_predictor, subsample_rope)
from models.protocol import TextCond

TINY = {"guidance_embed": True, "r_embed": "average", "text_dim": 16, "pooled_dim": 8, "patch_size": [1, 4, 4]}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Freshly built DiTs output zeros (adaLN-Zero); perturb every weight so outputs are informative."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data.normal_(0, 0.05, generator=gen)
    return model


def tiny_backbone(**overrides) -> MMDiT:
    torch.manual_seed(0)
    return perturbed(MMDiT(size="tiny", config={**TINY, **overrides})).requires_grad_(False).eval()


def inputs(b: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 2, 8, 8, generator=gen)
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[0, 3:] = False  # right-padded prompt
    text = TextCond(torch.randn(b, 5, 16, generator=gen), mask, torch.randn(b, 8, generator=gen))
    t = torch.full((b,), 0.7)
    r = torch.full((b,), 0.6)
    g = torch.full((b,), 4.0)
    return x, t, r, text, g


def test_forward_shape_and_cache_is_the_hidden_state():
    bb = tiny_backbone()
    pred = Predictor(bb, **PREDICTOR_PRESETS["tiny"])
    x, t, r, text, g = inputs()
    out = bb.run(x, t, text, r, g, return_hidden=True)
    assert out.hidden.shape == (2, 2 * 2 * 2 + 5, bb.hidden_size)  # one tensor: image + text tokens
    u = pred(bb, x, t - 0.1, r - 0.1, text, out.hidden, g)
    assert u.shape == x.shape and torch.isfinite(u).all()


def test_backbone_is_not_part_of_the_predictor():
    bb = tiny_backbone()
    pred = Predictor(bb, **PREDICTOR_PRESETS["tiny"])
    backbone_keys = set(bb.state_dict())
    assert not backbone_keys & set(pred.state_dict())
    assert not any(k.startswith(("final.", "img_in.", "txt_in.", "time_in.")) for k in pred.state_dict())
    assert all(p.data_ptr() not in {q.data_ptr() for q in bb.parameters()} for p in pred.parameters())


def test_gradients_reach_predictor_only():
    bb = tiny_backbone()
    pred = Predictor(bb, hidden_size=8, mlp_ratio=2.0, num_heads=1)  # no residual: every weight is on the path
    x, t, r, text, g = inputs()
    cache = bb.run(x, t, text, r, g, return_hidden=True).hidden
    pred(bb, x, t - 0.1, r - 0.1, text, cache, g).pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pred.parameters())
    assert all(p.grad is None for p in bb.parameters())


def test_untrained_residual_predictor_equals_training_free_reuse():
    """cache_residual with a zero-initialised output projection starts as head(C, vec) exactly."""
    bb = tiny_backbone()
    pred = Predictor(bb, **PREDICTOR_PRESETS["tiny"])
    x, t, r, text, g = inputs()
    cache = bb.run(x, t, text, r, g, return_hidden=True).hidden
    tp, rp = t - 0.15, r - 0.15
    torch.testing.assert_close(pred(bb, x, tp, rp, text, cache, g), ReusePredictor()(bb, x, tp, rp, text, cache, g),
                               rtol=0, atol=0)


def test_reuse_predictor_on_its_own_step_is_the_model():
    """head(hidden, vec) of the same step is exactly run(): the reuse ablation is the cache through the head."""
    bb = tiny_backbone()
    x, t, r, text, g = inputs()
    out = bb.run(x, t, text, r, g, return_hidden=True)
    torch.testing.assert_close(ReusePredictor()(bb, x, t, r, text, out.hidden, g), out.velocity, rtol=0, atol=0)


def test_full_width_official_design():
    bb = tiny_backbone()
    pred = Predictor(bb)  # Hp = H, no projections, no residual
    assert isinstance(pred.vec_in, torch.nn.Identity) and isinstance(pred.out_proj, torch.nn.Identity)
    assert pred.config == {"hidden_size": 32, "num_blocks": 2, "mlp_ratio": None, "num_heads": 2,
                           "cache_residual": False}
    x, t, r, text, g = inputs()
    cache = bb.run(x, t, text, r, g, return_hidden=True).hidden
    assert pred(bb, x, t, r, text, cache, g).shape == x.shape


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_builtin_presets_stay_under_four_percent(size):
    with torch.device("meta"):  # no memory: only parameter counts matter
        bb = MMDiT(size=size, config={"guidance_embed": True, "r_embed": "average"})
        pred = Predictor(bb, **PREDICTOR_PRESETS[size])
    share = parameter_share(pred, bb)
    assert 0.005 < share < 0.04, f"{size}: predictor is {100 * share:.2f}% of the backbone"


def test_hunyuan_video_13b_share_on_meta_device():
    """The real HunyuanVideo 13B config (diffusers defaults: 20 double + 40 single blocks, 24 x 128 heads),
    through the adapter, with the official full-width predictor: ~2.4% < 4%."""
    from diffusers import HunyuanVideoTransformer3DModel

    from models.hunyuan_video import HunyuanVideoBackbone

    with torch.device("meta"):
        dit = HunyuanVideoTransformer3DModel(num_layers=20, num_single_layers=40, num_attention_heads=24,
                                             attention_head_dim=128, num_refiner_layers=2, mlp_ratio=4.0,
                                             in_channels=16, out_channels=16, patch_size=2, patch_size_t=1,
                                             text_embed_dim=4096, pooled_projection_dim=768,
                                             rope_axes_dim=(16, 56, 56), guidance_embeds=True)
        bb = HunyuanVideoBackbone(dit, r_embed="average")
        pred = Predictor(bb, **PREDICTOR_PRESETS["hunyuan_video"])
    assert 12.8e9 < parameter_count(bb) < 13.2e9
    share = parameter_share(pred, bb)
    assert 0.02 < share < 0.04, f"{100 * share:.2f}%"
    assert all(p.device.type == "meta" for p in pred.parameters())


def test_works_through_the_hunyuan_adapter():
    """A tiny random diffusers HunyuanVideo: the predictor embeds with t (token refiner), reuses its blocks' kind
    and its head."""
    from diffusers import HunyuanVideoTransformer3DModel

    from models.hunyuan_video import HunyuanVideoBackbone

    torch.manual_seed(0)
    dit = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                         patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
                                         rope_axes_dim=(2, 2, 4), guidance_embeds=True)
    bb = perturbed(HunyuanVideoBackbone(dit, r_embed="average")).requires_grad_(False)
    pred = Predictor(bb)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4, generator=gen)
    text = TextCond(torch.randn(2, 5, 16, generator=gen), torch.ones(2, 5, dtype=torch.bool),
                    torch.randn(2, 8, generator=gen))
    t, r, g = torch.full((2,), 0.5), torch.full((2,), 0.4), torch.full((2,), 3.0)
    out = bb.run(x, t, text, r, g, return_hidden=True)
    u = pred(bb, x, t - 0.1, r - 0.1, text, out.hidden, g)
    assert u.shape == x.shape and torch.isfinite(u).all()
    torch.testing.assert_close(ReusePredictor()(bb, x, t, r, text, out.hidden, g), out.velocity)


def test_subsample_rope_keeps_pairs_of_every_axis():
    cos = torch.arange(16.0).repeat_interleave(2).reshape(1, 32).expand(3, 32)  # pair k has value k
    sin = -cos
    c, s = subsample_rope((cos, sin), 8)
    assert c.shape == (3, 8)
    assert c[0].tolist() == [0, 0, 5, 5, 10, 10, 15, 15]  # pairs stay intact, evenly spaced
    torch.testing.assert_close(s, -c)
    assert subsample_rope((cos, sin), 32)[0] is cos
    with pytest.raises(ValueError, match="RoPE dim"):
        subsample_rope((cos, sin), 64)


def test_export_roundtrip_and_backbone_mismatch(tmp_path):
    bb = tiny_backbone()
    pred = Predictor(bb, **PREDICTOR_PRESETS["tiny"])
    for p in pred.parameters():
        p.data.normal_(0, 0.1)
    save_predictor(pred, tmp_path / "p")
    loaded = load_predictor(tmp_path / "p", bb)
    x, t, r, text, g = inputs()
    cache = bb.run(x, t, text, r, g, return_hidden=True).hidden
    torch.testing.assert_close(loaded(bb, x, t, r, text, cache, g), pred(bb, x, t, r, text, cache, g), rtol=0, atol=0)
    # the attention backend is a runtime choice, not a different backbone
    load_predictor(tmp_path / "p", tiny_backbone(attention_backend="math"))
    with pytest.raises(ValueError, match="different backbone.*r_embed"):
        load_predictor(tmp_path / "p", tiny_backbone(r_embed="sum"))
    with pytest.raises(ValueError, match="different backbone.*hidden_size"):
        load_predictor(tmp_path / "p", MMDiT(size="small", config=TINY))
    save_backbone(bb, tmp_path / "backbone")
    with pytest.raises(ValueError, match="not a 'disca_predictor'"):
        load_predictor(tmp_path / "backbone", bb)


def test_bad_inputs_fail_clearly():
    bb = tiny_backbone()
    with pytest.raises(ValueError, match="num_blocks"):
        Predictor(bb, num_blocks=0)
    with pytest.raises(ValueError, match="divisible"):
        Predictor(bb, hidden_size=12, num_heads=5)
    pred = Predictor(bb, **PREDICTOR_PRESETS["tiny"])
    x, t, r, text, g = inputs()
    cache = bb.run(x, t, text, r, g, return_hidden=True).hidden
    with pytest.raises(ValueError, match="cache shape"):
        pred(bb, x, t, r, text, cache[:, :-1], g)
