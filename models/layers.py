"""Building blocks shared by the built-in MMDiT and the predictor: embedders, RoPE, attention."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distributed import sequence_parallel

ATTENTION_BACKENDS = ("sdpa", "math", "triton", "auto")  # triton / auto: SDPA here, their JVP in models.jvp


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of a float32 time in [0, 1] (scaled by 1000 as in DiT / HunyuanVideo)."""
    t = t.float() * scale  # stay float32: a bf16 t * 1000 loses the embedding (SPEC §2)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear, computed in float32 then cast to the weights' dtype."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_sinusoid(t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


def rope_3d(grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float = 256.0,
            device=None) -> tuple[Tensor, Tensor]:
    """Real-valued 3D rotary tables for a (F, H, W) token grid: cos, sin of shape (F*H*W, sum(axes_dim)).

    Each axis gets `axes_dim[i]` channels, rotated in interleaved pairs (as HunyuanVideo does)."""
    coords = torch.meshgrid(*[torch.arange(n, dtype=torch.float32, device=device) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim in zip(coords, axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))  # (dim/2,)
        angles = pos.reshape(-1, 1) * freqs[None]  # (N, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=-1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of x (B, heads, N, D) by the tables (N, D)."""
    x_pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-x_pairs[..., 1], x_pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, backend: str,
              sharded_tokens: int = 0) -> Tensor:
    """Multi-head attention over (B, heads, N, D) with an optional key padding mask (B, N) bool.

    `sharded_tokens` = n: the first n tokens are this rank's shard of the sequence-parallel image tokens
    (the rest, text, whole on every rank); while a sequence-parallel state is active the call runs as
    Ulysses attention around this same function (distributed/sequence_parallel.py), else n is ignored.

    `math` is explicit softmax attention: slower, but it has a forward-mode AD rule, which
    `torch.func.jvp` needs (SPEC §4: the fused SDPA kernels have none)."""
    if sharded_tokens and sequence_parallel.current() is not None:
        return sequence_parallel.ulysses_attention(q, k, v, key_mask, sharded_tokens,
                                                   lambda q_, k_, v_, m: attention(q_, k_, v_, m, backend))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    if backend in ("sdpa", "triton", "auto"):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1) @ v
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


@contextmanager
def attention_backend(model: nn.Module, backend: str):
    """Temporarily switch every module with an `attention_backend` attribute (e.g. to 'math' for JVP)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    touched = [(m, m.attention_backend) for m in model.modules() if hasattr(m, "attention_backend")]
    for m, _ in touched:
        m.attention_backend = backend
    try:
        yield model
    finally:
        for m, old in touched:
            m.attention_backend = old


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight
