"""Log sample videos to TensorBoard during training (a frames-as-columns image per prompt set)."""
from __future__ import annotations

import lightning as L
import torch
from einops import rearrange

from datamodules.latent_video import batch_text
from sampling.sampler import ModelVelocity, sample, time_grid


def video_grid(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, F, H, W) in [-1, 1] -> (3, N*H, F*W) in [0, 1]: one row per video, frames left to right."""
    return rearrange((videos.clamp(-1, 1) + 1) / 2, "n c f h w -> c (n h) (f w)")


class SampleVideos(L.Callback):
    """Every `every_n_steps`, sample the first `num_videos` validation prompts with fixed noise.

    `mode` selects the velocity ('cfg' teacher, 'plain' CFG-distilled with `guidance`, 'meanflow')."""

    def __init__(self, every_n_steps: int = 500, num_videos: int = 8, num_steps: int = 25, mode: str = "cfg",
                 cfg_scale: float = 4.0, guidance: float | None = None, shift: float = 1.0, seed: int = 0):
        self.every_n_steps, self.num_videos, self.num_steps = every_n_steps, num_videos, num_steps
        self.mode, self.cfg_scale, self.guidance, self.shift, self.seed = mode, cfg_scale, guidance, shift, seed

    @torch.no_grad()
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        batch = next(iter(dm.val_dataloader()))
        n = min(self.num_videos, batch["latents"].shape[0])
        batch = {k: v[:n].to(pl_module.device) if torch.is_tensor(v) else v[:n] for k, v in batch.items()}
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.randn(batch["latents"].shape, generator=gen).to(pl_module.device)
        model = pl_module.sampling_model()
        velocity = ModelVelocity(model, batch_text(batch), mode=self.mode, cfg_scale=self.cfg_scale,
                                 null_text=dm.null_text.to(device=pl_module.device), guidance=self.guidance)
        videos = sample(velocity, noise, time_grid(self.num_steps, self.shift, device=pl_module.device))
        for logger in trainer.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("samples/generated", video_grid(videos.float().cpu()), trainer.global_step)
                if trainer.global_step == 0 or not getattr(self, "_logged_real", False):
                    exp.add_image("samples/real", video_grid(batch["latents"].float().cpu()), trainer.global_step)
                    self._logged_real = True

    @staticmethod
    def samples_here(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Rank 0 samples; with a sharded model (FSDP2, ZeRO-3) every rank must take part in the gathers
        (the loggers of the other ranks write nothing)."""
        return trainer.is_global_zero or any(hasattr(p, "ds_tensor") or hasattr(p, "full_tensor")
                                             for p in pl_module.sampling_model().parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.samples_here(trainer, pl_module) and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.samples_here(trainer, pl_module):
            self.log_samples(trainer, pl_module)
