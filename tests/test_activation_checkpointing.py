"""The per-block activation checkpointing switch: the same loss and gradients, fewer tensors kept for
backward (stage 2, whose step is the most memory-hungry: teacher, forward-AD JVP, student)."""
from __future__ import annotations

import torch

from lightning_modules.meanflow import RestrictedMeanFlowModule
from models.mmdit import MMDiT
from tests.conftest import perturb, tiny_text


def step(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    teacher = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True}), seed=3)
    module = RestrictedMeanFlowModule(teacher, restrict=0.4, activation_checkpointing=checkpointing)
    module.configure_model()  # no trainer: no sharding, only the checkpointing switch
    text = tiny_text(batch=2, seed=7)
    batch = {"latents": torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(8)),
             "text_tokens": text.tokens, "text_mask": text.mask, "pooled": text.pooled}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.loss_terms(batch, torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.student.named_parameters()}, saved


def test_checkpointing_keeps_the_maths_and_saves_memory():
    loss, grads, saved = step(False)
    loss_ckpt, grads_ckpt, saved_ckpt = step(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{name}: {m}")
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)  # elements kept for backward
