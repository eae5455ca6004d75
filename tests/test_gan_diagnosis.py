"""benchmarks/gan_diagnosis.py: the separability measures behave (a D alone and the probe separate separable
pairs and stay at chance on identical ones) and the stage-3 code path yields the pairs it claims."""
from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from benchmarks import gan_diagnosis as gd
from datamodules.latent_video import batch_text
from losses.gan import hinge_g_loss
from models.io import save_backbone
from models.predictor import PREDICTOR_PRESETS, Predictor, save_predictor
from tests.conftest import perturb
from tests.test_predictor_gan import batches, tiny_model

GRID = (2, 3, 3)


def features(n: int = 48, dim: int = 8, seed: int = 0) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, GRID[0] * GRID[1] * GRID[2], dim, generator=gen)]



def test_discriminator_alone_separates_separable_pairs_and_not_identical_ones():
    real = features()
    fake = [f.clone() for f in real]
    fake[0][..., 0] -= 3.0  # a clear per-token shift in one channel
    tr, te = gd.split_indices(real[0].shape[0])
    sep = gd.train_discriminator(real, fake, GRID, tr, te, lr=1e-2, channels=8, steps=60, batch=8)
    assert sep["d_test_acc"] > 0.9 and sep["d_test_L_D"] < 1.0
    same = gd.train_discriminator(real, [f.clone() for f in real], GRID, tr, te, lr=1e-2, channels=8, steps=60, batch=8)
    assert same["d_test_acc"] == pytest.approx(0.5) and same["d_test_logit_gap"] == pytest.approx(0.0, abs=1e-6)


def test_linear_probe_and_feature_offset():
    real = features()
    fake = [f + torch.tensor([1.0] + [0.0] * 7) for f in real]
    tr, te = gd.split_indices(real[0].shape[0])
    sep = gd.linear_probe(real, fake, tr, te)
    assert sep["probe_test_acc"] > 0.9 and sep["probe_paired_acc"] == 1.0
    same = gd.linear_probe(real, [f.clone() for f in real], tr, te)
    assert same["probe_test_acc"] == pytest.approx(0.5) and same["probe_paired_acc"] == 0.5
    off = gd.feature_offset(real, fake)
    assert off["token_offset_norm"] == pytest.approx(1.0)  # every token moved by a unit vector
    assert off["feature_offset"] == pytest.approx(1 / 8 ** 0.5, rel=0.1)  # spread: 8 unit-variance channels


def test_pairs_follow_the_stage3_code_path():
    """An untrained predictor (zero-initialised correction) IS the reuse: its error equals the reuse's, its
    correction is 0, so the residual view separates trivially and the x_next view of u* vs u* does not."""
    model = tiny_model()
    module = gd.build_module(model, Predictor(model, **PREDICTOR_PRESETS["tiny"]), delta_max=0.2, restrict=0.2)
    assert module.feature_layers == list(range(model.num_blocks))
    pairs = gd.collect_pairs(module, batches(4, b=4))
    sizes = gd.error_sizes(pairs)
    assert sizes["pairs"] == 16 and sizes["mse_pred"] == pytest.approx(sizes["mse_reuse"])
    assert sizes["correction_energy"] < 1e-5 and 0 < sizes["dt_mean"] <= 0.2
    assert 0 < sizes["x_next_offset_rel"] < sizes["x0_offset_rel"]  # t' - r' <= t'
    # the x_next view is next_features itself: the real input of a pair is F(x_t' - (t' - r') u*)
    s = pairs[0]
    direct, grid = module.next_features(s, s["target"], s["text"])
    v = gd.view_tensors(module, pairs, "x_next")
    torch.testing.assert_close(v["real"][1][:4], direct[1])
    assert v["grid"] == grid and len(v["real"]) == model.num_blocks
    same = gd.view_tensors(module, pairs, "x_next", scale=0.0)  # fake = u* exactly
    assert gd.feature_offset(same["real"], same["fake"])["feature_offset"] == 0.0
    res = gd.view_tensors(module, pairs, "residual")
    assert res["fake"][0].abs().max() < 1e-6 and res["real"][0].abs().max() > 0
    tr, te = gd.split_indices(16)
    assert gd.linear_probe(res["real"], res["fake"], tr, te)["probe_paired_acc"] == 1.0


