"""Stage 3: GAN losses (losses/gan.py), the discriminator (models/discriminator.py) and PredictorGANModule."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from losses.gan import discriminator_accuracy, hinge_d_loss, hinge_g_loss, prediction_mse, predictor_loss
from lightning_modules.predictor_gan import PredictorGANModule
from models.discriminator import Discriminator, dit_features
from models.io import load_backbone
from models.mmdit import MMDiT
from models.predictor import PREDICTOR_PRESETS, load_predictor
from models.protocol import TextCond

TINY = {"guidance_embed": True, "r_embed": "average", "text_dim": 16, "pooled_dim": 8, "patch_size": [1, 4, 4]}


def tiny_model() -> MMDiT:
    torch.manual_seed(0)
    m = MMDiT(size="tiny", config=TINY)
    gen = torch.Generator().manual_seed(0)
    for p in m.parameters():  # adaLN-Zero init outputs zeros: perturb
        p.data.normal_(0, 0.05, generator=gen)
    return m


def batches(n: int, b: int = 2) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        mask = torch.ones(b, 5, dtype=torch.bool)
        mask[0, 3:] = False
        out.append(dict(latents=torch.rand(b, 3, 2, 8, 8, generator=gen) * 2 - 1,
                        text_tokens=torch.randn(b, 5, 16, generator=gen), text_mask=mask,
                        pooled=torch.randn(b, 8, generator=gen)))
    return out


def module(**overrides) -> PredictorGANModule:
    kwargs = dict(predictor=PREDICTOR_PRESETS["tiny"], discriminator=dict(feature_layers=[0, 1], scales=[1, 2],
                                                                         channels=8), mse_warmup_steps=2)
    return PredictorGANModule(tiny_model(), **{**kwargs, **overrides})


def fit(mod: PredictorGANModule, n: int, callbacks=(), **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        **trainer_kwargs)
    trainer.fit(mod, DataLoader(batches(n), batch_size=None))
    return trainer


# --- losses (Eqs. 6-8) ------------------------------------------------------------------------------
def test_hinge_d_loss_eq7_real_is_the_target():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # E[max(0, 1 - real)] = (0 + 0.5) / 2, E[max(0, 1 + fake)] = (0 + 1.5) / 2
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.0))
    assert hinge_d_loss(torch.full((3,), 1.5), torch.full((3,), -1.5)) == 0  # a perfect D has no loss
    # Algorithm 3 line 14's swapped order would make the perfect D maximal instead (the typo):
    assert hinge_d_loss(torch.full((3,), -1.5), torch.full((3,), 1.5)) == 5.0


def test_hinge_g_loss_and_predictor_loss_eq8():
    torch.testing.assert_close(hinge_g_loss(torch.tensor([2.0, -1.0])), torch.tensor(1.0))  # (0 + 2) / 2
    mse, g = torch.tensor(0.25), torch.tensor(1.5)
    torch.testing.assert_close(predictor_loss(mse, g, 1.0), torch.tensor(1.75))
    torch.testing.assert_close(predictor_loss(mse, g, 0.0), mse)
    with pytest.raises(ValueError, match="lambda"):
        predictor_loss(mse, g, -1.0)


def test_prediction_mse_eq6_and_accuracy():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    torch.testing.assert_close(prediction_mse(a, b), torch.tensor(4.0))
    with pytest.raises(ValueError, match="shape"):
        prediction_mse(a, b[:, :2])
    acc = discriminator_accuracy(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0, 1.0]))
    torch.testing.assert_close(acc, torch.tensor((0.5 + 0.75) / 2))


def test_hinge_gradients_push_the_right_way():
    real = torch.tensor([0.0], requires_grad=True)
    fake = torch.tensor([0.0], requires_grad=True)
    hinge_d_loss(real, fake).backward()
    assert real.grad < 0 and fake.grad > 0  # D raises real logits and lowers fake ones
    fake_g = torch.tensor([0.0], requires_grad=True)
    hinge_g_loss(fake_g).backward()
    assert fake_g.grad < 0  # the predictor raises its logits


# --- discriminator and features ---------------------------------------------------------------------
def test_discriminator_multiscale_spectral_norm_logits():
    d = Discriminator(in_dim=32, num_features=2, scales=(1, 2), channels=8)
    assert len(d.heads) == 4
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
    feats = [torch.randn(2, 2 * 4 * 4, 32), torch.randn(2, 2 * 4 * 4, 32)]
    logits = d(feats, (2, 4, 4))
    assert logits.shape == (2, 2 * (2 * 4 * 4 + 2 * 2 * 2))  # per layer: full grid + 2x pooled grid
    with pytest.raises(ValueError, match="2 feature layers"):
        d(feats[:1], (2, 4, 4))
    with pytest.raises(ValueError, match="scales"):
        Discriminator(32, 1, scales=(0,))


def test_frozen_dit_features_pass_gradients_to_the_input_only():
    m = tiny_model().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 8, 8, generator=gen, requires_grad=True)
    text = TextCond(torch.randn(2, 5, 16, generator=gen), torch.ones(2, 5, dtype=torch.bool),
                    torch.randn(2, 8, generator=gen))
    t, g = torch.full((2,), 0.5), torch.full((2,), 3.0)
    feats, grid = dit_features(m, x, t, text, t - 0.1, g, [0, 1])
    assert grid == (2, 2, 2) and [f.shape for f in feats] == [(2, 8, 32)] * 2
    same = m.run(x, t, text, t - 0.1, g, feature_layers=[0, 1]).features
    for a, b in zip(feats, same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sum(f.sum() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())


# --- the LightningModule ----------------------------------------------------------------------------
class StepAudit(L.Callback):
    """Snapshots around every optimizer step: which parameters each step changes, and whether one
    player's backward leaves gradients in the other's parameters."""

    def __init__(self):
        self.kinds: list[str] = []
        self.violations: list[str] = []

    def on_train_start(self, trainer, pl_module):
        opt_p, opt_d = trainer.optimizers
        P, D = list(pl_module.predictor.parameters()), list(pl_module.discriminator.parameters())

        def snap(params):
            return [p.detach().clone() for p in params]

        def grads(params):
            return [None if p.grad is None else p.grad.detach().clone() for p in params]

        def same(a, b):
            return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                       for x, y in zip(a, b))

        state = {"p_grads_after_p": grads(P), "d_grads_after_d": grads(D)}

        def pre(name, mine, other, other_grads_key):
            def hook(opt, args, kwargs):
                state["before_mine"], state["before_other"] = snap(mine), snap(other)
                if not same(grads(other), state[other_grads_key]):  # my backward wrote into the other player
                    self.violations.append(f"{name} backward touched the other player's grads")
            return hook

        def post(name, mine, other, key):
            def hook(opt, args, kwargs):
                self.kinds.append(name)
                if not same(snap(other), state["before_other"]):
                    self.violations.append(f"{name} step changed the other player's weights")
                if same(snap(mine), state["before_mine"]):
                    self.violations.append(f"{name} step did not change its own weights")
                state[key] = grads(mine)
            return hook

        opt_p.register_step_pre_hook(pre("P", P, D, "d_grads_after_d"))
        opt_p.register_step_post_hook(post("P", P, D, "p_grads_after_p"))
        opt_d.register_step_pre_hook(pre("D", D, P, "p_grads_after_p"))
        opt_d.register_step_post_hook(post("D", D, P, "d_grads_after_d"))


def test_alternating_steps_frozen_dit_and_isolated_players():
    mod = module(mse_warmup_steps=2)
    frozen = {k: v.clone() for k, v in mod.model.state_dict().items()}
    audit = StepAudit()
    trainer = fit(mod, 4, callbacks=[audit])
    # 2 MSE warm-up batches (P only), then per batch a D step followed by a P step
    assert audit.kinds == ["P", "P", "D", "P", "D", "P"], audit.kinds
    assert audit.violations == []
    assert mod.batches_seen == 4 and trainer.global_step == 6  # global_step counts optimizer steps
    # the frozen DiT: bit-identical, no grads, never trainable, kept in eval mode
    for k, v in mod.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(not p.requires_grad and p.grad is None for p in mod.model.parameters())
    assert not mod.model.training
    m = trainer.callback_metrics
    for key in ["train/L_D", "train/L_P", "train/mse", "train/g_loss", "train/d_real_logit", "train/d_fake_logit",
                "train/d_accuracy", "train/step_kind"]:
        assert key in m and torch.isfinite(m[key]), key
    assert m["train/step_kind"] == 1
    torch.testing.assert_close(m["train/L_P"], m["train/mse"] + m["train/g_loss"])  # lam = 1


def test_no_gan_ablation_never_steps_the_discriminator():
    mod = module(lam=0.0, mse_warmup_steps=1)
    d0 = {k: v.clone() for k, v in mod.discriminator.state_dict().items()}
    audit = StepAudit()
    trainer = fit(mod, 3, callbacks=[audit])
    assert audit.kinds == ["P", "P", "P"] and audit.violations == []
    assert trainer.callback_metrics["train/step_kind"] == 0 and "train/L_D" not in trainer.callback_metrics
    assert all(torch.equal(v, d0[k]) for k, v in mod.discriminator.state_dict().items())


def test_batch_counter_survives_checkpoints_and_validation_compares_to_reuse(tmp_path):
    mod = module(mse_warmup_steps=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0)
    trainer.fit(mod, DataLoader(batches(3), batch_size=None), DataLoader(batches(1), batch_size=None))
    assert {"val/mse", "val/mse_reuse"} <= set(trainer.callback_metrics)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    fresh = module(mse_warmup_steps=2)
    fresh.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
    assert fresh.batches_seen == 3


def test_per_sample_generators_draw_the_same_in_any_batch_split():
    """With one generator per sample (stage 3's training draws) a batch of 2 draws what two batches of 1
    draw, cache and target included: what makes one process with the global batch the twin of 2 ranks."""
    from datamodules.latent_video import batch_text

    mod = module()
    batch = batches(1)[0]

    def pairs(rows: slice, seeds: list[int]) -> dict:
        part = {k: v[rows] for k, v in batch.items()}
        return mod.sample_pairs(part["latents"], batch_text(part), [torch.Generator().manual_seed(s) for s in seeds])

    whole, first, second = pairs(slice(0, 2), [7, 8]), pairs(slice(0, 1), [7]), pairs(slice(1, 2), [8])
    for key in ("t", "r", "tp", "rp", "g", "x_tp", "cache", "target"):
        torch.testing.assert_close(whole[key], torch.cat([first[key], second[key]]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole["t"][0], whole["t"][1])  # the samples' own keys, not one shared draw
    with pytest.raises(ValueError, match="one per sample"):
        pairs(slice(0, 2), [7])


def test_export_is_predictor_only_and_reloads(tmp_path):
    mod = module()
    for p in mod.predictor.parameters():
        p.data.normal_(0, 0.1)
    mod.export(tmp_path / "export")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "export" / "model.safetensors")))
    assert keys == set(mod.predictor.state_dict())
    loaded = load_predictor(tmp_path / "export", mod.model)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, mod.predictor.state_dict()[k])


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="feature_layers"):
        module(discriminator=dict(feature_layers=[5]))
    with pytest.raises(ValueError, match="restrict"):
        module(restrict=0.0)
    with pytest.raises(ValueError, match="guidance"):
        module(guidance_min=4.0, guidance_max=1.0)
    with pytest.raises(ValueError, match="delta_max"):
        module(delta_max=2.0)
    with pytest.raises(ValueError, match="eps_d"):
        module(eps_d=0.0)


# --- the shipped configs, through train.main ----------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
SMOKE_DATA = ["--data.init_args.data_dir", str(ROOT / "outputs/smoke/data"),
              "--data.init_args.prepare_if_missing", "{num_train: 32, num_val: 8, shard_size: 16}"]
ADVERSARIAL_TAGS = {"train/L_D", "train/L_P", "train/mse", "train/g_loss", "train/d_real_logit",
                    "train/d_fake_logit", "train/d_accuracy", "train/step_kind"}


def scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (event_file,) = log_dir.glob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_smoke_config_trains_and_logs_the_adversarial_scalars(tmp_path):
    import train

    metrics = train.main(["--config", str(ROOT / "configs/smoke/predictor_gan.yaml"),
                          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                          *SMOKE_DATA])
    assert ADVERSARIAL_TAGS <= scalar_tags(tmp_path / "tb")
    assert {"val/mse", "val/mse_reuse"} <= set(metrics) and metrics["train/step_kind"] == 1
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
    from evaluation.methods import random_backbone

    backbone = random_backbone("tiny", "meanflow", config={"patch_size": [2, 4, 4]}, seed=0)
    load_predictor(tmp_path / "export", backbone)  # the export names the backbone it belongs to


@pytest.mark.parametrize("name", ["predictor_gan", "predictor_gan_nogan", "predictor_gan_meanflow"])
def test_real_configs_run_on_a_stage2_export(tmp_path, name):
    """The shipped configs, shrunk: a random 'small' stage-2 export stands in for outputs/.../export."""
    import train
    from evaluation.methods import random_backbone
    from models.io import save_backbone

    export = save_backbone(random_backbone("small", "meanflow", config={"patch_size": [1, 4, 4]}), tmp_path / "m")
    train.main(["--config", str(ROOT / f"configs/{name}.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
                "--model.init_args.model.init_args.directory", str(export), "--trainer.max_steps", "3",
                "--model.init_args.mse_warmup_steps", "1", "--data.init_args.batch_size", "2",
                "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false", *SMOKE_DATA])
    tags = scalar_tags(tmp_path / "run/tb")
    assert {"train/L_P", "train/mse", "train/step_kind"} <= tags
    assert (ADVERSARIAL_TAGS <= tags) == (name != "predictor_gan_nogan")
    load_predictor(tmp_path / "run/export", load_backbone(export))
