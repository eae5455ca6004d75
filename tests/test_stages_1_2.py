"""Stage 1 (CFGDistillModule) and stage 2 (RestrictedMeanFlowModule): students start equal to their
teachers, the targets are the paper's, training reduces the loss, the NaN guard names the step, the
samplers run on both students, and the smoke configs train and export through `train.main`."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

import train
from datamodules.latent_video import batch_text
from lightning_modules.cfg_distill import CFGDistillModule
from lightning_modules.meanflow import RestrictedMeanFlowModule
from models.io import load_backbone
from models.mmdit import MMDiT
from sampling.sampler import ModelVelocity, sample, time_grid
from tests.conftest import perturb, tiny_text

TINY = {"patch_size": (1, 4, 4)}


def cfg_teacher() -> MMDiT:
    torch.manual_seed(0)
    return perturb(MMDiT(size="tiny", config=TINY), seed=1).eval()


def distilled_teacher(std: float = 0.05) -> MMDiT:
    torch.manual_seed(0)
    return perturb(MMDiT(size="tiny", config={**TINY, "guidance_embed": True}), std=std, seed=2).eval()


def tiny_batch(batch: int = 2, seed: int = 0) -> dict:
    text = tiny_text(batch, seed=seed)
    latents = torch.rand(batch, 3, 2, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return {"latents": latents, "text_tokens": text.tokens, "text_mask": text.mask, "pooled": text.pooled}


# --- students start equal to their teachers ----------------------------------------------------------------
def test_cfg_student_starts_equal_to_teacher_conditional(tiny_video):
    teacher = cfg_teacher()
    module = CFGDistillModule(teacher)
    text, t = tiny_text(), torch.tensor([0.3, 0.9])
    assert module.student.config["guidance_embed"] and not teacher.config["guidance_embed"]
    expected = teacher.run(tiny_video, t, text).velocity
    assert expected.abs().mean() > 0
    for g in (1.0, 4.5, 8.0):
        got = module.student.run(tiny_video, t, text, guidance=torch.full((2,), g)).velocity
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # float32 GEMMs of copies: ~1e-7
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert all(p.requires_grad for p in module.student.parameters())


@pytest.mark.parametrize("mode", ["average", "sum", "interval"])
def test_meanflow_student_starts_equal_to_stage1_at_r_equal_t(mode, tiny_video):
    teacher = distilled_teacher()
    module = RestrictedMeanFlowModule(teacher, r_embed=mode)
    text, t, g = tiny_text(), torch.tensor([0.3, 0.9]), torch.tensor([2.0, 6.0])
    assert module.student.config["r_embed"] == mode
    expected = teacher.run(tiny_video, t, text, guidance=g).velocity
    got = module.student.run(tiny_video, t, text, r=t, guidance=g).velocity
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # float32 GEMMs of copies: ~1e-7
    if mode == "average":  # the copied r embedder makes r != t a different input from the start
        assert not torch.equal(module.student.run(tiny_video, t, text, r=t - 0.2, guidance=g).velocity, expected)


# --- the targets are the paper's ---------------------------------------------------------------------------
def test_cfg_target_at_guidance_one_is_the_conditional_branch():
    """g = 1: v_tgt = v_c, which the initial student already predicts (loss 0); g > 1 mixes in v_uc."""
    null = tiny_text(1, seed=9)
    at_one = CFGDistillModule(cfg_teacher(), guidance_min=1.0, guidance_max=1.0)
    assert at_one.loss_terms(at_one.student, tiny_batch(), null)["loss"].item() < 1e-12  # batch 2B vs B: rounding
    at_four = CFGDistillModule(cfg_teacher(), guidance_min=4.0, guidance_max=4.0)
    assert at_four.loss_terms(at_four.student, tiny_batch(), null)["loss"].item() > 1e-6


def test_meanflow_target_at_r_equal_t_is_the_teacher_velocity():
    """All r = t: u_tgt = v, which the initial student predicts (loss 0); intervals > 0 do not."""
    equal = RestrictedMeanFlowModule(distilled_teacher(), equal_fraction=1.0)
    terms = equal.loss_terms(tiny_batch(), torch.Generator().manual_seed(0))
    assert terms["loss"].item() < 1e-12 and torch.equal(terms["u_tgt"], terms["v"])  # u has grad: rounding only
    assert terms["interval"].abs().max() == 0
    restricted = RestrictedMeanFlowModule(distilled_teacher(), restrict=0.4)
    terms = restricted.loss_terms(tiny_batch(), torch.Generator().manual_seed(0))
    assert terms["loss"].item() > 0 and terms["interval"].max() <= 0.4
    assert terms["dudt"].abs().mean() > 0


def test_meanflow_sampler_option_draws_logit_normal_pairs_and_sums_the_error():
    """t_r_sampler='meanflow': sorted logit-normal pairs with a share of r = t (no r = 0), and the loss is
    the official weighting of each sample's summed squared error."""
    module = RestrictedMeanFlowModule(distilled_teacher(), t_r_sampler="meanflow", restrict=1.0,
                                      time_distribution="logit_normal", time_mean=-0.4, equal_fraction=0.5,
                                      adaptive_power=1.0, loss_reduction="sum")
    s = module.sample_inputs({"latents": torch.zeros(4000, 1)}, torch.Generator().manual_seed(0))
    t, r = s["t"], s["r"]
    assert (t >= r).all() and (r > 0).all() and (r == t).sum().item() == 2000
    batch = tiny_batch()
    terms = module.loss_terms(batch, torch.Generator().manual_seed(1))
    s = module.sample_inputs(batch, torch.Generator().manual_seed(1))  # the same draws
    with torch.no_grad():
        u = module.student.run(s["x_t"], s["t"], batch_text(batch), r=s["r"], guidance=s["g"]).velocity
    err = (u - terms["u_tgt"]).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(terms["loss"], (err / (err.detach() + 1e-3)).mean())


