"""Stage 1: CFG distillation (DisCa Algorithm 1, appendix 6.1).

The student is the teacher plus a guidance embedder (a small FFN added to the adaLN vector, last
layer zero so it starts equal to the teacher's conditional branch). Per step:

    g ~ U(g_min, g_max),  x_t = (1 - t) x0 + t eps,
    v_tgt = g v_T(x_t, t, c) + (1 - g) v_T(x_t, t, null)      (frozen teacher, one batched call)
    loss  = || v_S(x_t, t, c, g) - v_tgt ||^2

so one student call replaces the two CFG calls (2 NFE -> 1 NFE per sampling step). An EMA copy of
the student is kept and is what gets exported.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.latent_video import batch_text
from lightning_modules.common import (EMAStudentModule, check_guidance_range, expand_null, finite_or_raise, freeze,
                                      sample_guidance, shard_generator)
from losses.flow import cfg_combine, interpolate, sample_time
from models.protocol import TextCond


class CFGDistillModule(EMAStudentModule):
    def __init__(self, teacher: nn.Module, student: nn.Module | None = None, guidance_min: float = 1.0,
                 guidance_max: float = 8.0, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 100, decay_steps: int | None = None,
                 ema_decay: float = 0.999, time_distribution: str = "uniform", time_shift: float = 1.0,
                 grad_clip: float = 1.0, seed: int = 0,
                 activation_checkpointing: bool = False):
        """Stage 1: distil classifier-free guidance into a guidance-conditioned student.

        Args:
            teacher: the frozen CFG model (stage-0 export).
            student: defaults to a copy of the teacher with `enable_guidance_embedding()` (starts at its
                conditional output).
            guidance_min: smallest CFG scale g drawn per sample.
            guidance_max: largest CFG scale g drawn per sample.
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: linear learning-rate warm-up, in optimizer steps.
            decay_steps: cosine decay to 10 % by this step (None: constant after warm-up).
            ema_decay: EMA decay of the exported student.
            time_distribution: training times, 'uniform' or 'logit_normal'.
            time_shift: timestep shift applied to the sampled times (1 = none).
            grad_clip: gradient-norm clipping threshold (0 = off).
            seed: keys the per-step draws (`shard_generator`), so resumes are exact.
            activation_checkpointing: recompute each block in the backward pass (less activation memory).
        """
        super().__init__()
        check_guidance_range(guidance_min, guidance_max)
        self.save_hyperparameters(ignore=["teacher", "student"])
        self.teacher = freeze(teacher)
        if student is None:
            student = copy.deepcopy(teacher).requires_grad_(True).train()
            student.enable_guidance_embedding()
        self.student = student
        self.ema = copy.deepcopy(student).requires_grad_(False)

    # --- the loss (Algorithm 1) --------------------------------------------------------------------
    @property
    def null_text(self) -> TextCond:
        return self.trainer.datamodule.null_text.to(device=self.device)

    def loss_terms(self, model: nn.Module, batch: dict, null_text: TextCond,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x0 = batch["latents"]
        b, device = x0.shape[0], x0.device
        text = batch_text(batch)
        null = expand_null(null_text, text)
        hp = self.hparams
        t = sample_time(b, hp.time_distribution, shift=hp.time_shift, generator=generator, device=device)
        g = sample_guidance(b, hp.guidance_min, hp.guidance_max, generator, device)  # (B,) float32
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_t = interpolate(x0, eps, t)
        with torch.no_grad():  # conditional and unconditional teacher branches in one call
            v = self.teacher.run(torch.cat([x_t, x_t]), torch.cat([t, t]), text.cat(null)).velocity
            target = cfg_combine(v[:b], v[b:], g)
        pred = model.run(x_t, t, text, guidance=g).velocity
        return {"loss": F.mse_loss(pred.float(), target.float()), "target": target}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        gen = shard_generator(self, self.hparams.seed, batch_idx)
        terms = self.loss_terms(self.student, batch, self.null_text, gen)
        finite_or_raise("target", terms["target"], self.global_step)
        loss = finite_or_raise("loss", terms["loss"], self.global_step)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["latents"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        gen = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)  # same draws every evaluation
        self.log("val/loss", self.loss_terms(self.ema, batch, self.null_text, gen)["loss"], prog_bar=True,
                 batch_size=batch["latents"].shape[0])

    # --- export ------------------------------------------------------------------------------------
    def sampling_model(self) -> nn.Module:
        """The EMA student; sample with `ModelVelocity(model, text, mode='plain', guidance=g)`."""
        return self.ema
