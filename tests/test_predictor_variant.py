"""The HunyuanVideo 1.5 predictor variant (SPEC §9.4): split cache, separate image / text fusion MLPs, two
double-stream blocks; exported and reloaded like the 1.0 predictor."""
from __future__ import annotations

import pytest
import torch

from models.hunyuan_video import HunyuanVideoBackbone
from models.predictor import Predictor, load_predictor, save_predictor
from models.protocol import TextCond
from models.wan import WanBackbone
from tests.conftest import perturb
from tiny_pipelines import POOLED_DIM, TEXT_DIM, tiny_hunyuan_transformer_config, tiny_wan_transformer_config


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    text = TextCond(torch.randn(2, 6, TEXT_DIM, generator=gen), mask, torch.randn(2, POOLED_DIM, generator=gen))
    t, r, g = torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), torch.tensor([4.0, 6.0])
    return x, t, r, text, g


def test_hunyuan_video_1_5_variant(tmp_path):
    torch.manual_seed(0)
    backbone = perturb(HunyuanVideoBackbone.from_config({"diffusers_config": tiny_hunyuan_transformer_config(),
                                                         "guidance_embed": True, "r_embed": "sum"})).eval()
    pred = perturb(Predictor(backbone, variant="hunyuan_video_1_5"), seed=1).eval()
    keys = set(pred.state_dict())
    assert {"fusion_img.0.weight", "fusion_txt.2.weight"} <= keys and not any(k.startswith("fusion.") for k in keys)
    assert "blocks.1.block.attn.add_q_proj.weight" in keys and "blocks.1.block.ff_context.net.2.weight" in keys
    x, t, r, text, g = _inputs()
    full = backbone.run(x, t, text, r=r, guidance=g, return_hidden=True)
    out = pred(backbone, x, t - 0.1, r - 0.1, text, full.hidden, g)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # split cache: the image part of the cache reaches the output only through fusion_img, the text part
    # only through fusion_txt
    n_img = 2 * 4 * 4
    cache = full.hidden.detach().clone().requires_grad_(True)
    pred(backbone, x, t, r, text, cache, g).sum().backward()
    assert cache.grad[:, :n_img].abs().sum() > 0 and cache.grad[:, n_img:].abs().sum() > 0
    save_predictor(pred, tmp_path / "p")
    again = load_predictor(tmp_path / "p", backbone)
    assert again.cfg.variant == "hunyuan_video_1_5"
    torch.testing.assert_close(again(backbone, x, t, r, text, full.hidden, g),
                               pred(backbone, x, t, r, text, full.hidden, g))


def test_variant_needs_double_stream_blocks():
    wan = WanBackbone.from_config({"diffusers_config": tiny_wan_transformer_config()})
    with pytest.raises(ValueError, match=r"needs a backbone with HunyuanVideo double-stream blocks .* got 'wan'"):
        Predictor(wan, variant="hunyuan_video_1_5")
    with pytest.raises(ValueError, match=r"variant 'v2' not in"):
        Predictor(wan, variant="v2")
