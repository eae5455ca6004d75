"""DisCa's lightweight learnable predictor (paper §3.3 "Predictor Architecture Design", Eq. 5; SPEC §4).

At a full step the DiT M runs and its final hidden state (image and text tokens, before the output
norm/projection) is kept as the cache C: ONE tensor (B, N_img + N_txt, H). At the following cached
steps the predictor forecasts M's output from the cache and the current input:

    current = embed(x_t', text)                      (B, N, H)   the backbone's own, frozen, embedders
    h       = fusion_mlp(cat(current, C))            (B, N, Hp)  Linear 2H->Hp, SiLU, Linear Hp->Hp
    h       = single_blocks(h, vec_p)                (B, N, Hp)  2 blocks of the backbone's single-stream kind
    hidden  = out_proj(h) [+ C if cache_residual]    (B, N, H)   out_proj only when Hp != H or cache_residual
    u       = head(hidden, vec)                      (B, C, F, H, W)  the backbone's own, frozen, output head

with vec = condition(t', r', g, pooled) the backbone's adaLN vector (projected to Hp when Hp != H).

Ownership of the backbone: the predictor is built FROM a backbone (to create blocks of its kind and
read its width) but never stores it: `forward(backbone, x, t, r, text, cache, guidance)` takes it as
an argument. So the backbone's weights are never in the predictor's state_dict, optimizer or DDP
wrapper, and the reused embedders / head are the backbone's own (frozen, not copied).
`parameter_share` counts only the predictor's own parameters against the backbone's.

Width: the paper keeps P under 4% of M. HunyuanVideo-13B with Hp = H = 3072 gives 2.4%. The small
built-in MMDiTs have few blocks, so 2 full-width blocks would be 12-25% of them; their presets
(`PREDICTOR_PRESETS`) are narrow (Hp = 8 / 32) and use `cache_residual=True`: a width-Hp bottleneck
cannot pass the cache through on its own, so the cache is added back after a zero-initialised output
projection. The untrained predictor then equals the training-free reuse baseline `head(C, vec)`
(`ReusePredictor`, Table 3's "no learned predictor" row) and training learns a correction.
`cache_residual=False` with Hp = H is the official design.

Variants (`variant`): 'single' is the design above (official HunyuanVideo 1.0 predictor). 'hunyuan_video_1_5' is the
official HunyuanVideo 1.5 predictor's layout (SPEC §9.4): the cache is split into its image and text parts, each
fused with the current tokens by its own MLP (`fusion_img`, `fusion_txt`), then 2 DOUBLE-stream blocks of the
backbone's kind (separate image / text weights, joint attention), then the backbone's head. It needs a backbone
with double-stream blocks (the HunyuanVideo adapter).

RoPE: the blocks reuse the backbone's rotary tables (interleaved channel pairs, (N_img, head_dim)).
A predictor head dim narrower than the backbone's uses an evenly spaced subset of the backbone's
frequency pairs (every axis keeps pairs when head_dim_p / 2 >= the number of axes).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from distributed import sequence_parallel
from models.io import load_state, read_config, save_module
from models.protocol import TextCond, Tokens

PREDICTOR_TYPE = "disca_predictor"
PREDICTOR_VARIANTS = ("single", "hunyuan_video_1_5")
# keys of a backbone config that do not change its weights (ignored when matching a predictor export)
RUNTIME_KEYS = ("attention_backend",)


@dataclass
class PredictorConfig:
    hidden_size: int | None = None  # Hp; None = the backbone's width H
    num_blocks: int = 2  # single-stream blocks (the official predictor uses 2)
    mlp_ratio: float | None = None  # None = the backbone's
    num_heads: int | None = None  # None = max(1, Hp // the backbone's head dim)
    cache_residual: bool = False  # add the cache back before the head (see module docstring)
    variant: str = "single"  # 'single' (HunyuanVideo 1.0 official) | 'hunyuan_video_1_5' (split fusion, double blocks)

    def __post_init__(self) -> None:
        if self.variant not in PREDICTOR_VARIANTS:
            raise ValueError(f"predictor variant {self.variant!r} not in {PREDICTOR_VARIANTS}")
        if self.hidden_size is not None and self.hidden_size <= 0:
            raise ValueError(f"predictor hidden_size must be positive, got {self.hidden_size}")
        if self.num_blocks < 1:
            raise ValueError(f"predictor num_blocks must be >= 1, got {self.num_blocks}")
        if self.mlp_ratio is not None and self.mlp_ratio <= 0:
            raise ValueError(f"predictor mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_heads is not None and self.num_heads <= 0:
            raise ValueError(f"predictor num_heads must be positive, got {self.num_heads}")


# Narrow presets for the built-in sizes, each under 4% of the backbone (tests/test_predictor.py).
PREDICTOR_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=8, mlp_ratio=2.0, num_heads=1, cache_residual=True),  # ~2.4% of MMDiT-tiny
    "small": dict(hidden_size=32, mlp_ratio=4.0, num_heads=1, cache_residual=True),  # ~2.5% of MMDiT-small
    "base": dict(hidden_size=192, num_heads=3, cache_residual=True),  # ~3.5% of MMDiT-base
    "large": dict(hidden_size=512, num_heads=8, cache_residual=True),  # ~3.1% of MMDiT-large
    "hunyuan_video": dict(),  # full width, official design: ~2.4% of HunyuanVideo-13B
}


def backbone_head_dim(backbone: nn.Module) -> int:
    """The attention head dim (= the RoPE table width) of a backbone."""
    cfg = backbone.config
    if "attention_head_dim" in cfg.get("diffusers_config", {}):
        return int(cfg["diffusers_config"]["attention_head_dim"])
    if "num_heads" in cfg:
        return backbone.hidden_size // int(cfg["num_heads"])
    raise ValueError(f"cannot tell the head dim of backbone type {cfg.get('type')!r}: give the predictor num_heads")


def embed_tokens(backbone: nn.Module, x: Tensor, text: TextCond, t: Tensor) -> Tokens:
    """`backbone.embed`, passing t to backbones whose text embedding is time-conditioned (HunyuanVideo's
    token refiner); the built-in MMDiT's embed takes no t."""
    if "t" in inspect.signature(backbone.embed).parameters:
        return backbone.embed(x, text, t=t)
    return backbone.embed(x, text)


