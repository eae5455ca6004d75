"""Stage 3: train DisCa's learnable predictor P with an adversarial discriminator D on the frozen
stage-2 (Restricted MeanFlow) model M (paper §3.3, Algorithm 3, Eqs. 6-8; appendix 6.1).

Per batch, on ONE (x0, eps) pair:
    t ~ time distribution, I ~ U(0, R), r = max(0, t - I)          (restricted pairs, SPEC §2)
    Delta ~ U(0, Delta_max), (t', r') = max(0, (t - Delta, r - Delta))
    C   = M(x_t,  t,  r,  g).hidden      no grad, detached           (the cache, Eq. 4)
    u*  = M(x_t', t', r', g).velocity    no grad                     (the target)
    u   = P(C, x_t', t', r', g)                                       (Eq. 5)
    x_t'' = x_t' - (t' - r') u,  features F = M's image tokens at (t'', r'') = (r', r' - (t' - r'))
The first `mse_warmup_steps` batches train P on Eq. 6 only (paper: 500 iterations). Afterwards each
batch is a D step (Eq. 7, fake from u.detach(), real from u*) followed by a P step (Eq. 8: MSE +
lam * hinge_g, gradients through the frozen M's features into u). lam = 0 is the no-GAN ablation
(no D steps at all).

Counting: with two optimizers in manual mode Lightning's `global_step` counts every `opt.step()`
(1 per warm-up batch, 2 per GAN batch), so warm-up is counted in batches by this module's own
counter (`batches_seen`, saved in checkpoints). The paper's 500 + 1000 iterations are
`trainer.max_steps = 500 + 2 * 1000`. For the same reason checkpoints are taken every N batches
(`callbacks.checkpointing.BatchCheckpoint`), and each sample's times, guidance and noise are drawn from its
own generator keyed by (seed, batch, position in the global batch) (`sample_generators`), so a killed and
resumed run continues the uninterrupted one exactly, and one process holding the whole global batch draws
what the ranks draw: its losses (means over the batch) are the mean of the ranks' and its weights theirs
(the ranks average D's and P's gradients), the 1-process twin of `tests/test_strategy_presets.py`. Manual
optimization has no gradient accumulation (a GAN batch's P step needs D's step on the whole batch first), so
the twin holds the global batch at once rather than accumulating micro-batches.
DDP: the D step leaves P's parameters unused and vice versa: use `trainer.strategy:
ddp_find_unused_parameters_true` (= DDPStrategy(find_unused_parameters=True); SPEC §8).
Strategy presets: `configs/strategy/ddp.yaml` (find_unused_parameters); `fsdp2.yaml` (the frozen DiT per block
+ root, P and D one unit each); `deepspeed_zero3.yaml`: Lightning's DeepSpeed strategy takes one optimizer, so the
engine holds P's optimizer and partitions P and the frozen DiT, while D (small: a few conv heads) stays outside
ZeRO (a plain attribute once the engine is built), replicated, with its own optimizer whose gradients are
averaged across ranks (`ReplicatedOptimizer`); D's weights and optimizer state are saved in the checkpoint's
client state. D's step is plain autograd + its own optimizer (only D changes); P's step
is the engine's backward + step (only P changes): the D/P alternation stays exact.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch import Tensor, nn

from datamodules.latent_video import batch_text
from distributed.sequence_parallel import data_parallel
from distributed.strategies import check_stage_host
from lightning_modules.common import (check_guidance_range, deepspeed_gradient_clipping, finite_or_raise, freeze,
                                      gathered_state_dict, is_deepspeed, materialize_deferred, sample_guidance,
                                      shard_modules, step_generator)
from losses.flow import expand_time, interpolate
from losses.gan import discriminator_accuracy, hinge_d_loss, hinge_g_loss, prediction_mse, predictor_loss
from losses.meanflow import check_restrict, sample_t_r
from models.discriminator import Discriminator, dit_features, patchify, token_channels
from models.predictor import (Predictor, ReusePredictor, embed_tokens, parameter_count, parameter_share,
                              save_predictor)
from models.protocol import TextCond

STEP_MSE, STEP_GAN = 0, 1
D_INPUTS = ("x_next", "residual")  # what D sees of a velocity u (see `next_features`)


def sample_generators(module: L.LightningModule, seed: int, batch: int, size: int) -> list[torch.Generator]:
    """One generator per sample of this rank's `size`-sample slice of training batch `batch`, keyed by
    (seed, batch, position in the global batch = rank * size + i): world_size ranks with `size` samples each
    draw exactly what one process with the global batch of world_size * size draws (the data samplers give
    rank k positions k, k + world_size, ... of one order, so with a per-rank batch of 1 rank k holds the
    1-process batch's sample k)."""
    replicas, rank = data_parallel(module.trainer)  # the S ranks of a sequence-parallel group draw alike
    first = (batch * replicas + rank) * size
    return [step_generator(seed, first + i, module.device) for i in range(size)]


class ReplicatedOptimizer:
    """D's optimizer under DeepSpeed: D is replicated on every rank outside the ZeRO engine, so before each
    step its gradients are averaged across ranks (what DDP would do), then a plain torch step. D's step
    touches only D; the engine's step (P's optimizer) touches only P: the alternation stays exact."""

    def __init__(self, optimizer: torch.optim.Optimizer, on_step=None):
        self.optimizer, self.on_step = optimizer, on_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
        self.optimizer.step()
        if self.on_step is not None:
            self.on_step()  # logged as train/step_kind: MSE-only batch / D step then P step


class PredictorGANModule(L.LightningModule):
    def __init__(self, model: nn.Module, predictor: dict | None = None, discriminator: dict | None = None,
                 delta_max: float = 0.2, restrict: float = 0.2, guidance_min: float = 1.0, guidance_max: float = 8.0,
                 time_distribution: str = "uniform", time_mean: float = 0.0, time_std: float = 1.0,
                 time_shift: float = 1.0, mse_warmup_steps: int = 500, lr_p: float = 1e-4, lr_d: float = 1e-2,
                 lam: float = 1.0, betas_p: tuple[float, float] = (0.9, 0.999),
                 betas_d: tuple[float, float] = (0.5, 0.999), eps_d: float = 1e-8, grad_clip: float = 1.0,
                 seed: int = 0, activation_checkpointing: bool = False):
        """Stage 3: predictor P + discriminator D on the frozen stage-2 model M.

        Args:
            model: the frozen stage-2 (Restricted MeanFlow) model M, also the feature extractor F.
            predictor: kwargs of models.predictor.Predictor (hidden_size, num_blocks, mlp_ratio, num_heads,
                cache_residual).
            discriminator: {feature_layers: [block indices of M], scales: [1, 2], channels: 64, gain: 1.0,
                input: 'x_next'}. gain multiplies D's input (models.discriminator.Discriminator).
                input 'x_next' (default, the paper): D on M's features of x_t''; 'residual': D on the
                correction u - head(C, vec) over the training-free reuse, patchified, without M's
                features (feature_layers unused; results/gan_diagnosis/README.md for why).
            delta_max: largest step Delta between the cached and the predicted time, in [0, 1].
            restrict: R, the largest interval t - r (as in stage 2).
            guidance_min: smallest distilled CFG scale g drawn (ignored without a guidance input).
            guidance_max: largest distilled CFG scale g drawn.
            time_distribution: training times t, 'uniform' or 'logit_normal'.
            time_mean: logit-normal mean.
            time_std: logit-normal standard deviation.
            time_shift: timestep shift applied to t (1 = none).
            mse_warmup_steps: batches of MSE-only training (Eq. 6) before the GAN starts (paper: 500).
            lr_p: Adam learning rate of the predictor.
            lr_d: Adam learning rate of the discriminator.
            lam: weight of the adversarial term in Eq. 8 (0 = the no-GAN ablation).
            betas_p: Adam betas of the predictor.
            betas_d: Adam betas of the discriminator.
            eps_d: Adam epsilon of the discriminator. Adam's first step moves each weight by lr_d * g / (|g| + eps):
                where D's hinge gradient (a difference of near-equal real and fake terms) is near 0, float32
                rounding of g decides the step; a larger eps makes the step a smooth function of g (the
                1-process twin in `tests/test_strategy_presets.py` uses 1e-2 to compare D's weights tightly).
            grad_clip: predictor gradient-norm clipping threshold (0 = off).
            seed: keys each sample's time/noise generator (seed, batch, position in the global batch), so resumes
                are exact and one process with the global batch draws what the ranks draw.
            activation_checkpointing: recompute each block of the frozen DiT in the backward pass.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        check_guidance_range(guidance_min, guidance_max)
        check_restrict(restrict)
        if not 0 <= delta_max <= 1:
            raise ValueError(f"delta_max must be in [0, 1], got {delta_max}")
        if mse_warmup_steps < 0:
            raise ValueError(f"mse_warmup_steps must be >= 0, got {mse_warmup_steps}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not eps_d > 0:
            raise ValueError(f"eps_d (Adam epsilon of the discriminator) must be > 0, got {eps_d}")
        self.automatic_optimization = False
        self.model = freeze(model)
        self.predictor = Predictor(model, **(predictor or {}))
        d_cfg = dict(discriminator or {})
        self.d_input = d_cfg.pop("input", "x_next")
        if self.d_input not in D_INPUTS:
            raise ValueError(f"discriminator input {self.d_input!r} not in {D_INPUTS}")
        layers = sorted(int(i) for i in d_cfg.pop("feature_layers", [model.num_blocks - 1]))
        if not layers or layers[0] < 0 or layers[-1] >= model.num_blocks or len(set(layers)) != len(layers):
            raise ValueError(f"discriminator feature_layers {layers} must be distinct blocks of M, in "
                             f"[0, {model.num_blocks})")
        self.feature_layers = layers
        width, count = (token_channels(model), 1) if self.d_input == "residual" else (model.hidden_size, len(layers))
        self.discriminator = Discriminator(width, count, **d_cfg)
        self.batches_seen = 0

    # --- sharding (FSDP2: the frozen DiT per block + root, P and D as one unit each) ----------------
    def setup(self, stage: str) -> None:
        check_stage_host("predictor_gan", self.trainer.strategy, self.model)

    def configure_model(self) -> None:
        """`activation_checkpointing`: the frozen DiT's blocks recompute in backward (the P step back-propagates
        through its features)."""
        materialize_deferred(self, ("model",))  # DeepSpeed ZeRO-3: the frozen DiT loaded into its partitions
        shard_modules(self, [self.model], [self.model] if self.hparams.activation_checkpointing else [])
        deepspeed_gradient_clipping(self, self.hparams.grad_clip)  # P's, inside the engine
        if self.device_mesh is not None:
            from torch.distributed.fsdp import FSDPModule, fully_shard

            for module in (self.predictor, self.discriminator):
                if not isinstance(module, FSDPModule):
                    fully_shard(module, mesh=self.device_mesh["data_parallel"])

    def train(self, mode: bool = True) -> "PredictorGANModule":
        super().train(mode)
        self.model.eval()  # the frozen DiT never enters training mode
        return self

    # --- checkpointed batch counter (global_step counts optimizer steps, not batches) -------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["predictor_gan_batches_seen"] = self.batches_seen
        if hasattr(self, "replicated_opt_d"):  # D outside the DeepSpeed engine: its weights and optimizer here
            checkpoint["predictor_gan_discriminator"] = self.discriminator.state_dict()
            checkpoint["predictor_gan_opt_d"] = self.replicated_opt_d.optimizer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.batches_seen = int(checkpoint.get("predictor_gan_batches_seen", 0))
        if hasattr(self, "replicated_opt_d") and "predictor_gan_opt_d" in checkpoint:
            self.discriminator.load_state_dict(checkpoint["predictor_gan_discriminator"])
            self.replicated_opt_d.optimizer.load_state_dict(checkpoint["predictor_gan_opt_d"])

    def on_train_start(self) -> None:
        """Torch's distributed-checkpoint loader (FSDP2 resumes) fills an optimizer that has no state with a
        zero-gradient step (`torch.distributed.checkpoint.state_dict._init_optim_state`), leaving Adam at step
        1: resumed before D's first step, every later D step would be bias-corrected as one step later than
        in the uninterrupted run. D has no state before its first GAN batch: drop that filler."""
        hp = self.hparams
        if not (hp.lam > 0 and self.batches_seen > hp.mse_warmup_steps):
            self.stage_optimizers()[1].optimizer.state.clear()

    def on_fit_start(self) -> None:
        share = parameter_share(self.predictor, self.model)
        self.print(f"predictor: {parameter_count(self.predictor):,} parameters = "
                   f"{100 * share:.2f}% of the backbone")

    # --- Algorithm 3, lines 2-8 -------------------------------------------------------------------
    @torch.no_grad()
    def sample_pairs(self, x0: Tensor, text: TextCond,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None) -> dict:
        """Times, the shared noisy inputs, the cache and the target for one batch (all without grad).
        `generator`: one for the whole batch, or one per sample (`sample_generators`: each sample's draws
        then depend on its own key only, not on how many samples share the batch)."""
        hp = self.hparams
        b, dev = x0.shape[0], x0.device
        single = generator is None or isinstance(generator, torch.Generator)
        generators = [generator] if single else list(generator)
        if not single and len(generators) != b:
            raise ValueError(f"sample_pairs needs one generator or one per sample ({b}), got {len(generators)}")
        draws = []
        for gen, x in zip(generators, x0.split(b if single else 1)):
            n = x.shape[0]
            t, r = sample_t_r(n, hp.restrict, distribution=hp.time_distribution, mean=hp.time_mean,
                              std=hp.time_std, shift=hp.time_shift, generator=gen, device=dev)  # (n,) float32
            delta = hp.delta_max * torch.rand(n, generator=gen, device=dev)
            g = sample_guidance(n, hp.guidance_min, hp.guidance_max, generator=gen, device=dev)
            draws.append((t, r, delta, g, torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype)))
        t, r, delta, g, eps = (torch.cat(d) for d in zip(*draws))
        tp, rp = (t - delta).clamp(min=0), (r - delta).clamp(min=0)
        x_t, x_tp = interpolate(x0, eps, t), interpolate(x0, eps, tp)  # the SAME (x0, eps) pair
        cache = self.model.run(x_t, t, text, r, g, return_hidden=True).hidden.detach()
        target = self.model.run(x_tp, tp, text, rp, g).velocity
        s = dict(t=t, r=r, tp=tp, rp=rp, g=g, x_tp=x_tp, cache=cache, target=target)
        if self.d_input == "residual":  # the reuse head(C, vec(t', r')) that real and fake corrections start from
            s["reuse"] = self.predict_velocity(s, text, ReusePredictor())
            s["grid"] = embed_tokens(self.model, x_tp, text, tp).grid
        return s

    def predict_velocity(self, s: dict, text: TextCond, predictor: nn.Module | None = None) -> Tensor:
        predictor = self.predictor if predictor is None else predictor
        return predictor(self.model, s["x_tp"], s["tp"], s["rp"], text, s["cache"], s["g"])

    def next_features(self, s: dict, u: Tensor, text: TextCond) -> tuple[list[Tensor], tuple[int, int, int]]:
        """D's input for velocity u: 'x_next', F(x_t'') with x_t'' = x_t' - (t' - r') u at
        (t'', r'') = (r', r' - (t' - r')) (Algorithm 3 lines 9-11); 'residual', u - head(C, vec) as tokens."""
        if self.d_input == "residual":
            return [patchify(u - s["reuse"], s["grid"])], s["grid"]
        tp, rp = s["tp"], s["rp"]
        x_next = s["x_tp"] - expand_time(tp - rp, u) * u
        return dit_features(self.model, x_next, rp, text, (rp - (tp - rp)).clamp(min=0), s["g"], self.feature_layers)

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_p, opt_d = self.stage_optimizers()
        hp = self.hparams
        text = batch_text(batch)
        # keyed per sample by (seed, batch, position in the global batch): a resumed run redraws exactly the
        # uninterrupted run's times and noise, and one process with the global batch draws what the ranks draw
        gens = sample_generators(self, hp.seed, self.batches_seen, batch["latents"].shape[0])
        s = self.sample_pairs(batch["latents"], text, gens)
        gan = hp.lam > 0 and self.batches_seen >= hp.mse_warmup_steps
        u = self.predict_velocity(s, text)  # (B, C, F, H, W), with grad
        logs = {"train/step_kind": float(STEP_GAN if gan else STEP_MSE)}

        if gan:  # D step (Eq. 7): real = the target model's output, fake = the predictor's, detached
            with self.d_step_context(opt_d):
                with torch.no_grad():
                    fake_features = self.next_features(s, u.detach(), text)
                    real_features = self.next_features(s, s["target"], text)
                fake_logits, real_logits = self.discriminator(*fake_features), self.discriminator(*real_features)
                loss_d = finite_or_raise("train/L_D", hinge_d_loss(real_logits, fake_logits), self.global_step)
                opt_d.zero_grad(set_to_none=True)
                self.d_backward(loss_d)
                opt_d.step()
            logs.update({"train/L_D": loss_d.detach(), "train/d_real_logit": real_logits.detach().mean(),
                         "train/d_fake_logit": fake_logits.detach().mean(),
                         "train/d_accuracy": discriminator_accuracy(real_logits, fake_logits)})

        # P step: Eq. 8, or Eq. 6 alone during the warm-up and with lam = 0
        with self.toggled_optimizer(opt_p):
            mse = prediction_mse(u, s["target"])
            if gan:  # gradients reach u through the frozen M's features (M's weights get none)
                g_loss = hinge_g_loss(self.discriminator(*self.next_features(s, u, text)))
                loss_p = predictor_loss(mse, g_loss, hp.lam)
            else:
                loss_p = mse
            finite_or_raise("train/L_P", loss_p, self.global_step)
            opt_p.zero_grad(set_to_none=True)
            self.manual_backward(loss_p)
            if hp.grad_clip and not is_deepspeed(self):
                self.clip_gradients(opt_p, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            opt_p.step()
        logs.update({"train/L_P": loss_p.detach(), "train/mse": mse.detach()})
        if gan:
            logs["train/g_loss"] = g_loss.detach()
        self.batches_seen += 1
        b = batch["latents"].shape[0]
        self.log_dict(logs, batch_size=b)
        self.log("mse", mse.detach(), prog_bar=True, logger=False, batch_size=b)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Eq. 6 on fixed draws, for the learned predictor and the training-free reuse baseline."""
        gen = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        text = batch_text(batch)
        s = self.sample_pairs(batch["latents"], text, generator=gen)
        b = batch["latents"].shape[0]
        self.log("val/mse", prediction_mse(self.predict_velocity(s, text), s["target"]), prog_bar=True, batch_size=b)
        self.log("val/mse_reuse", prediction_mse(self.predict_velocity(s, text, ReusePredictor()), s["target"]),
                 batch_size=b)

    def configure_optimizers(self):
        hp = self.hparams
        opt_p = torch.optim.Adam(self.predictor.parameters(), lr=hp.lr_p, betas=tuple(hp.betas_p))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr_d, betas=tuple(hp.betas_d), eps=hp.eps_d)
        if is_deepspeed(self):  # the engine takes P's optimizer; D's stays outside ZeRO (see the module docstring)
            self.replicated_opt_d = ReplicatedOptimizer(opt_d, on_step=self.count_optimizer_step)
            return opt_p
        return [opt_p, opt_d]

    def count_optimizer_step(self) -> None:
        """Count D's step in `global_step` as Lightning counts every optimizer step in manual optimization
        (so `max_steps` means the same under every strategy: 1 per MSE batch, 2 per GAN batch)."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def modules_outside_zero(self) -> tuple[str, ...]:
        """Submodules the DeepSpeed engine must not partition (`distributed.strategies.DeepSpeedZeRO3`)."""
        return ("discriminator",)

    def stage_optimizers(self) -> tuple:
        """(P's optimizer, D's optimizer), under every strategy."""
        if is_deepspeed(self):
            return self.optimizers(), self.replicated_opt_d
        return tuple(self.optimizers())

    def d_step_context(self, opt_d):
        """Lightning's optimizer toggling for D's step; under DeepSpeed D is outside the engine and its loss
        reaches no P parameter (the features are computed without grad), so there is nothing to toggle."""
        return contextlib.nullcontext() if is_deepspeed(self) else self.toggled_optimizer(opt_d)

    def d_backward(self, loss_d: Tensor) -> None:
        """D's backward: plain autograd under DeepSpeed (the engine's backward belongs to P's step)."""
        loss_d.backward() if is_deepspeed(self) else self.manual_backward(loss_d)

    # --- export -----------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Predictor-only safetensors + config.json (its config and the backbone config it belongs to)."""
        state = gathered_state_dict(self.predictor)  # collective when sharded: every rank calls export
        if self.global_rank == 0:
            save_predictor(self.predictor, directory, state=state)
        return Path(directory)
