"""Predictor and discriminator losses of DisCa's adversarial cache training (paper §3.3, Eqs. 6-8).

Logits are D∘F applied to the frozen DiT's features of x_{t''} = x_{t'} - (t' - r') u, with u the
target model's output (real) or the predictor's output (fake). Hinge losses as in SAGAN / ADD
(Zhang et al. 2019; Sauer et al. 2023, "Adversarial diffusion distillation").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prediction_mse(u_pred: Tensor, u_target: Tensor) -> Tensor:
    """Eq. 6: E || M(x_{t'}, r', t') - P(C, x_{t'}, r', t') ||^2, averaged over all elements (float32)."""
    if u_pred.shape != u_target.shape:
        raise ValueError(f"prediction shape {tuple(u_pred.shape)} != target shape {tuple(u_target.shape)}")
    return (u_pred.float() - u_target.float()).pow(2).mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Eq. 7: E[max(0, 1 - D(real))] + E[max(0, 1 + D(fake))], real = the target model's output.

    The paper's Algorithm 3 line 14 writes the two terms the other way round (the predictor's
    sample as 'real'); that contradicts Eq. 7 and the predictor's loss Eq. 8, so it is a typo."""
    return F.relu(1 - real_logits.float()).mean() + F.relu(1 + fake_logits.float()).mean()


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """The adversarial term of Eq. 8: E[max(0, 1 - D(fake))] (the paper's form, not the common -E[D])."""
    return F.relu(1 - fake_logits.float()).mean()


def predictor_loss(mse: Tensor, g_loss: Tensor, lam: float) -> Tensor:
    """Eq. 8: L_P = MSE + lambda * hinge_g (lambda = 1.0 in the paper, 0 = the no-GAN ablation)."""
    if lam < 0:
        raise ValueError(f"adversarial weight lambda must be >= 0, got {lam}")
    return mse + lam * g_loss


@torch.no_grad()
def discriminator_accuracy(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Fraction of logits on the right side of 0 (real > 0, fake < 0), both sets weighted equally."""
    return ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
