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
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.latent_video import batch_text
from lightning_modules.common import (adamw_warmup_cosine, ema_decay_at, ema_update, finite_or_raise, freeze,
                                     step_generator)
from losses.flow import cfg_combine, interpolate, sample_time
from models.io import build_backbone, save_backbone
from models.protocol import TextCond


def sample_guidance(batch: int, g_min: float, g_max: float, generator: torch.Generator | None = None,
                    device=None) -> Tensor:
    """g ~ U(g_min, g_max), float32 (B,) (DisCa Algorithm 1 line 2; the paper uses 1..8)."""
    return g_min + (g_max - g_min) * torch.rand(batch, generator=generator, device=device, dtype=torch.float32)


def shard_generator(module: L.LightningModule, seed: int, batch_idx: int) -> torch.Generator:
    """The generator for one training micro-batch, keyed by (seed, optimizer step, slice of the global
    batch = rank * accumulation + micro-batch): a run resumed at step k redraws step k's noise, times
    and guidance, and 2 ranks draw what 1 process accumulating 2 micro-batches draws."""
    trainer = module.trainer
    acc = trainer.accumulate_grad_batches
    shards = trainer.world_size * acc
    index = trainer.global_step * shards + trainer.global_rank * acc + batch_idx % acc
    return step_generator(seed, index, module.device)


def check_guidance_range(g_min: float, g_max: float) -> None:
    if not 0.0 <= g_min <= g_max:
        raise ValueError(f"need 0 <= guidance_min <= guidance_max, got guidance_min={g_min}, guidance_max={g_max}")


def fully_shard_backbone(module: nn.Module, mesh) -> nn.Module:
    """FSDP2-shard a backbone on `mesh` as one unit: parameters, gradients and optimizer state are
    sharded at rest and gathered around each `run` call (registered as an FSDP forward method, since
    the stages call `run`, not `forward`). Per-block units would need backbones that touch a block's
    weights only inside its `forward`; the MMDiT reads block 0's modulation outside it and the
    HunyuanVideo adapter re-implements its blocks, so one unit is the correct generic choice.
    A module that is already sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return module
    fully_shard(module, mesh=mesh)
    register_fsdp_forward_method(module, "run")
    return module


def full_value(x: Tensor) -> Tensor:
    """A DTensor's full value (e.g. a grad norm under FSDP2), a plain tensor unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def export_backbone(module: nn.Module, directory: str | Path, write: bool = True) -> Path:
    """`save_backbone`, also for an FSDP2-sharded backbone: its parameters are gathered into a fresh
    unsharded copy first. Gathering is collective, so with sharding every rank must call this; only
    ranks with `write=True` write files."""
    if not any(hasattr(p, "full_tensor") for p in module.parameters()):
        return save_backbone(module, directory) if write else Path(directory)
    state = {k: full_value(v).detach().cpu() for k, v in module.state_dict().items()}
    if not write:
        return Path(directory)
    plain = build_backbone(module.config)
    plain.load_state_dict(state)
    return save_backbone(plain, directory)


class CFGDistillModule(L.LightningModule):
    def __init__(self, teacher: nn.Module, student: nn.Module | None = None, guidance_min: float = 1.0,
                 guidance_max: float = 8.0, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), warmup_steps: int = 100, decay_steps: int | None = None,
                 ema_decay: float = 0.999, time_distribution: str = "uniform", time_shift: float = 1.0,
                 grad_clip: float = 1.0, seed: int = 0):
        """`teacher`: the frozen CFG model (stage-0 export). `student`: defaults to a copy of the
        teacher with `enable_guidance_embedding()`, so it starts equal to the teacher's conditional output.
        `seed` keys the per-step draws (`shard_generator`)."""
        super().__init__()
        check_guidance_range(guidance_min, guidance_max)
        self.save_hyperparameters(ignore=["teacher", "student"])
        self.teacher = freeze(teacher)
        if student is None:
            student = copy.deepcopy(teacher).requires_grad_(True).train()
            student.enable_guidance_embedding()
        self.student = student
        self.ema = copy.deepcopy(student).requires_grad_(False)

    # --- sharding (ModelParallelStrategy only) -----------------------------------------------------
    def configure_model(self) -> None:
        if self.device_mesh is None:  # any other strategy: nothing to do
            return
        mesh = self.device_mesh["data_parallel"]
        for module in (self.teacher, self.student, self.ema):
            fully_shard_backbone(module, mesh)

    # --- the loss (Algorithm 1) --------------------------------------------------------------------
    @property
    def null_text(self) -> TextCond:
        return self.trainer.datamodule.null_text.to(device=self.device)

    def loss_terms(self, model: nn.Module, batch: dict, null_text: TextCond,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
        x0 = batch["latents"]
        b, device = x0.shape[0], x0.device
        text = batch_text(batch)
        if null_text.tokens.shape[1] != text.tokens.shape[1]:
            raise ValueError(f"null prompt length {null_text.tokens.shape[1]} != prompt length {text.tokens.shape[1]}")
        null = TextCond(null_text.tokens.expand(b, -1, -1), null_text.mask.expand(b, -1),
                        null_text.pooled.expand(b, -1))
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

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.hparams.grad_clip)
            self.log("train/grad_norm", full_value(norm))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.ema, self.student, ema_decay_at(self.global_step, self.hparams.ema_decay))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.student.parameters(), hp.lr, hp.betas, hp.weight_decay, hp.warmup_steps,
                                   hp.decay_steps)

    # --- export ------------------------------------------------------------------------------------
    def sampling_model(self) -> nn.Module:
        """The EMA student; sample with `ModelVelocity(model, text, mode='plain', guidance=g)`."""
        return self.ema

    def export(self, directory: str | Path) -> Path:
        """Write the EMA student (safetensors + config.json). Sharded (FSDP2): call on every rank."""
        return export_backbone(self.ema, directory, write=self.global_rank == 0)