def joint_tokens(tokens: Tokens) -> Tensor:
    """(B, N_img + N_txt, H): image then text tokens, the layout of the backbone's hidden state."""
    return torch.cat([tokens.img, tokens.txt], dim=1)


def key_padding_mask(tokens: Tokens) -> Tensor:
    """(B, N_img + N_txt) bool: every image token, the real text tokens."""
    return torch.cat([torch.ones_like(tokens.img[..., 0], dtype=torch.bool), tokens.txt_mask.bool()], dim=1)


def subsample_rope(rope: tuple[Tensor, Tensor] | None, head_dim: int) -> tuple[Tensor, Tensor] | None:
    """Keep `head_dim // 2` evenly spaced interleaved pairs of (cos, sin) tables of shape (N, D)."""
    if rope is None or rope[0].shape[-1] == head_dim:
        return rope
    pairs = rope[0].shape[-1] // 2
    if head_dim > 2 * pairs or head_dim % 2:
        raise ValueError(f"predictor head dim {head_dim} must be even and <= the backbone's RoPE dim {2 * pairs}")
    idx = torch.linspace(0, pairs - 1, head_dim // 2, device=rope[0].device).round().long()
    channels = torch.stack([2 * idx, 2 * idx + 1], dim=-1).flatten()  # (head_dim,)
    return rope[0][:, channels], rope[1][:, channels]


def canonical_config(config: dict) -> dict:
    """A backbone config as JSON would store it (tuples -> lists), without runtime-only keys."""
    cfg = json.loads(json.dumps(dict(config), default=list))
    return {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}


class Predictor(nn.Module):
    """P(C, x_t', r', t', c) -> u (Eq. 5). See the module docstring for the architecture."""

    splits_sequence = True  # shards its tokens like the backbones (distributed/sequence_parallel.py)

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None, num_blocks: int = 2,
                 mlp_ratio: float | None = None, num_heads: int | None = None, cache_residual: bool = False,
                 variant: str = "single"):
        super().__init__()
        cfg = PredictorConfig(hidden_size, num_blocks, mlp_ratio, num_heads, cache_residual, variant)
        h = backbone.hidden_size
        hp = cfg.hidden_size or h
        heads = cfg.num_heads or max(1, hp // backbone_head_dim(backbone))
        if hp % heads:
            raise ValueError(f"predictor hidden_size {hp} is not divisible by num_heads {heads}")
        self.cfg = PredictorConfig(hp, num_blocks, cfg.mlp_ratio, heads, cache_residual, variant)
        self.backbone_config = canonical_config(backbone.config)
        self.head_dim = hp // heads
        ref = next(backbone.parameters())
        factory = dict(device=ref.device, dtype=ref.dtype)
        def fusion() -> nn.Sequential:
            return nn.Sequential(nn.Linear(2 * h, hp, **factory), nn.SiLU(), nn.Linear(hp, hp, **factory))

        # 1. fusion of the current tokens with the cache (1.5: image and text parts separately)
        if variant == "single":
            self.fusion = fusion()
        else:
            self.fusion_img, self.fusion_txt = fusion(), fusion()
        # 2. conditioning: the backbone's adaLN vector, projected when the predictor is narrower
        self.vec_in = nn.Linear(h, hp, **factory) if hp != h else nn.Identity()
        # 3. blocks of the backbone's own single-stream kind (1.5: double-stream)
        if variant == "single":
            self.blocks = backbone.make_single_blocks(num_blocks, hidden_size=hp, mlp_ratio=cfg.mlp_ratio,
                                                      num_heads=heads)
        else:
            self.blocks = make_double_blocks(backbone, num_blocks, hp, heads, cfg.mlp_ratio)
        # 4. back to the backbone's width for its (frozen, shared) output head
        self.out_proj = nn.Linear(hp, h, **factory) if (hp != h or cache_residual) else nn.Identity()
        self.initialize_weights()

    @property
    def config(self) -> dict:
        cfg = asdict(self.cfg)
        if cfg["variant"] == "single":  # the default: exports stay as they were before variants existed
            del cfg["variant"]
        return cfg

    def initialize_weights(self) -> None:
        fusions = [*self.fusion] if self.cfg.variant == "single" else [*self.fusion_img, *self.fusion_txt]
        for m in (*fusions, self.vec_in):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.out_proj, nn.Linear):
            if self.cfg.cache_residual:  # start as the training-free reuse head(C, vec)
                nn.init.zeros_(self.out_proj.weight)
            else:
                nn.init.xavier_uniform_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, r: Tensor | None, text: TextCond, cache: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        tokens = embed_tokens(backbone, x, text, t)
        vec = backbone.condition(t, r, guidance, text.pooled)  # (B, H)
        current = joint_tokens(tokens)  # (B, N, H)
        if cache.shape != current.shape:
            raise ValueError(f"cache shape {tuple(cache.shape)} does not match the current tokens "
                             f"{tuple(current.shape)}: was it computed for this video size and prompt length?")
        vec_p = self.vec_in(vec)  # (B, Hp)
        # sequence parallel (when active): this rank's image tokens through the blocks (as the backbone's run)
        p_tokens = sequence_parallel.shard(replace(tokens, rope=subsample_rope(tokens.rope, self.head_dim)))
        current = sequence_parallel.shard_joint(current, tokens.num_img)
        cache = sequence_parallel.shard_joint(cache.to(current.dtype), tokens.num_img)
        mask = key_padding_mask(p_tokens)
        if self.cfg.variant == "single":
            h = self.fusion(torch.cat([current, cache], dim=-1))  # (B, N, Hp)
            for block in self.blocks:
                h = block(h, vec_p, p_tokens, mask)
        else:  # split cache: image and text parts fused separately, then double-stream blocks
            n = p_tokens.num_img
            img = self.fusion_img(torch.cat([current[:, :n], cache[:, :n]], dim=-1))
            txt = self.fusion_txt(torch.cat([current[:, n:], cache[:, n:]], dim=-1))
            for block in self.blocks:
                img, txt = block(img, txt, vec_p, p_tokens, mask)
            h = torch.cat([img, txt], dim=1)
        hidden = self.out_proj(h)  # (B, N, H)
        if self.cfg.cache_residual:
            hidden = hidden + cache
        hidden, _ = sequence_parallel.gather(hidden)
        return backbone.head(hidden, vec, tokens)


