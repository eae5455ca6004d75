"""Flow-matching quantities (SPEC §2; paper §3.1, Lipman et al. 2023 / Liu et al. 2023).

x_t = (1 - t) x0 + t eps, t in [0, 1] with t = 1 pure noise; the velocity is v = eps - x0.
"""
from __future__ import annotations

import torch
from torch import Tensor


def expand_time(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps."""
    te = expand_time(t, x0)
    return (1 - te) * x0 + te * eps


def flow_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """The conditional flow-matching target v = eps - x0."""
    return eps - x0


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift t' = s t / (1 + (s - 1) t) (SD3 / HunyuanVideo; s > 1 spends more time near noise)."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_time(batch: int, distribution: str = "logit_normal", *, mean: float = 0.0, std: float = 1.0,
                shift: float = 1.0, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Training times in (0, 1), float32: 'uniform' or 'logit_normal' (SD3, Esser et al. 2024), then shifted."""
    if distribution == "uniform":
        t = torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    elif distribution == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device, dtype=torch.float32))
    else:
        raise ValueError(f"time distribution {distribution!r} not in ('uniform', 'logit_normal')")
    return shift_time(t, shift) if shift != 1.0 else t


def flow_matching_loss(v_pred: Tensor, x0: Tensor, eps: Tensor) -> Tensor:
    """Rectified-flow loss E ||v_theta(x_t, t) - (eps - x0)||^2, averaged over all elements."""
    return (v_pred.float() - flow_velocity(x0, eps).float()).pow(2).mean()


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: Tensor | float) -> Tensor:
    """Classifier-free guidance v = g v_c + (1 - g) v_uc (Ho & Salimans 2022; paper Algorithm 1 target)."""
    g = expand_time(scale, v_cond) if isinstance(scale, Tensor) else scale
    return g * v_cond + (1 - g) * v_uncond
