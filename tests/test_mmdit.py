"""The built-in MMDiT: protocol recomposition, hidden/features, stage extensions, numerics."""
from __future__ import annotations

import pytest
import torch

from models.io import load_backbone, save_backbone
from models.layers import apply_rope, attention, attention_backend, rope_3d
from models.mmdit import MMDIT_SIZES, MMDiT
from models.protocol import FeatureHook, VideoBackbone
from tests.conftest import perturb, tiny_text


def test_protocol_and_recomposition(tiny_mmdit, tiny_video):
    assert isinstance(tiny_mmdit, VideoBackbone)
    text, t = tiny_text(), torch.tensor([0.3, 0.9])
    out = tiny_mmdit.run(tiny_video, t, text, return_hidden=True, feature_layers=[0, 1])
    tokens = tiny_mmdit.embed(tiny_video, text)
    vec = tiny_mmdit.condition(t, None, None, text.pooled)
    hidden, feats = tiny_mmdit.transformer(tokens, vec, feature_layers=[0, 1])
    torch.testing.assert_close(tiny_mmdit.head(hidden, vec, tokens), out.velocity, rtol=0, atol=0)
    assert out.velocity.shape == tiny_video.shape
    assert out.hidden.shape == (2, tokens.num_img + text.tokens.shape[1], tiny_mmdit.hidden_size)
    assert [f.shape for f in out.features] == [(2, tokens.num_img, tiny_mmdit.hidden_size)] * 2
    assert out.velocity.abs().mean() > 0


def test_padding_tokens_do_not_matter(tiny_mmdit, tiny_video):
    text = tiny_text()
    t = torch.tensor([0.5, 0.5])
    base = tiny_mmdit(tiny_video, t, text)
    garbage = text.tokens.clone()
    garbage[0, -2:] = 1e3  # masked positions
    altered = type(text)(garbage, text.mask, text.pooled)
    torch.testing.assert_close(tiny_mmdit(tiny_video, t, altered)[0], base[0], atol=1e-5, rtol=1e-5)


def test_math_attention_matches_sdpa_and_float64(tiny_mmdit, tiny_video):
    text, t = tiny_text(), torch.tensor([0.2, 0.7])
    sdpa = tiny_mmdit(tiny_video, t, text)
    with attention_backend(tiny_mmdit, "math"):
        math_out = tiny_mmdit(tiny_video, t, text)
        ref = tiny_mmdit.double()(tiny_video.double(), t, type(text)(text.tokens.double(), text.mask,
                                                                      text.pooled.double()))
    tiny_mmdit.float()
    torch.testing.assert_close(math_out, sdpa, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sdpa.double(), ref, atol=1e-5, rtol=1e-4)
    assert all(m.attention_backend == "sdpa" for m in tiny_mmdit.modules() if hasattr(m, "attention_backend"))


def test_attention_mask_and_rope_helpers():
    q = torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    out = attention(q, q, q, mask, "math")
    direct = torch.softmax((q @ q.transpose(-1, -2))[..., :2] / 8 ** 0.5, -1) @ q[:, :, :2]
    torch.testing.assert_close(out, direct)
    cos, sin = rope_3d((2, 1, 2), (2, 2, 4))
    rotated = apply_rope(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))  # rotations preserve norms
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, None, "flash3")


def test_guidance_and_r_embeddings_start_equal(tiny_mmdit, tiny_video):
    text, t = tiny_text(), torch.tensor([0.4, 0.8])
    base = tiny_mmdit(tiny_video, t, text)
    tiny_mmdit.enable_guidance_embedding()
    g = torch.tensor([3.0, 7.0])
    torch.testing.assert_close(tiny_mmdit(tiny_video, t, text, guidance=g), base, atol=0, rtol=0)
    for mode in ("average", "sum", "interval"):
        m = MMDiT(config=dict(tiny_mmdit.config))
        m.load_state_dict(tiny_mmdit.state_dict())
        m.enable_r_embedding(mode)
        torch.testing.assert_close(m(tiny_video, t, text, r=t.clone(), guidance=g), base, atol=1e-6, rtol=0)
        perturb(m.time_r_in, seed=3)
        assert not torch.allclose(m(tiny_video, t, text, r=t * 0.5, guidance=g), base)


def test_export_roundtrip_and_mismatch(tmp_path, tiny_mmdit, tiny_video):
    tiny_mmdit.enable_guidance_embedding()
    save_backbone(tiny_mmdit, tmp_path / "a")
    loaded = load_backbone(tmp_path / "a")
    text, t, g = tiny_text(), torch.tensor([0.1, 0.6]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(loaded(tiny_video, t, text, guidance=g), tiny_mmdit(tiny_video, t, text, guidance=g))
    # a checkpoint of another size does not load silently
    save_backbone(MMDiT(size="tiny", config={"hidden_size": 48, "num_heads": 3, "rope_axes_dim": (4, 6, 6)}),
                  tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="does not match the model config"):
        load_backbone(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_backbone(tmp_path / "missing")


def test_bad_inputs_are_named(tiny_mmdit, tiny_video):
    text = tiny_text()
    with pytest.raises(ValueError, match="float32"):
        tiny_mmdit(tiny_video, torch.tensor([0.5, 0.5], dtype=torch.bfloat16), text)
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        tiny_mmdit(tiny_video, torch.tensor([0.5]), text)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        tiny_mmdit(torch.randn(2, 3, 2, 9, 8), torch.tensor([0.5, 0.5]), text)
    with pytest.raises(ValueError, match="unknown MMDiT config keys"):
        MMDiT(size="tiny", config={"hiden_size": 3})
    with pytest.raises(ValueError, match="unknown MMDiT size"):
        MMDiT(size="huge")
    with pytest.raises(ValueError, match="rope_axes_dim"):
        MMDiT(size="tiny", config={"rope_axes_dim": (2, 2, 2)})


def test_hooks_see_every_key_and_can_replace(tiny_mmdit, tiny_video):
    class Recorder(FeatureHook):
        def __init__(self):
            self.keys = []

        def observe(self, key, value):
            self.keys.append(key)

        def delta(self, key, fn):
            self.keys.append(key)
            return fn()

    rec = Recorder()
    text, t = tiny_text(), torch.tensor([0.5, 0.5])
    plain = tiny_mmdit(tiny_video, t, text)
    hooked = tiny_mmdit.run(tiny_video, t, text, hook=rec).velocity
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    assert rec.keys == ["modulated_input", "blocks", "double0.attn", "double0.mlp", "single_blocks",
                        "single0.attn", "single0.mlp"]

    class Skip(FeatureHook):
        def delta(self, key, fn):
            return torch.zeros_like(fn()) if key == "blocks" else fn()

    assert not torch.allclose(tiny_mmdit.run(tiny_video, t, text, hook=Skip()).velocity, plain)


@pytest.mark.parametrize("size", sorted(MMDIT_SIZES))
def test_registry_sizes_build_on_meta(size):
    with torch.device("meta"):
        m = MMDiT(size=size)
    assert m.num_blocks == MMDIT_SIZES[size]["depth_double"] + MMDIT_SIZES[size]["depth_single"]