def test_evaluate_rows_and_cli(tmp_path):
    model = tiny_model()
    pred = Predictor(model, **PREDICTOR_PRESETS["tiny"])
    rows = [gd.Row("base", layers=(0, 1)), gd.Row("residual", view="residual"), gd.Row("k", layers=(1,), scale=0.0),
            gd.Row("dm", layers=(1,), delta_max=0.5, gain=10.0)]
    sizes, results = gd.evaluate_rows(gd.build_module(model, pred, 0.2, 0.2), batches(2, b=4), rows, d_steps=3,
                                      d_batch=4, log=lambda s: None)
    assert sorted(sizes) == [0.2, 0.5] and [r["name"] for r in results] == ["base", "residual", "k", "dm"]
    assert results[2]["feature_offset"] == 0.0 and results[2]["d_test_acc"] == pytest.approx(0.5)
    assert "| residual | residual | - |" in gd.markdown_table(results)
    with pytest.raises(ValueError, match="view 'pixels'"):
        gd.evaluate_rows(gd.build_module(model, pred, 0.2, 0.2), batches(1), [gd.Row("bad", view="pixels")])
    # the CLI end to end on exports and a prepared dataset
    from datamodules.shards import prepare_moving_digits
    from datamodules.text_encoder import TextEncoder
    from models.mmdit import MMDiT

    torch.manual_seed(0)
    backbone = perturb(MMDiT(size="tiny", config={"guidance_embed": True, "r_embed": "average",
                                                   "patch_size": [1, 4, 4]}))
    save_backbone(backbone, tmp_path / "m")
    save_predictor(Predictor(backbone, **PREDICTOR_PRESETS["tiny"]), tmp_path / "p")
    prepare_moving_digits(tmp_path / "d", num_train=4, num_val=8, shard_size=8, seed=0, encoder=TextEncoder())
    common = ["--model_dir", str(tmp_path / "m"), "--predictor_dir", str(tmp_path / "p"), "--data_dir",
              str(tmp_path / "d"), "--batch_size", "4", "--layers", "0", "1"]
    with pytest.raises(ValueError, match="unknown rows"):
        gd.main(common + ["--num_pairs", "8", "--rows", "nope"])
    with pytest.raises(ValueError, match="fewer than 12"):
        gd.main(common + ["--num_pairs", "12", "--rows", "view residual"])
    out = tmp_path / "r.json"
    report = gd.main(common + ["--num_pairs", "8", "--d_steps", "2", "--rows", "view residual", "lr 1e-3",
                               "--out", str(out)])
    assert json.loads(out.read_text())["rows"][0]["name"] == "lr 1e-3" and len(report["rows"]) == 2


def test_residual_discriminator_input_option():
    """discriminator.input 'residual': D sees u - head(C, vec) patchified (an untrained predictor's is 0), trains,
    and its hinge term reaches the predictor; the default stays the paper's x_next."""
    from tests.test_predictor_gan import fit, module

    assert module().d_input == "x_next"
    with pytest.raises(ValueError, match="input 'x0'"):
        module(discriminator=dict(input="x0"))
    mod = module(discriminator=dict(input="residual", channels=8), lam=1.0)
    assert mod.discriminator.heads[0].net[0].in_channels == 3 * 1 * 4 * 4  # C pt ph pw of the tiny MMDiT
    text = batch_text(batches(1)[0])
    s = mod.sample_pairs(batches(1)[0]["latents"], text, torch.Generator().manual_seed(0))
    feats, grid = mod.next_features(s, mod.predict_velocity(s, text), text)
    assert feats[0].shape == (2, grid[0] * grid[1] * grid[2], 48) and feats[0].abs().max() < 1e-6
    real, _ = mod.next_features(s, s["target"], text)
    assert real[0].abs().max() > 1e-3
    torch.testing.assert_close(gd.d_inputs(mod, {**s, "text": text}, s["target"], "residual")[0][0], real[0])
    d0 = [p.detach().clone() for p in mod.discriminator.parameters()]
    fit(mod, 4)  # 2 MSE batches, then 2 GAN batches
    assert any(not torch.equal(a, b) for a, b in zip(d0, mod.discriminator.parameters()))
    g_loss = hinge_g_loss(mod.discriminator(*mod.next_features(s, mod.predict_velocity(s, text), text)))
    (grad,) = torch.autograd.grad(g_loss, mod.predictor.out_proj.weight)
    assert grad.abs().max() > 0  # the adversarial term reaches the predictor


def test_discriminator_gain_scales_its_input():
    from models.discriminator import Discriminator

    torch.manual_seed(0)
    d1 = Discriminator(8, 1, channels=4).eval()
    d10 = Discriminator(8, 1, channels=4, gain=10.0).eval()
    d10.load_state_dict(d1.state_dict())
    x = features(n=2)
    torch.testing.assert_close(d10(x, GRID), d1([10 * x[0]], GRID))
    with pytest.raises(ValueError, match="gain must be > 0, got 0"):
        Discriminator(8, 1, gain=0.0)


def test_cached_sample_error_of_an_untrained_predictor_is_the_reuse():
    model = tiny_model()
    pred = Predictor(model, **PREDICTOR_PRESETS["tiny"])  # zero correction: head(C, vec) = the reuse
    err = gd.cached_sample_error(model, pred, batches(1), num_steps=10, interval=4)
    assert err["sample_mse_reuse"] > 0
    assert err["sample_mse_predictor"] == pytest.approx(err["sample_mse_reuse"], rel=1e-4)
