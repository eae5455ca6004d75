"""The official DisCa release's key layout (SPEC §9.4) converts into this project's exports, strictly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from integration.__main__ import main as integration_main
from integration.official import dit_slot, predictor_slot, to_official
from models.hunyuan_video import HunyuanVideoBackbone
from models.io import load_backbone
from models.predictor import Predictor, load_predictor
from tests.conftest import perturb
from tiny_pipelines import tiny_hunyuan_transformer_config

H, MLP = 16, 64  # tiny: 2 heads x 8, mlp_ratio 4


def official_dit_keys() -> set[str]:
    """The original HunyuanVideo layout for 1 refiner, 1 double and 1 single block, plus DisCa's time_r_in."""
    wb = lambda *names: {f"{n}.{p}" for n in names for p in ("weight", "bias")}  # noqa: E731
    ref = "txt_in.individual_token_refiner.blocks.0"
    keys = wb("img_in.proj", "txt_in.input_embedder", "txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2",
              "txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2", *(f"{ref}.{n}" for n in (
                  "norm1", "self_attn_qkv", "self_attn_proj", "norm2", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")),
              "time_in.mlp.0", "time_in.mlp.2", "vector_in.in_layer", "vector_in.out_layer", "guidance_in.mlp.0",
              "guidance_in.mlp.2", *(f"double_blocks.0.{n}" for n in (
                  "img_mod.linear", "txt_mod.linear", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                  "img_mlp.fc1", "img_mlp.fc2", "txt_mlp.fc1", "txt_mlp.fc2")),
              "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.linear",
              "final_layer.linear", "final_layer.adaLN_modulation.1", "time_r_in.mlp.0", "time_r_in.mlp.2")
    keys |= {f"double_blocks.0.{n}.weight" for n in ("img_attn_q_norm", "img_attn_k_norm", "txt_attn_q_norm",
                                                      "txt_attn_k_norm")}
    return keys | {"single_blocks.0.q_norm.weight", "single_blocks.0.k_norm.weight"}


def official_predictor_keys() -> set[str]:
    keys = {f"fusion_mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for b in (0, 1):
        keys |= {f"mm_single_blocks.{b}.{n}.{p}" for n in ("linear1", "linear2", "modulation.linear")
                 for p in ("weight", "bias")}
        keys |= {f"mm_single_blocks.{b}.{n}.weight" for n in ("q_norm", "k_norm")}
    return keys


@pytest.fixture
def official(tmp_path):
    """A tiny stage-2 model + official-design predictor, written under the official names, and its config."""
    torch.manual_seed(0)
    backbone = perturb(HunyuanVideoBackbone.from_config({"diffusers_config": tiny_hunyuan_transformer_config(),
                                                         "guidance_embed": True, "r_embed": "average"})).eval()
    predictor = perturb(Predictor(backbone), seed=1).eval()
    dit, pred = to_official(backbone.state_dict(), dit_slot), to_official(predictor.state_dict(), predictor_slot)
    save_file(dit, str(tmp_path / "dit.safetensors"))
    save_file({f"predictor.{k}": v for k, v in pred.items()}, str(tmp_path / "pred.safetensors"))  # release prefix
    (tmp_path / "config.json").write_text(json.dumps(tiny_hunyuan_transformer_config()))
    return backbone, predictor, dit, pred, tmp_path


def test_official_names_and_shapes(official):
    backbone, predictor, dit, pred, _ = official
    assert set(dit) == official_dit_keys()
    assert set(pred) == official_predictor_keys()
    assert dit["double_blocks.0.img_attn_qkv.weight"].shape == (3 * H, H)
    assert dit["single_blocks.0.linear1.weight"].shape == (3 * H + MLP, H)  # rows q, k, v, mlp
    assert pred["mm_single_blocks.1.linear1.weight"].shape == (3 * H + MLP, H)
    assert pred["fusion_mlp.0.weight"].shape == (H, 2 * H)
    s = backbone.state_dict()
    q, k, v, m = dit["single_blocks.0.linear1.weight"].split([H, H, H, MLP])
    blk = "model.single_transformer_blocks.0"
    assert torch.equal(k, s[f"{blk}.attn.to_k.weight"]) and torch.equal(m, s[f"{blk}.proj_mlp.weight"])
    # the original final layer is (shift, scale); diffusers' norm_out is (scale, shift)
    assert torch.equal(dit["final_layer.adaLN_modulation.1.weight"][:H], s["model.norm_out.linear.weight"][H:])


def test_convert_loads_strictly_and_round_trips(official):
    backbone, predictor, dit, pred, d = official
    integration_main(["convert-official", "--dit", str(d / "dit.safetensors"), "--predictor",
                      str(d / "pred.safetensors"), "--out", str(d / "out"),
                      "--transformer_config", str(d / "config.json")])
    loaded = load_backbone(d / "out" / "restricted_meanflow").eval()  # strict: names and shapes
    loaded_p = load_predictor(d / "out" / "predictor", loaded).eval()
    for a, b in ((backbone, loaded), (predictor, loaded_p)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded.r_embed == "average" and loaded.guidance_embed
    assert set(to_official(loaded.state_dict(), dit_slot)) == set(dit)  # and back to the official names


def test_unknown_missing_and_wrong_model_fail_naming_it(official):
    from integration.official import convert_official

    backbone, predictor, dit, pred, d = official
    cfg = d / "config.json"
    save_file({**dit, "double_blocks.0.extra_gate.weight": torch.zeros(1)}, str(d / "extra.safetensors"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['double_blocks\.0\.extra_gate\.weight'\]"):
        convert_official(d / "o", dit=d / "extra.safetensors", transformer_config=cfg)
    save_file({k: v for k, v in dit.items() if k != "single_blocks.0.q_norm.weight"}, str(d / "miss.safetensors"))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['single_blocks\.0\.q_norm\.weight'\]"):
        convert_official(d / "o", dit=d / "miss.safetensors", transformer_config=cfg)
    with pytest.raises(ValueError, match=r"pred\.safetensors is a predictor checkpoint; --dit expects"):
        convert_official(d / "o", dit=d / "pred.safetensors", transformer_config=cfg)
    with pytest.raises(ValueError, match=r"dit\.safetensors is a DiT checkpoint; --predictor expects"):
        convert_official(d / "o", predictor=d / "dit.safetensors", transformer_config=cfg)
    # the tiny checkpoint against the real HunyuanVideo 1.0 architecture: another model (60 blocks, not 2)
    with pytest.raises(ValueError, match=r"dit\.safetensors: missing key\(s\) \['double_blocks\.1\."):
        convert_official(d / "o", dit=d / "dit.safetensors")
    wider = {**tiny_hunyuan_transformer_config(), "attention_head_dim": 16, "rope_axes_dim": [4, 4, 8]}
    (d / "wider.json").write_text(json.dumps(wider))  # same blocks, another width: named by key and shape
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+.*\), the HunyuanVideo 1\.0 T2V architecture expects"):
        convert_official(d / "o", dit=d / "dit.safetensors", transformer_config=d / "wider.json")
    assert not (d / "o").exists()


def test_official_schedules_are_presets():
    from sampling.cached import SCHEDULE_PRESETS, check_schedule

    assert SCHEDULE_PRESETS["official_hunyuan"] == [0, 1, 2, 5, 9, 13, 17, 19]  # apply_disca.py default, 8 of 20
    assert SCHEDULE_PRESETS["official_hunyuan_10"] == [0, 1, 2, 5, 9, 11, 13, 15, 17, 19]  # single-GPU script
    assert check_schedule(SCHEDULE_PRESETS["official_hunyuan_10"], 20)


def test_converted_official_model_attaches_as_a_diffusers_transformer(official):
    """convert-official -> export-diffusers -> the backbone and predictor load back for apply_disca."""
    from integration.transformer import load_diffusers_export

    backbone, predictor, dit, pred, d = official
    integration_main(["convert-official", "--dit", str(d / "dit.safetensors"), "--predictor",
                      str(d / "pred.safetensors"), "--out", str(d / "out"),
                      "--transformer_config", str(d / "config.json")])
    integration_main(["export-diffusers", "--export", str(d / "out" / "restricted_meanflow"), "--out", str(d / "tr")])
    again = load_diffusers_export(d / "tr")
    sa, sb = backbone.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    loaded_p = load_predictor(d / "out" / "predictor", again)  # the predictor's backbone config matches
    assert all(torch.equal(a, b) for a, b in zip(predictor.state_dict().values(), loaded_p.state_dict().values()))
