"""Adapter: diffusers `WanTransformer3DModel` (text-to-video) behind the backbone protocol.

As in models/hunyuan_video.py the diffusers model is kept whole as `self.model` and its forward is
re-run with its own submodules, so residual updates go through a `FeatureHook` and attention
through `models.layers.attention` ('sdpa' | 'math').

Conventions (diffusers 0.42.1):
- time: t in [0, 1] -> diffusers timestep t * 1000 (float32). Wan is a flow-matching model with
  sigma = timestep / 1000, x_sigma = sigma * eps + (1 - sigma) * x0 and output eps - x0 (the
  schedulers step `x += (sigma_next - sigma) * output`), i.e. our velocity convention: the adapter's
  velocity equals `model(x, t * 1000, tokens).sample`.
- text: Wan has no pooled input (`TextCond.pooled` is ignored) and no text attention mask: the Wan
  pipeline zero-pads the prompt embeddings instead, so `embed` multiplies the tokens by the mask
  (padded tokens become zeros, as the pipeline feeds them) and the cross-attention sees all tokens.
  Text tokens are only read (cross-attention), never updated: the text part of `hidden` is the
  embedded text.
- vec (the adaLN vector) is diffusers' `temb` (B, H); the blocks' modulation
  `time_proj(silu(temb))` (B, 6, H) is derived from it inside `transformer`.
- Only T2V configs: image conditioning (`image_dim` / `added_kv_proj_dim`, Wan I2V) and per-token
  timesteps (Wan 2.2 TI2V `expand_timesteps`) are not supported.

Added conditioning: Wan has no guidance embedder; `enable_guidance_embedding()` adds `guidance_in`,
a copy of Wan's timestep embedder (sinusoid(g * 1000) -> Linear -> SiLU -> Linear) with a zero last
layer, added to temb; `enable_r_embedding(mode)` adds `time_r_in` exactly as for HunyuanVideo
('average' copies the timestep embedder; 'sum' / 'interval' zero the last layer). Both live on this
adapter (not in the diffusers model).

Sharding units (`shard_blocks`): the blocks, each run inside its own call (models/hunyuan_video.py
`route_block`); the embedders, the shared block modulation `block_modulation` (Wan's `time_proj`,
read by every block and by the predictor's blocks) and the head are the root unit, read only in
`embed` / `condition` / `block_modulation` / `head` (the root's FSDP2 forward methods, `root_methods`).

Hook keys. Wan has one block kind (self-attention, cross-attention, FFN on the image tokens); its
blocks use the double-stream names: `double{i}.attn` is the self-attention output before its gate,
`double{i}.cross` the (ungated) cross-attention output, `double{i}.mlp` the FFN output before its
gate; plus `modulated_input` (block 0's modulated input) and `blocks` (the whole stack's residual).
There is no single-stream stack, so `single_blocks` is never called.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from models.hunyuan_video import (R_EMBED_MODES, TIMESTEP_SCALE, DiffusersAdapter, _check_backend, _check_features,
                                  _check_r_mode, _json_config, _wants_observe, _zero_last, route_block)
from models.layers import attention
from models.protocol import PLAIN, FeatureHook, TextCond, Tokens, check_time


def _wan_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Wan's rotary embedding on x (B, heads, N, D) with tables (N, D) (diffusers WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def _wan_attention(attn: nn.Module, x: Tensor, context: Tensor | None, rope) -> Tensor:
    """diffusers WanAttnProcessor (T2V): self-attention when context is None, else cross-attention."""
    if attn.add_k_proj is not None:
        raise NotImplementedError("Wan image conditioning (added_kv_proj_dim, I2V) is not supported")
    kv_in = x if context is None else context
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
        else:
            q = attn.to_q(x)
            k, v = attn.to_kv(kv_in).chunk(2, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(kv_in), attn.to_v(kv_in)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (y.unflatten(2, (attn.heads, -1)).transpose(1, 2) for y in (q, k, v))
    if rope is not None:
        q, k = _wan_rope(q, *rope), _wan_rope(k, *rope)
    # self-attention: every token is a sequence-parallel image token; cross-attention: local queries, whole text
    out = attention(q, k, v, None, attn.attention_backend, sharded_tokens=q.shape[2] if context is None else 0)
    out = out.transpose(1, 2).flatten(2).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


def wan_block_forward(block: nn.Module, img: Tensor, context: Tensor, tproj: Tensor, rope,
                      hook: FeatureHook = PLAIN, name: str = "double") -> Tensor:
    """diffusers WanTransformerBlock.forward (tproj (B, 6, H)) with the outputs of its modules `attn1`
    (self-attention), `attn2` (cross-attention, ungated) and `ffn` through `hook` as `{name}.attn`,
    `{name}.cross` and `{name}.mlp`, before their gates (models/protocol.py)."""
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        block.scale_shift_table + tproj.float()).chunk(6, dim=1)

    def attn_out() -> Tensor:
        n = (block.norm1(img.float()) * (1 + scale_msa) + shift_msa).type_as(img)
        return _wan_attention(block.attn1, n, None, rope)

    img = (img.float() + hook.delta(f"{name}.attn", attn_out) * gate_msa).type_as(img)

    def cross_out() -> Tensor:
        return _wan_attention(block.attn2, block.norm2(img.float()).type_as(img), context, None)

    img = img + hook.delta(f"{name}.cross", cross_out)

    def mlp_out() -> Tensor:
        return block.ffn((block.norm3(img.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(img))

    return (img.float() + hook.delta(f"{name}.mlp", mlp_out).float() * c_gate_msa).type_as(img)


def _modulated_input(block: nn.Module, img: Tensor, tproj: Tensor) -> Tensor:
    """Block `block`'s modulated self-attention input (TeaCache's signal for block 0)."""
    shift, scale = (block.scale_shift_table + tproj.float()).chunk(6, dim=1)[:2]
    return (block.norm1(img.float()) * (1 + scale) + shift).type_as(img)


class WanSingleBlock(nn.Module):
    """A new block of Wan's kind (for the learned predictor), with models.mmdit.SingleStreamBlock's call
    signature: x (B, N_img + N_txt, H) -> same shape; the text part is the cross-attention context and
    is passed through unchanged (`key_mask` is ignored: Wan's cross-attention has no mask). The block's
    modulation `silu(vec) -> Linear -> (B, 6, H)` is, at the backbone's width, the backbone's own
    (`backbone.block_modulation`, called at each forward so that a sharded backbone gathers it; the
    backbone is kept in a list, so it is neither registered, counted nor saved with the block); at
    another width the block owns a new `time_proj` Linear(H, 6H)."""

    def __init__(self, block: nn.Module, backbone: WanBackbone | None, attention_backend: str = "sdpa"):
        super().__init__()
        self.block = block
        self.block.attn1.attention_backend = _check_backend(attention_backend)
        self.block.attn2.attention_backend = attention_backend
        if backbone is None:
            dim = block.scale_shift_table.shape[-1]
            ref = block.scale_shift_table
            self.time_proj = nn.Linear(dim, 6 * dim, device=ref.device, dtype=ref.dtype)
            self._backbone: list[WanBackbone] = []
        else:
            self.time_proj = None
            self._backbone = [backbone]  # a list: not a registered submodule

    def forward(self, x: Tensor, vec: Tensor, tokens: Tokens, key_mask: Tensor | None = None,
                hook: FeatureHook = PLAIN, name: str = "single") -> Tensor:
        n_img = tokens.num_img
        if self.time_proj is not None:
            tproj = self.time_proj(nn.functional.silu(vec)).unflatten(1, (6, -1))
        else:
            tproj = self._backbone[0].block_modulation(vec)
        img = wan_block_forward(self.block, x[:, :n_img], x[:, n_img:], tproj, tokens.rope, hook, name)
        return torch.cat([img, x[:, n_img:]], dim=1)


class WanBackbone(DiffusersAdapter):
    """diffusers WanTransformer3DModel (as `self.model`) implementing `VideoBackbone`."""

    TYPE = "wan"
    splits_sequence = True  # its self-attention is marked (distributed/sequence_parallel.py)
    root_methods = ("embed", "condition", "block_modulation", "head")  # the root unit's FSDP2 forward methods

    def __init__(self, model: nn.Module, *, r_embed: str | None = None, guidance_embed: bool | None = False,
                 attention_backend: str = "sdpa"):
        super().__init__()
        cfg = model.config
        if cfg.get("image_dim") is not None or cfg.get("added_kv_proj_dim") is not None:
            raise NotImplementedError("Wan image conditioning (image_dim / added_kv_proj_dim, I2V) is not supported")
        _check_r_mode(r_embed)
        self.model = model
        for block in self.shard_blocks():
            route_block(block)
        self._attention_backend = _check_backend(attention_backend)
        for blk in model.blocks:
            blk.attn1.attention_backend = attention_backend
            blk.attn2.attention_backend = attention_backend
        self.guidance_in: nn.Module | None = None
        self.time_r_in: nn.Module | None = None
        self.r_embed: str | None = None
        if guidance_embed:
            self.enable_guidance_embedding()
        if r_embed is not None:
            self.enable_r_embedding(r_embed)

    # --- construction ----------------------------------------------------------------------------
    @staticmethod
    def _diffusers_class():
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel

    def shard_blocks(self) -> list[nn.Module]:
        """Per-block sharding units (FSDP2 / ZeRO-3) and checkpointing units: the blocks, whose weights are
        read only inside their (routed) call."""
        return list(self.model.blocks)

    # --- properties ------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {"type": "wan", "diffusers_config": _json_config(self.model.config),
                "guidance_embed": self.guidance_in is not None, "r_embed": self.r_embed,
                "attention_backend": self._attention_backend}

    @property
    def hidden_size(self) -> int:
        return self.model.config.num_attention_heads * self.model.config.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    @property
    def guidance_embed(self) -> bool:
        return self.guidance_in is not None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.model.config.patch_size)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    # --- stage extensions ------------------------------------------------------------------------
    def enable_guidance_embedding(self) -> None:
        """Stage 1: add `guidance_in` (copy of the timestep embedder, zero last layer: output unchanged)."""
        if self.guidance_in is None:
            self.guidance_in = _zero_last(copy.deepcopy(self.model.condition_embedder.time_embedder))

    def enable_r_embedding(self, mode: str) -> None:
        """Stage 2: add `time_r_in`; 'average' copies the timestep embedder, 'sum'/'interval' zero its last layer."""
        if mode not in R_EMBED_MODES:
            raise ValueError(f"r_embed mode {mode!r} not in {R_EMBED_MODES}")
        if self.time_r_in is not None:
            if self.r_embed != mode:
                raise ValueError(f"model already has r_embed={self.r_embed!r}, asked for {mode!r}")
            return
        emb = copy.deepcopy(self.model.condition_embedder.time_embedder)
        self.time_r_in = emb if mode == "average" else _zero_last(emb)
        self.r_embed = mode

    # --- the protocol ------------------------------------------------------------------------------
    def embed(self, x: Tensor, text: TextCond, t: Tensor | None = None) -> Tokens:
        """Patch-embed the video and project the text (t is accepted for API symmetry and unused)."""
        c = self.model.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, F, H, W), got {tuple(x.shape)}")
        pt, ph, pw = self.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"video size {tuple(x.shape[2:])} is not divisible by patch size {(pt, ph, pw)}")
        if text.batch_size != x.shape[0]:
            raise ValueError(f"text batch {text.batch_size} != video batch {x.shape[0]}")
        if text.tokens.shape[-1] != c.text_dim:
            raise ValueError(f"text tokens have dim {text.tokens.shape[-1]}, model expects {c.text_dim}")
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        x = x.to(self.dtype)
        cos, sin = self.model.rope(x)  # (1, N, 1, D) each
        img = self.model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        mask = text.mask.bool()
        te = self.model.condition_embedder.text_embedder
        tokens = text.tokens.to(te.linear_1.weight.dtype) * mask[..., None]  # zero padding, as the pipeline
        return Tokens(img=img, txt=te(tokens), txt_mask=mask, grid=grid, rope=(cos[0, :, 0], sin[0, :, 0]))

    def _embed_time(self, embedder: nn.Module, s: Tensor) -> Tensor:
        proj = self.model.condition_embedder.timesteps_proj(s * TIMESTEP_SCALE)
        dtype = next(iter(embedder.parameters())).dtype
        return embedder(proj.to(dtype)).to(self.dtype)

    def condition(self, t: Tensor, r: Tensor | None, guidance: Tensor | None, pooled: Tensor | None = None) -> Tensor:
        """temb (B, H) = time(t) [+ r term] [+ guidance(g)]; `pooled` is ignored (Wan has none)."""
        b = t.shape[0]
        check_time("t", t, b)
        check_time("r", r, b)
        check_time("guidance", guidance, b)
        vec = self._embed_time(self.model.condition_embedder.time_embedder, t)
        if self.time_r_in is not None:
            r = t if r is None else r
            if self.r_embed == "average":
                vec = (vec + self._embed_time(self.time_r_in, r)) / 2
            elif self.r_embed == "sum":
                vec = vec + self._embed_time(self.time_r_in, r)
            else:
                vec = vec + self._embed_time(self.time_r_in, t - r)
        elif r is not None and not torch.equal(r, t):
            raise ValueError("this model has no r embedding (enable_r_embedding) but got r != t")
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass guidance (the CFG scale, float32 (B,))")
            vec = vec + self._embed_time(self.guidance_in, guidance)
        return vec

    def block_modulation(self, vec: Tensor) -> Tensor:
        """The blocks' shared modulation `time_proj(silu(vec))` (B, 6, H), a root-unit read (see module doc)."""
        ce = self.model.condition_embedder
        return ce.time_proj(ce.act_fn(vec)).unflatten(1, (6, -1))  # (B, 6, H)

    def transformer(self, tokens: Tokens, vec: Tensor, *, hook: FeatureHook = PLAIN,
                    feature_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        blocks = self.model.blocks
        tproj = self.block_modulation(vec)
        features: list[Tensor] = []
        wanted = _check_features(feature_layers, self.num_blocks)
        if _wants_observe(hook) and len(blocks):  # read inside block 0's call
            hook.observe("modulated_input", blocks[0](tokens.img, tproj, block_fn=_modulated_input))
        x0 = torch.cat([tokens.img, tokens.txt], dim=1)

        def run_all() -> Tensor:
            img = tokens.img
            for i, block in enumerate(blocks):
                img = block(img, tokens.txt, tproj, tokens.rope, hook=hook, name=f"double{i}",
                            block_fn=wan_block_forward)
                if i in wanted:
                    features.append(img)
            return torch.cat([img, tokens.txt], dim=1) - x0

        hidden = x0 + hook.delta("blocks", run_all)
        return hidden, features

    def native_forward(self, x: Tensor, t: Tensor, text: TextCond, guidance: Tensor | None = None) -> Tensor:
        """The velocity from diffusers' OWN forward (`WanTransformer3DModel.forward`) on this adapter's
        inputs (t * 1000, zero-padded prompt): what diffusers' block-level cache hooks run on
        (caching/diffusers_caches.py). The adapter's added guidance / r embedders are not diffusers
        weights, so models that have them are refused."""
        if self.time_r_in is not None or self.guidance_in is not None:
            raise ValueError("diffusers' own Wan forward has no guidance or r input, but this model has an added "
                             f"{'r' if self.time_r_in is not None else 'guidance'} embedding; use run() instead")
        if guidance is not None:
            raise ValueError("this Wan model has no guidance embedding: pass guidance=None")
        check_time("t", t, x.shape[0])
        tokens = text.tokens.to(self.dtype) * text.mask.bool()[..., None].to(self.dtype)
        return self.model(hidden_states=x.to(self.dtype), timestep=t * TIMESTEP_SCALE, encoder_hidden_states=tokens,
                          return_dict=False)[0]

    def head(self, hidden: Tensor, vec: Tensor, tokens: Tokens) -> Tensor:
        m = self.model
        pt, ph, pw = self.patch_size
        f, h, w = tokens.grid
        img = hidden[:, : tokens.num_img]
        shift, scale = (m.scale_shift_table + vec.unsqueeze(1)).chunk(2, dim=1)
        out = m.proj_out((m.norm_out(img.float()) * (1 + scale) + shift).type_as(img))
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def make_single_blocks(self, n: int, hidden_size: int | None = None, mlp_ratio: float | None = None,
                           num_heads: int | None = None) -> nn.ModuleList:
        """New blocks of Wan's kind (diffusers WanTransformerBlock, default init) on this backbone's device
        and dtype, of width `hidden_size` (default the backbone's) with `num_heads` heads; `tokens.rope`
        must have their head dim. At the backbone's width they share its modulation projection."""
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock

        c = self.model.config
        width = hidden_size or self.hidden_size
        heads = num_heads or max(1, width // c.attention_head_dim)
        if width % heads:
            raise ValueError(f"hidden_size {width} is not divisible by num_heads {heads}")
        ffn = int(width * mlp_ratio) if mlp_ratio else round(c.ffn_dim * width / self.hidden_size)
        ref = self.model.patch_embedding.weight
        shared = self if width == self.hidden_size else None
        blocks = []
        for _ in range(n):
            blk = WanTransformerBlock(width, ffn, heads, c.qk_norm, c.cross_attn_norm, c.eps, None)
            blocks.append(WanSingleBlock(blk.to(device=ref.device, dtype=ref.dtype), shared, self._attention_backend))
        return nn.ModuleList(blocks)