class DoubleStreamBlock(nn.Module):
    """A HunyuanVideo double-stream block (diffusers HunyuanVideoTransformerBlock) run through the adapter's
    `double_block_forward`: (img, txt) -> (img, txt), joint attention over the valid tokens."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: float, qk_norm: str, attention_backend: str):
        super().__init__()
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformerBlock

        self.block = HunyuanVideoTransformerBlock(num_heads, head_dim, mlp_ratio=mlp_ratio, qk_norm=qk_norm)
        self.block.attn.attention_backend = attention_backend

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, tokens: Tokens, key_mask: Tensor) -> tuple[Tensor, Tensor]:
        from models.hunyuan_video import double_block_forward

        return double_block_forward(self.block, img, txt, vec, tokens.rope, key_mask)


def make_double_blocks(backbone: nn.Module, n: int, width: int, heads: int, mlp_ratio: float | None) -> nn.ModuleList:
    """`n` double-stream blocks of HunyuanVideo's kind for the 1.5 predictor variant."""
    cfg = backbone.config
    if cfg.get("type") != "hunyuan_video":
        raise ValueError(f"predictor variant 'hunyuan_video_1_5' needs a backbone with HunyuanVideo double-stream "
                         f"blocks (type 'hunyuan_video'), got {cfg.get('type')!r}")
    d = cfg["diffusers_config"]
    if width % heads:
        raise ValueError(f"hidden_size {width} is not divisible by num_heads {heads}")
    ref = next(backbone.parameters())
    return nn.ModuleList(
        DoubleStreamBlock(heads, width // heads, mlp_ratio or d.get("mlp_ratio", 4.0), d.get("qk_norm", "rms_norm"),
                          cfg.get("attention_backend", "sdpa")).to(device=ref.device, dtype=ref.dtype)
        for _ in range(n))


