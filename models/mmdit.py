"""Built-in HunyuanVideo-shaped MMDiT: double-stream blocks, then single-stream blocks, 3D RoPE, adaLN.

Shapes: video x (B, C, F, H, W) -> patches (B, N, C*pt*ph*pw) -> tokens (B, N, D). Text tokens
(B, L, D_txt) are projected to (B, L, D) and attend jointly with the image tokens; only image
tokens carry RoPE (as in HunyuanVideo). Sizes come from the `MMDIT_SIZES` registry.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.layers import (ATTENTION_BACKENDS, MLPEmbedder, RMSNorm, TimestepEmbedder, apply_rope, attention,
                           modulate, rope_3d)
from models.protocol import PLAIN, ComposedBackbone, FeatureHook, TextCond, Tokens, check_time, observes

R_EMBED_MODES = ("average", "sum", "interval")


@dataclass
class MMDiTConfig:
    in_channels: int = 3
    patch_size: tuple[int, int, int] = (1, 4, 4)
    hidden_size: int = 128
    num_heads: int = 4
    depth_double: int = 2
    depth_single: int = 2
    mlp_ratio: float = 4.0
    text_dim: int = 384
    pooled_dim: int = 384
    rope_axes_dim: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 256.0
    guidance_embed: bool = False  # stage 1 adds a guidance embedder
    r_embed: str | None = None  # stage 2 adds a second time input: 'average' | 'sum' | 'interval'
    attention_backend: str = "sdpa"

    def __post_init__(self) -> None:
        self.patch_size = tuple(self.patch_size)
        self.rope_axes_dim = tuple(self.rope_axes_dim)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if sum(self.rope_axes_dim) != head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"rope_axes_dim {self.rope_axes_dim} must be even and sum to the head dim {head_dim}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (pt, ph, pw), got {self.patch_size}")
        if self.r_embed not in (None, *R_EMBED_MODES):
            raise ValueError(f"r_embed {self.r_embed!r} not in {(None, *R_EMBED_MODES)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend {self.attention_backend!r} not in {ATTENTION_BACKENDS}")


# Named sizes (DiT-style registry). `small` is the default CPU teacher; `base`/`large` are for GPUs.
MMDIT_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_heads=2, depth_double=1, depth_single=1, rope_axes_dim=(4, 6, 6)),
    "small": dict(hidden_size=128, num_heads=4, depth_double=2, depth_single=2, rope_axes_dim=(8, 12, 12)),
    "base": dict(hidden_size=384, num_heads=6, depth_double=4, depth_single=8, rope_axes_dim=(16, 24, 24)),
    "large": dict(hidden_size=768, num_heads=12, depth_double=8, depth_single=16, rope_axes_dim=(16, 24, 24)),
}


class Modulation(nn.Module):
    """vec (B, D) -> n chunks of (B, D) for shift/scale/gate."""

    def __init__(self, hidden_size: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(hidden_size, n * hidden_size)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(F.silu(vec)).chunk(self.n, dim=-1)


class StreamParts(nn.Module):
    """One stream of a double block: modulation, qkv, q/k norm, attention projection, MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.mod = Modulation(hidden_size, 6)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))

    def qkv_heads(self, x: Tensor, shift: Tensor, scale: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(modulate(self.norm1(x), shift, scale)), "b n (k h d) -> k b h n d", k=3, h=num_heads)
        return self.q_norm(q), self.k_norm(k), v


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, joint attention (HunyuanVideo MMDoubleStreamBlock)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attention_backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.attention_backend = attention_backend
        self.img = StreamParts(hidden_size, num_heads, mlp_ratio)
        self.txt = StreamParts(hidden_size, num_heads, mlp_ratio)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, tokens: Tokens, key_mask: Tensor | None,
                hook: FeatureHook = PLAIN, name: str = "double") -> tuple[Tensor, Tensor]:
        n_img = img.shape[1]
        i_sh1, i_sc1, i_g1, i_sh2, i_sc2, i_g2 = self.img.mod(vec)
        t_sh1, t_sc1, t_g1, t_sh2, t_sc2, t_g2 = self.txt.mod(vec)

        def attn_out() -> Tensor:  # (B, N_img + N_txt, D) attention outputs of both streams, before the gate
            iq, ik, iv = self.img.qkv_heads(img, i_sh1, i_sc1, self.num_heads)
            tq, tk, tv = self.txt.qkv_heads(txt, t_sh1, t_sc1, self.num_heads)
            if tokens.rope is not None:
                iq, ik = apply_rope(iq, *tokens.rope), apply_rope(ik, *tokens.rope)
            out = attention(torch.cat([iq, tq], 2), torch.cat([ik, tk], 2), torch.cat([iv, tv], 2), key_mask,
                            self.attention_backend, sharded_tokens=n_img)
            out = rearrange(out, "b h n d -> b n (h d)")
            return torch.cat([self.img.proj(out[:, :n_img]), self.txt.proj(out[:, n_img:])], dim=1)

        a = hook.delta(f"{name}.attn", attn_out)  # the gate of THIS step is applied outside the hook
        img, txt = img + i_g1[:, None] * a[:, :n_img], txt + t_g1[:, None] * a[:, n_img:]

        def mlp_out() -> Tensor:
            return torch.cat([self.img.mlp(modulate(self.img.norm2(img), i_sh2, i_sc2)),
                              self.txt.mlp(modulate(self.txt.norm2(txt), t_sh2, t_sc2))], dim=1)

        m = hook.delta(f"{name}.mlp", mlp_out)
        return img + i_g2[:, None] * m[:, :n_img], txt + t_g2[:, None] * m[:, n_img:]


