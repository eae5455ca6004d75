"""Multi-scale spectral-norm discriminator on frozen-DiT features (paper §3.3 "Generative Adversarial
Training", Eq. 7; the ADD recipe, Sauer et al. 2023, with the DiT itself as the feature network F).

F runs the frozen DiT on x_{t''} = x_{t'} - (t' - r') u (u from the predictor = fake, from the target
model = real) at times (t'', r'') = (r', r' - (t' - r')) (Algorithm 3 line 11) and returns the image
tokens after a few chosen blocks. D reshapes each layer's tokens to the (F', H', W') patch grid and
applies one small head per (layer, scale): average-pool H', W' by the scale, then SN-conv3d 3x3x3 ->
LeakyReLU -> SN-conv3d 1x1x1, giving a logit per grid position (a patch discriminator). All heads'
logits are concatenated: (B, M). Spectral normalisation (Miyato et al. 2018) on every conv.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from distributed import sequence_parallel
from models.predictor import embed_tokens
from models.protocol import TextCond


def dit_features(backbone: nn.Module, x: Tensor, t: Tensor, text: TextCond, r: Tensor | None,
                 guidance: Tensor | None, layers: Sequence[int]) -> tuple[list[Tensor], tuple[int, int, int]]:
    """F: the image tokens (B, N_img, H) after each block in `layers` (ascending), and the patch grid.

    Runs the backbone's embed / condition / transformer (the head is not needed). Gradients flow to x
    when the caller has grad enabled; the backbone's own weights are expected frozen."""
    tokens = embed_tokens(backbone, x, text, t)
    vec = backbone.condition(t, r, guidance, text.pooled)
    _, features = backbone.transformer(sequence_parallel.shard(tokens), vec, feature_layers=layers)
    return [sequence_parallel.gather_image(f) for f in features], tokens.grid


def patchify(x: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(B, C, F, H, W) latent -> (B, F'H'W', C pt ph pw) tokens on the backbone's patch grid."""
    f, h, w = grid
    if x.shape[2] % f or x.shape[3] % h or x.shape[4] % w:
        raise ValueError(f"latent size {tuple(x.shape[2:])} is not a multiple of the patch grid {grid}")
    return rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", f=f, h=h, w=w,
                     pt=x.shape[2] // f, ph=x.shape[3] // h, pw=x.shape[4] // w)


def token_channels(backbone: nn.Module) -> int:
    """Latent values per image token, C * pt * ph * pw: the width of a patchified latent."""
    cfg = backbone.config
    if "patch_size" in cfg and "in_channels" in cfg:  # the built-in MMDiT
        patch, channels = cfg["patch_size"], cfg["in_channels"]
    else:  # the diffusers adapters expose them as properties
        patch, channels = backbone.patch_size, backbone.in_channels
    return int(channels) * math.prod(int(p) for p in patch)


class DiscriminatorHead(nn.Module):
    """(B, C, F', H', W') features -> (B, positions) logits at one spatial scale."""

    def __init__(self, in_dim: int, channels: int, scale: int):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(
            spectral_norm(nn.Conv3d(in_dim, channels, kernel_size=3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv3d(channels, 1, kernel_size=1)),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.scale > 1:
            f, h, w = x.shape[2:]
            x = F.adaptive_avg_pool3d(x, (f, math.ceil(h / self.scale), math.ceil(w / self.scale)))
        return self.net(x).flatten(1)


class Discriminator(nn.Module):
    """D over `num_features` feature maps of width `in_dim`, one head per (feature, scale)."""

    def __init__(self, in_dim: int, num_features: int, scales: Sequence[int] = (1, 2), channels: int = 64,
                 gain: float = 1.0):
        """`gain` multiplies D's input: spectral norm bounds each head's Lipschitz constant, so a D on small
        inputs cannot reach the hinge margin (logits of +-1) however it trains; gain raises that bound."""
        super().__init__()
        if num_features < 1:
            raise ValueError(f"the discriminator needs at least one feature layer, got {num_features}")
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"discriminator scales must be integers >= 1, got {list(scales)}")
        if channels < 1:
            raise ValueError(f"discriminator channels must be positive, got {channels}")
        if not gain > 0:
            raise ValueError(f"discriminator gain must be > 0, got {gain}")
        self.num_features, self.scales, self.gain = num_features, tuple(int(s) for s in scales), float(gain)
        self.heads = nn.ModuleList(DiscriminatorHead(in_dim, channels, s)
                                   for _ in range(num_features) for s in self.scales)

    def forward(self, features: Sequence[Tensor], grid: tuple[int, int, int]) -> Tensor:
        if len(features) != self.num_features:
            raise ValueError(f"discriminator built for {self.num_features} feature layers, got {len(features)}")
        f, h, w = grid
        dtype = next(self.parameters()).dtype
        logits = []
        for i, feat in enumerate(features):
            maps = rearrange(feat.to(dtype), "b (f h w) c -> b c f h w", f=f, h=h, w=w)
            if self.gain != 1:
                maps = self.gain * maps
            for j in range(len(self.scales)):
                logits.append(self.heads[i * len(self.scales) + j](maps))
        return torch.cat(logits, dim=1)  # (B, M)