def test_the_meanflow_config_is_meanflows_imagenet_recipe():
    """configs/meanflow.yaml is MeanFlow's ImageNet recipe (Gsunshine/meanflow configs/default.py, SPEC §10.1):
    every batch has exactly int(0.75 B) pairs at r = t, both times lognorm(-0.4, 1.0) sorted, and the adaptive
    weight 1 / (per-sample sum + 0.01)^1."""
    import yaml

    from tests.conftest import ROOT
    args = yaml.safe_load((ROOT / "configs/meanflow.yaml").read_text())["model"]["init_args"]
    args.pop("teacher")
    assert (args["t_r_sampler"], args["restrict"], args["adaptive_power"], args["adaptive_eps"],
            args["loss_reduction"]) == ("meanflow", 1.0, 1.0, 0.01, "sum")
    assert (args["time_mean"], args["time_std"], args["time_r_mean"], args["time_r_std"]) == (-0.4, 1.0, -0.4, 1.0)
    module = RestrictedMeanFlowModule(distilled_teacher(), **args)
    for b in (32, 7, 1):
        for seed in range(3):
            s = module.sample_inputs({"latents": torch.zeros(b, 1)}, torch.Generator().manual_seed(seed))
            assert (s["r"] == s["t"]).sum().item() == int(0.75 * b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(restrict=0.0), "restrict factor"),
    (dict(restrict=1.2), "restrict factor"),
    (dict(equal_fraction=-0.1), "equal_fraction"),
    (dict(jvp_attention="flash"), "jvp_attention"),
    (dict(guidance_min=5.0, guidance_max=2.0), "guidance_min"),
    (dict(adaptive_power=-1.0), "adaptive_power"),
    (dict(r_embed="concat"), "r_embed mode"),
    (dict(t_r_sampler="meanflow"), "needs restrict=1.0"),  # the default restrict is 0.2
    (dict(t_r_sampler="logit"), "t_r_sampler 'logit' not in"),
    (dict(loss_reduction="max"), "loss_reduction"),
])
def test_meanflow_module_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RestrictedMeanFlowModule(distilled_teacher(), **kwargs)


def test_meanflow_module_needs_a_guidance_distilled_teacher():
    with pytest.raises(ValueError, match="stage-1"):
        RestrictedMeanFlowModule(cfg_teacher())
    with pytest.raises(ValueError, match="guidance_min"):
        CFGDistillModule(cfg_teacher(), guidance_min=-1.0)


# --- training --------------------------------------------------------------------------------------------------
def test_stage2_loss_decreases_on_a_fixed_batch():
    """The target moves with the student's own du/dt (a semi-gradient fixed-point iteration). A teacher
    with moderate time derivatives (perturbation std 0.02) is fitted steadily (measured 20x lower in 30
    steps); with std 0.05 the random network's steep time dependence makes the student's du/dt grow and
    the MSE stalls after a 3x drop."""
    module = RestrictedMeanFlowModule(distilled_teacher(std=0.02), restrict=0.4)
    batch = tiny_batch(4)
    opt = torch.optim.Adam(module.student.parameters(), lr=1e-3)
    mses = []
    for _ in range(30):
        terms = module.loss_terms(batch, torch.Generator().manual_seed(0))  # same x_t, t, r, g every step
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        mses.append(terms["mse"].item())
    assert mses[-1] < 0.2 * mses[0], mses
    assert all(later < earlier for earlier, later in zip(mses[::10], mses[10::10])), mses


def test_nan_guard_names_the_step_and_the_term(tmp_path: Path):
    good, bad = tiny_batch(2, seed=0), tiny_batch(2, seed=1)
    bad["latents"][0, 0, 0, 0, 0] = float("nan")
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite v at global step 1"):
        trainer.fit(RestrictedMeanFlowModule(distilled_teacher()), train_dataloaders=DataLoader([good, bad], batch_size=None))


# --- samplers on the students ------------------------------------------------------------------------------------
def test_samplers_run_on_both_students(tiny_video):
    text = tiny_text()
    stage1 = CFGDistillModule(cfg_teacher()).sampling_model()
    velocity = ModelVelocity(stage1, text, mode="plain", guidance=4.0)
    out = sample(velocity, tiny_video, time_grid(3))
    assert velocity.nfe == 3 and out.shape == tiny_video.shape and torch.isfinite(out).all()
    # at initialisation the distilled Euler sampler is the teacher's conditional Euler sampler
    ref = sample(ModelVelocity(cfg_teacher(), text, mode="plain"), tiny_video, time_grid(3))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    stage2 = RestrictedMeanFlowModule(distilled_teacher()).sampling_model()
    velocity = ModelVelocity(stage2, text, mode="meanflow", guidance=4.0)
    out = sample(velocity, tiny_video, time_grid(1))
    assert velocity.nfe == 1
    one, zero, g = torch.ones(2), torch.zeros(2), torch.full((2,), 4.0)
    torch.testing.assert_close(out, tiny_video - stage2.run(tiny_video, one, text, r=zero, guidance=g).velocity)
    velocity = ModelVelocity(stage2, text, mode="meanflow", guidance=4.0)
    assert torch.isfinite(sample(velocity, tiny_video, time_grid(5, shift=3.0))).all() and velocity.nfe == 5


# --- the smoke configs through the real CLI -----------------------------------------------------------------------
@pytest.mark.parametrize("stage, extra", [("cfg_distill", "guidance_embed"), ("restricted_meanflow", "r_embed"),
                                          ("meanflow", "r_embed")])
def test_smoke_config_trains_and_exports(stage, extra, tmp_path: Path):
    metrics = train.main(["--config", f"configs/smoke/{stage}.yaml", "--trainer.default_root_dir", str(tmp_path)])
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    model = load_backbone(tmp_path / "export")
    assert model.config[extra] not in (None, False)
    assert model.config["guidance_embed"]
    if stage in ("restricted_meanflow", "meanflow"):
        assert {"train/mse", "train/dudt_abs", "train/interval", "val/u_error", "val/v_as_u_error"} <= set(metrics)
    else:
        assert "val/loss" in metrics
