"""A trained stage as a diffusers save_pretrained transformer: plain diffusers loads it; the added embedders
(r, and Wan's guidance) come back through integration.transformer."""
from __future__ import annotations

import pytest
import torch

from integration.transformer import export_diffusers, load_diffusers_export, read_disca_config
from models.hunyuan_video import HunyuanVideoBackbone
from models.wan import WanBackbone
from tests.conftest import perturb
from tiny_pipelines import tiny_hunyuan_transformer_config, tiny_wan_transformer_config


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_export_diffusers_round_trip(tmp_path, family):
    torch.manual_seed(0)
    if family == "hunyuan_video":
        from diffusers import HunyuanVideoTransformer3DModel as Plain

        backbone = HunyuanVideoBackbone.from_config({"diffusers_config": tiny_hunyuan_transformer_config(),
                                                     "guidance_embed": True, "r_embed": "average"})
    else:
        from diffusers import WanTransformer3DModel as Plain

        backbone = WanBackbone.from_config({"diffusers_config": tiny_wan_transformer_config(), "guidance_embed": True,
                                            "r_embed": "sum"})
    perturb(backbone)
    export_diffusers(backbone, tmp_path / "t")
    with pytest.raises(FileExistsError, match="pass --overwrite"):  # a previous export is replaced only when asked
        export_diffusers(backbone, tmp_path / "t")
    export_diffusers(backbone, tmp_path / "t", overwrite=True)  # atomic, and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    plain = Plain.from_pretrained(str(tmp_path / "t"))  # diffusers alone loads the transformer
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), backbone.model.state_dict().values()))
    info = read_disca_config(tmp_path / "t")
    extra = sorted(k for k in backbone.state_dict() if not k.startswith("model."))
    assert info["embedder_keys"] == extra and extra  # time_r_in (+ Wan's guidance_in)
    again = load_diffusers_export(tmp_path / "t")
    assert again.config == backbone.config
    sa, sb = backbone.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(FileNotFoundError, match="disca.json"):
        load_diffusers_export(tmp_path / "nothing")