class SingleStreamBlock(nn.Module):
    """Shared weights over the concatenated tokens; attention and MLP in parallel
    (HunyuanVideo MMSingleStreamBlock). linear1/linear2 are fused as in the original, and applied
    as their attention and MLP slices so each residual update can be cached on its own."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, attention_backend: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.attention_backend = attention_backend
        head_dim = hidden_size // num_heads
        self.mod = Modulation(hidden_size, 3)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.q_norm, self.k_norm = RMSNorm(head_dim), RMSNorm(head_dim)

    def forward(self, x: Tensor, vec: Tensor, tokens: Tokens, key_mask: Tensor | None,
                hook: FeatureHook = PLAIN, name: str = "single") -> Tensor:
        n_img, d = tokens.num_img, self.hidden_size
        shift, scale, gate = self.mod(vec)
        x_mod = modulate(self.norm(x), shift, scale)

        def attn_out() -> Tensor:  # the attention slice of linear2, before the gate
            qkv = F.linear(x_mod, self.linear1.weight[: 3 * d], self.linear1.bias[: 3 * d])
            q, k, v = rearrange(qkv, "b n (k h e) -> k b h n e", k=3, h=self.num_heads)
            q, k = self.q_norm(q), self.k_norm(k)
            if tokens.rope is not None:
                q = torch.cat([apply_rope(q[:, :, :n_img], *tokens.rope), q[:, :, n_img:]], 2)
                k = torch.cat([apply_rope(k[:, :, :n_img], *tokens.rope), k[:, :, n_img:]], 2)
            out = rearrange(attention(q, k, v, key_mask, self.attention_backend, sharded_tokens=n_img),
                            "b h n e -> b n (h e)")
            return F.linear(out, self.linear2.weight[:, :d])

        def mlp_out() -> Tensor:  # the MLP slice of linear2 (with its bias), before the gate
            h = F.linear(x_mod, self.linear1.weight[3 * d:], self.linear1.bias[3 * d:])
            return F.linear(F.gelu(h, approximate="tanh"), self.linear2.weight[:, d:], self.linear2.bias)

        g = gate[:, None]
        return x + g * hook.delta(f"{name}.attn", attn_out) + g * hook.delta(f"{name}.mlp", mlp_out)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mod = Modulation(hidden_size, 2)
        self.linear = nn.Linear(hidden_size, out_dim)

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.mod(vec)
        return self.linear(modulate(self.norm(x), shift, scale))


class MMDiT(ComposedBackbone):
    """The built-in backbone; implements `models.protocol.VideoBackbone`."""

    splits_sequence = True  # its blocks mark their joint attention (distributed/sequence_parallel.py)

    def __init__(self, size: str | None = None, config: dict | MMDiTConfig | None = None):
        """`size` picks a preset from MMDIT_SIZES; `config` overrides single fields (or is a full config)."""
        super().__init__()
        if isinstance(config, MMDiTConfig):
            cfg = config
        else:
            if size is not None and size not in MMDIT_SIZES:
                raise ValueError(f"unknown MMDiT size {size!r}; expected one of {sorted(MMDIT_SIZES)}")
            fields = {**MMDIT_SIZES.get(size, {}), **dict(config or {})}
            fields.pop("type", None)
            unknown = sorted(set(fields) - set(MMDiTConfig.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown MMDiT config keys {unknown}; valid keys: {sorted(MMDiTConfig.__dataclass_fields__)}")
            cfg = MMDiTConfig(**fields)
        self.cfg = cfg
        h = cfg.hidden_size
        pt, ph, pw = cfg.patch_size
        self.hidden_size = h
        # 1. input embedders
        self.img_in = nn.Linear(cfg.in_channels * pt * ph * pw, h)
        self.txt_in = MLPEmbedder(cfg.text_dim, h)
        # 2. conditioning: time, pooled text, optional guidance and second time input
        self.time_in = TimestepEmbedder(h)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, h)
        self.guidance_in = TimestepEmbedder(h) if cfg.guidance_embed else None
        self.time_r_in = TimestepEmbedder(h) if cfg.r_embed else None
        # 3. transformer blocks
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio, cfg.attention_backend) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(h, cfg.num_heads, cfg.mlp_ratio, cfg.attention_backend) for _ in range(cfg.depth_single))
        # 4. output head
        self.final = FinalLayer(h, cfg.in_channels * pt * ph * pw)
        self.initialize_weights()

    @classmethod
    def from_size(cls, size: str, **overrides) -> "MMDiT":
        return cls(size=size, config=overrides)

    @property
    def config(self) -> dict:
        return {"type": "mmdit", **asdict(self.cfg)}

    @property
    def num_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    def shard_blocks(self) -> list[nn.Module]:
        """Per-block sharding units (FSDP2 / ZeRO-3): each block's weights are read only inside its forward."""
        return [*self.double_blocks, *self.single_blocks]

    def initialize_weights(self) -> None:
        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(_basic)
        # timestep embedders: small normal init, as in DiT
        for emb in (self.time_in, self.guidance_in, self.time_r_in):
            if emb is not None:
                nn.init.normal_(emb.mlp[0].weight, std=0.02)
                nn.init.normal_(emb.mlp[2].weight, std=0.02)
        # zero-out adaLN modulation: every block starts as the identity (adaLN-Zero)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
                nn.init.zeros_(m.lin.bias)
        # zero-out the output projection: the initial prediction is 0
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    # --- stage extensions: start exactly equal to the model they extend --------------------------
    def enable_guidance_embedding(self) -> None:
        """Stage 1: add a guidance embedder whose last layer is zero, so the output is unchanged."""
        if self.guidance_in is not None:
            return
        self.guidance_in = TimestepEmbedder(self.hidden_size).to(self.time_in.mlp[0].weight)
        nn.init.normal_(self.guidance_in.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.guidance_in.mlp[2].weight)
        nn.init.zeros_(self.guidance_in.mlp[2].bias)
        self.cfg.guidance_embed = True

    def enable_r_embedding(self, mode: str) -> None:
        """Stage 2: add the second time input r. 'average' copies time_in (at r = t the mean equals
        time_in(t)); 'sum' and 'interval' zero the last layer (the added term starts at 0)."""
        if mode not in R_EMBED_MODES:
            raise ValueError(f"r_embed mode {mode!r} not in {R_EMBED_MODES}")
        if self.time_r_in is not None:
            if self.cfg.r_embed != mode:
                raise ValueError(f"model already has r_embed={self.cfg.r_embed!r}, asked for {mode!r}")
            return
        self.time_r_in = TimestepEmbedder(self.hidden_size).to(self.time_in.mlp[0].weight)
        if mode == "average":
            self.time_r_in.load_state_dict(self.time_in.state_dict())
        else:
            nn.init.zeros_(self.time_r_in.mlp[2].weight)
            nn.init.zeros_(self.time_r_in.mlp[2].bias)
        self.cfg.r_embed = mode

    # --- the protocol ------------------------------------------------------------------------------
    def embed(self, x: Tensor, text: TextCond, t: Tensor | None = None) -> Tokens:
        """`t` is unused here (no timestep-dependent token refiner); accepted for the protocol."""
        cfg = self.cfg
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, F, H, W), got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"video size {tuple(x.shape[2:])} is not divisible by patch_size {cfg.patch_size}")
        if text.batch_size != x.shape[0]:
            raise ValueError(f"text batch {text.batch_size} != video batch {x.shape[0]}")
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        patches = rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
        patches = patches.to(self.img_in.weight.dtype)  # float32 inputs into a bf16 model (DeepSpeed bf16)
        cos, sin = rope_3d(grid, cfg.rope_axes_dim, cfg.rope_theta, device=x.device)
        return Tokens(img=self.img_in(patches), txt=self.txt_in(text.tokens.to(patches.dtype)),
                      txt_mask=text.mask.bool(), grid=grid, rope=(cos, sin))

    def condition(self, t: Tensor, r: Tensor | None, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        b = pooled.shape[0]
        check_time("t", t, b)
        check_time("r", r, b)
        check_time("guidance", guidance, b)
        vec = self.time_in(t)
        if self.time_r_in is not None:
            r = t if r is None else r
            mode = self.cfg.r_embed
            if mode == "average":  # HunyuanVideo 1.0 style
                vec = (vec + self.time_r_in(r)) / 2
            elif mode == "sum":  # HunyuanVideo 1.5 style
                vec = vec + self.time_r_in(r)
            else:  # 'interval': embed the length t - r
                vec = vec + self.time_r_in(t - r)
        elif r is not None and not torch.equal(r, t):
            raise ValueError("this model has no r embedding (enable_r_embedding) but got r != t")
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: pass guidance (the CFG scale, float32 (B,))")
            vec = vec + self.guidance_in(guidance)
        return vec + self.vector_in(pooled.to(vec.dtype))

    def transformer(self, tokens: Tokens, vec: Tensor, *, hook: FeatureHook = PLAIN,
                    feature_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        n_img = tokens.num_img
        key_mask = torch.cat([torch.ones_like(tokens.img[..., 0], dtype=torch.bool), tokens.txt_mask], dim=1)
        features: list[Tensor] = []
        wanted = set(feature_layers)
        if wanted and (min(wanted) < 0 or max(wanted) >= self.num_blocks):
            raise ValueError(f"feature_layers {sorted(wanted)} out of range [0, {self.num_blocks})")
        # TeaCache's signal: block 0's modulated image input (cheap, computed before any block)
        first = self.double_blocks[0] if len(self.double_blocks) else None
        if first is not None and observes(hook):  # only caches observe: training never reads block 0 here
            shift, scale = first.img.mod(vec)[:2]
            hook.observe("modulated_input", modulate(first.img.norm1(tokens.img), shift, scale))
        x0 = torch.cat([tokens.img, tokens.txt], dim=1)

        def run_double() -> Tensor:
            img, txt = tokens.img, tokens.txt
            for i, block in enumerate(self.double_blocks):
                img, txt = block(img, txt, vec, tokens, key_mask, hook, name=f"double{i}")
                if i in wanted:
                    features.append(img)
            return torch.cat([img, txt], dim=1)

        def run_all() -> Tensor:
            x = run_double()

            def single_delta() -> Tensor:
                y = x
                for j, block in enumerate(self.single_blocks):
                    y = block(y, vec, tokens, key_mask, hook, name=f"single{j}")
                    if len(self.double_blocks) + j in wanted:
                        features.append(y[:, :n_img])
                return y - x

            return x + hook.delta("single_blocks", single_delta) - x0

        hidden = x0 + hook.delta("blocks", run_all)
        return hidden, features

    def head(self, hidden: Tensor, vec: Tensor, tokens: Tokens) -> Tensor:
        pt, ph, pw = self.cfg.patch_size
        f, h, w = tokens.grid
        out = self.final(hidden[:, : tokens.num_img], vec)
        return rearrange(out, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def make_single_blocks(self, n: int, hidden_size: int | None = None, mlp_ratio: float | None = None,
                           num_heads: int | None = None) -> nn.ModuleList:
        """New blocks of this backbone's single-stream kind (the learned predictor uses them)."""
        return nn.ModuleList(SingleStreamBlock(hidden_size or self.hidden_size, num_heads or self.cfg.num_heads,
                                               mlp_ratio or self.cfg.mlp_ratio, self.cfg.attention_backend)
                             for _ in range(n))
