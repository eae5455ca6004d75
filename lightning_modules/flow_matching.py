"""Stage 0: train a text-to-video teacher from scratch with rectified flow (toy world and benchmarks).

Loss: E || v_theta(x_t, t, c) - (eps - x0) ||^2 with x_t = (1 - t) x0 + t eps; 10% of prompts are
replaced by the null prompt so the teacher supports classifier-free guidance. An EMA copy of the
backbone is kept and is what gets exported.
"""
from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
from torch import nn

from datamodules.latent_video import batch_text
from lightning_modules.common import (adamw_warmup_cosine, deepspeed_gradient_clipping, drop_prompts, ema_decay_at,
                                      ema_update, export_backbone, finite_or_raise, full_value, is_deepspeed,
                                      materialize_deferred, optimizer_stepped, shard_generator, shard_modules)
from losses.flow import flow_matching_loss, interpolate, sample_time
from models.io import load_state
from models.protocol import TextCond


class FlowMatchingModule(L.LightningModule):
    def __init__(self, backbone: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 200, decay_steps: int | None = None,
                 ema_decay: float = 0.999, prompt_dropout: float = 0.1, time_distribution: str = "logit_normal",
                 time_shift: float = 1.0, grad_clip: float = 1.0, seed: int = 0, init_from: str | None = None,
                 activation_checkpointing: bool = False):
        """Stage 0: rectified-flow teacher training.

        Args:
            backbone: the video DiT to train, e.g. models.mmdit.MMDiT (its EMA copy is exported).
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: linear learning-rate warm-up, in optimizer steps.
            decay_steps: cosine decay to 10 % by this step (None: constant after warm-up).
            ema_decay: EMA decay of the exported copy (with warm-up, see `ema_decay_at`).
            prompt_dropout: share of prompts replaced by the null prompt (enables CFG).
            time_distribution: training times, 'logit_normal' or 'uniform'.
            time_shift: timestep shift applied to the sampled times (1 = none).
            grad_clip: gradient-norm clipping threshold (0 = off).
            seed: seeds the per-step noise/time/dropout generator (`shard_generator`), so resumes are exact.
            init_from: backbone export directory to warm-start from; its weights must match `backbone`.
            activation_checkpointing: recompute each block in the backward pass (less activation memory).
        """
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        if init_from is not None:
            load_state(backbone, init_from)
        self.backbone = backbone
        self.ema = copy.deepcopy(backbone).requires_grad_(False)

    # --- data helpers -----------------------------------------------------------------------------
    @property
    def null_text(self) -> TextCond:
        return self.trainer.datamodule.null_text.to(device=self.device)

    def _loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None,
              dropout: float = 0.0) -> torch.Tensor:
        x0 = batch["latents"]
        text = batch_text(batch)
        text = drop_prompts(text, self.null_text, dropout, generator)
        t = sample_time(x0.shape[0], self.hparams.time_distribution, shift=self.hparams.time_shift,
                        generator=generator, device=x0.device)  # (B,) float32
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return flow_matching_loss(model(interpolate(x0, eps, t), t, text), x0, eps)

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        gen = shard_generator(self, self.hparams.seed, batch_idx)  # = step_generator(seed, step) on one process
        loss = finite_or_raise("train/loss", self._loss(self.backbone, batch, gen, self.hparams.prompt_dropout),
                               self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0])
        return loss

    def configure_model(self) -> None:
        """Materialise a deferred backbone and EMA (DeepSpeed ZeRO-3: partitioned at construction,
        `materialize_deferred`), shard them for the strategy in use (FSDP2 per block, ZeRO-3; see
        `shard_modules`); per-block activation checkpointing of the backbone when `activation_checkpointing`
        is set."""
        materialize_deferred(self, ("backbone", "ema"))
        shard_modules(self, [self.backbone, self.ema], [self.backbone] if self.hparams.activation_checkpointing else [])
        deepspeed_gradient_clipping(self, self.hparams.grad_clip)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.grad_clip and not is_deepspeed(self):
            norm = torch.nn.utils.clip_grad_norm_(self.backbone.parameters(), self.hparams.grad_clip)
            self.log("train/grad_norm", full_value(norm))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The step, then the EMA update: here, not in `on_train_batch_end`, which Lightning runs after the
        callbacks' (ModelCheckpoint saves in theirs), so that a checkpoint holds its own step's EMA and a
        resumed run exports the weights of an uninterrupted one. Lightning counts the step (`global_step`)
        only after this hook returns."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if optimizer_stepped(self, batch_idx):
            ema_update(self.ema, self.backbone, ema_decay_at(self.global_step + 1, self.hparams.ema_decay))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # fixed noise and times per batch so the curve is comparable across evaluations
        gen = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        self.log("val/loss", self._loss(self.ema, batch, generator=gen), prog_bar=True,
                 batch_size=batch["latents"].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.backbone.parameters(), hp.lr, hp.betas, hp.weight_decay, hp.warmup_steps,
                                   hp.decay_steps)

    # --- export -----------------------------------------------------------------------------------
    def sampling_model(self) -> nn.Module:
        """The network to sample from: the EMA backbone."""
        return self.ema

    def export(self, directory: str | Path) -> Path:
        return export_backbone(self.ema, directory, write=self.global_rank == 0)