class ReusePredictor(nn.Module):
    """Training-free cache reuse, the "no learned predictor" ablation (paper Table 3, row 3):
    u = head(C, vec(t', r', g)) - the cached final hidden state through the output head, re-modulated
    by the current step's adaLN vector. No parameters."""

    def forward(self, backbone: nn.Module, x: Tensor, t: Tensor, r: Tensor | None, text: TextCond, cache: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        tokens = embed_tokens(backbone, x, text, t)  # only its grid is used
        vec = backbone.condition(t, r, guidance, text.pooled)
        return backbone.head(cache.to(vec.dtype), vec, tokens)


def parameter_count(module: nn.Module) -> int:
    """Elements of the full parameters (a ZeRO-3 partitioned parameter reports its full size in `ds_numel`)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def parameter_share(predictor: nn.Module, backbone: nn.Module) -> float:
    """The predictor's own parameters as a fraction of the backbone's (the paper's "< 4%" budget)."""
    return parameter_count(predictor) / parameter_count(backbone)


def save_predictor(predictor: Predictor, directory: str | os.PathLike, state: dict | None = None) -> Path:
    """safetensors of the predictor only (or `state`, its gathered state dict when sharded) + config.json
    with its config and the backbone config it belongs to."""
    return save_module(predictor, directory, {"type": PREDICTOR_TYPE, "predictor": predictor.config,
                                              "backbone": predictor.backbone_config}, state=state)


def load_predictor(directory: str | os.PathLike, backbone: nn.Module) -> Predictor:
    """Rebuild a predictor for `backbone` from an export, failing clearly when it was trained for another one."""
    cfg = read_config(directory)
    if cfg.get("type") != PREDICTOR_TYPE:
        raise ValueError(f"{directory} holds a {cfg.get('type')!r} export, not a {PREDICTOR_TYPE!r}")
    want, have = canonical_config(cfg["backbone"]), canonical_config(backbone.config)
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        detail = ", ".join(f"{k}: export {want.get(k)!r} vs given {have.get(k)!r}" for k in diff[:6])
        raise ValueError(f"predictor in {directory} was trained for a different backbone ({detail})")
    predictor = Predictor(backbone, **cfg["predictor"])
    return load_state(predictor, directory)
