"""Adapter: diffusers `HunyuanVideoTransformer3DModel` behind the backbone protocol (models/protocol.py).

The diffusers model is kept whole as `self.model` (so its weights, `save_pretrained` and
`from_pretrained` stay diffusers-compatible); this adapter re-implements its forward pass with the
model's own submodules so that every residual update is routed through a `FeatureHook`, the
attention runs through `models.layers.attention` (switchable to explicit 'math' attention for
`torch.func.jvp`), and the pieces `embed` / `condition` / `transformer` / `head` are exposed.

Conventions (checked against diffusers 0.42.1):
- time: our t in [0, 1] (float32, t = 1 is noise) maps to the diffusers timestep `t * 1000`.
  HunyuanVideo's scheduler (FlowMatchEulerDiscreteScheduler) uses sigma = timestep / 1000,
  x_sigma = sigma * eps + (1 - sigma) * x0 and steps `x += (sigma_next - sigma) * model_output`,
  so the model output is d x / d sigma = eps - x0: exactly our velocity convention. The adapter's
  velocity therefore equals `model(x, t * 1000, ...).sample` with no sign or scale change.
  (Pipelines cast the timestep to the model dtype; we keep t * 1000 in float32, SPEC §2.)
- guidance: our guidance is the raw CFG scale; like the diffusers pipeline we feed `guidance * 1000`
  to the guidance embedder.
- text: `TextCond.tokens` = `encoder_hidden_states`, `TextCond.mask` = `encoder_attention_mask`,
  `TextCond.pooled` = `pooled_projections`.
- The token refiner (`context_embedder`) is conditioned on the timestep, so `embed` needs t:
  `embed(x, text, t=t)` (`run` passes it). Calling `embed(x, text)` without t raises unless the
  model has no refiner layers.
- Joint attention key mask = what diffusers builds: the first `N_img + mask.sum()` tokens are
  attended (i.e. the text mask is assumed right-padded, as the HunyuanVideo pipeline produces).
  The refiner's self-attention mask is also reproduced exactly (padded query rows attend only to
  text token 0).
- Single-stream blocks apply their fused output projection `proj_out` as two slices (attention
  part, MLP part + bias) so that each block output can be cached on its own; this is equal to
  diffusers up to float rounding (~1e-7 relative).
- Sharding units (`shard_blocks`): every double- and single-stream block runs this module's block
  function inside the diffusers block's own call (`route_block`), so FSDP2, ZeRO-3 leaf modules and
  per-block activation checkpointing treat it as one unit, as the built-in MMDiT's blocks; the embedders,
  the token refiner, the conditioning and the output head are read only in `embed` / `condition` /
  `head` (the root unit).

Added conditioning (SPEC §3): `enable_guidance_embedding()` adds the diffusers guidance embedder
(a copy of the timestep embedder with a zero last layer) when the model was built without one and
sets `guidance_embeds=True` in the diffusers config, so the diffusers model itself stays usable;
`enable_r_embedding(mode)` adds `time_r_in` (same kind as the timestep embedder), stored on this
adapter (it is not a diffusers weight): 'average' -> (time(t) + time_r(r)) / 2 with time_r a copy of
time; 'sum' -> time(t) + time_r(r); 'interval' -> time(t) + time_r(t - r); both zero-initialised.

Hook keys: `modulated_input` (observed: block 0's modulated image input), `blocks`,
`single_blocks` (residuals), `double{i}.attn`, `double{i}.mlp`, `single{j}.attn`, `single{j}.mlp`
(outputs before the adaLN gate, which the block applies outside the hook; models/protocol.py).
"""
from __future__ import annotations

import copy
import json
import re
import types
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from models.layers import ATTENTION_BACKENDS, apply_rope, attention
from models.protocol import PLAIN, ComposedBackbone, FeatureHook, TextCond, Tokens, check_time

R_EMBED_MODES = ("average", "sum", "interval")
TIMESTEP_SCALE = 1000.0  # our t in [0, 1] -> diffusers timestep in [0, 1000]


# --- helpers shared with models/wan.py -------------------------------------------------------------
def _json_config(cfg: Any) -> dict:
    """A diffusers config as a plain JSON-able dict without the private `_...` keys."""
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not str(k).startswith("_")},
                                 default=list))


def _resolve_local(path: str | Path, subfolder: str | None) -> tuple[str, str | None]:
    """(directory, subfolder) for a local diffusers model; `path` may also be the model folder itself."""
    p = Path(path)
    if subfolder and (p / subfolder / "config.json").is_file():
        return str(p), subfolder
    if (p / "config.json").is_file():
        return str(p), None
    where = p / subfolder if subfolder else p
    raise FileNotFoundError(f"no diffusers config.json in {str(where)!r} (nor in {str(p)!r}); "
                            "from_pretrained only loads local directories")


def load_diffusers_model(model_cls, directory: str, subfolder: str | None, **kwargs) -> nn.Module:
    """`model_cls.from_pretrained` from a local directory. diffusers refuses to load models with
    `_keep_in_fp32_modules` (e.g. Wan) when `accelerate` is not installed; then the config and the
    safetensors weights (single file or sharded index) are loaded here instead, with the same
    dtype rule (`torch_dtype` for all weights except the keep-in-fp32 modules)."""
    from diffusers.utils import is_accelerate_available

    if is_accelerate_available() or not getattr(model_cls, "_keep_in_fp32_modules", None):
        return model_cls.from_pretrained(directory, subfolder=subfolder, local_files_only=True, **kwargs)
    from safetensors.torch import load_file

    root = Path(directory) / subfolder if subfolder else Path(directory)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if kwargs:
        raise ValueError(f"from_pretrained options {sorted(kwargs)} need `accelerate` (not installed)")
    model = model_cls.from_config(model_cls.load_config(str(root)))
    single = root / "diffusion_pytorch_model.safetensors"
    index = root / "diffusion_pytorch_model.safetensors.index.json"
    if single.is_file():
        state = load_file(str(single))
    elif index.is_file():
        state = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(root / name)))
    else:
        raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or its index) in {str(root)!r}")
    ignore = getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or []
    state = {k: v for k, v in state.items() if not any(re.search(pat, k) for pat in ignore)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {str(root)!r} do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if torch_dtype is not None:
        keep = set(model_cls._keep_in_fp32_modules)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else torch_dtype)
    return model.eval()


def _check_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {backend!r} not in {ATTENTION_BACKENDS}")
    return backend


def _check_r_mode(mode: str | None) -> None:
    if mode not in (None, *R_EMBED_MODES):
        raise ValueError(f"r_embed mode {mode!r} not in {(None, *R_EMBED_MODES)}")


def _zero_last(embedder: nn.Module) -> nn.Module:
    """Zero the output layer of a diffusers `TimestepEmbedding` (linear_1 -> act -> linear_2)."""
    nn.init.zeros_(embedder.linear_2.weight)
    if embedder.linear_2.bias is not None:
        nn.init.zeros_(embedder.linear_2.bias)
    return embedder


def _wants_observe(hook: FeatureHook) -> bool:
    return type(hook).observe is not FeatureHook.observe


def _check_features(feature_layers: Sequence[int], num_blocks: int) -> set[int]:
    wanted = set(int(i) for i in feature_layers)
    if wanted and (min(wanted) < 0 or max(wanted) >= num_blocks):
        raise ValueError(f"feature_layers {sorted(wanted)} out of range [0, {num_blocks})")
    return wanted


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, heads * D) -> (B, N, heads, D)."""
    return x.unflatten(2, (heads, -1))


# --- the diffusers blocks, re-run with hooks -------------------------------------------------------
def route_block(block: nn.Module) -> nn.Module:
    """Give a diffusers block a second entry point through its own call: `block(*args, block_fn=f, **kw)`
    runs `f(block, *args, **kw)` (this project's re-implementation, with the cache hooks), any other call
    runs diffusers' own `forward` (`native_forward`, diffusers' cache hooks). Why: FSDP2 units
    (`fully_shard`), ZeRO-3 leaf modules and composable activation checkpointing all act in a module's
    forward hooks, so running the block function inside the block's call makes the block a sharding and
    checkpointing unit, while the module tree, the block's class and hence the state-dict keys stay
    diffusers' own. The entry point is an instance attribute bound to the block (`copy.deepcopy` rebinds
    it to the copy)."""
    block.forward = types.MethodType(_routed_forward, block)
    return block


def _routed_forward(self: nn.Module, *args, block_fn=None, **kwargs):
    if block_fn is None:
        return type(self).forward(self, *args, **kwargs)
    return block_fn(self, *args, **kwargs)


def joint_key_mask(tokens: Tokens) -> Tensor:
    """(B, N_img + N_txt) bool key mask exactly as diffusers builds it: the first
    N_img + sum(text mask) tokens are valid (right padding assumed)."""
    b, n_txt = tokens.txt_mask.shape
    n = tokens.num_img + n_txt
    valid = tokens.num_img + tokens.txt_mask.sum(dim=1, dtype=torch.int)
    return torch.arange(n, device=tokens.txt_mask.device)[None] < valid[:, None]


def _qk_norm(norm: nn.Module | None, x: Tensor) -> Tensor:
    return x if norm is None else norm(x)


def _rope(x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """x (B, heads, N, D); HunyuanVideo rotates interleaved pairs (diffusers apply_rotary_emb, real)."""
    return x if rope is None else apply_rope(x, *rope)


def _double_attention(attn: nn.Module, img: Tensor, txt: Tensor, rope, key_mask: Tensor) -> tuple[Tensor, Tensor]:
    """HunyuanVideoAttnProcessor2_0 for a double-stream block (separate text projections)."""
    h = attn.heads
    q = _qk_norm(attn.norm_q, _heads(attn.to_q(img), h)).transpose(1, 2)
    k = _qk_norm(attn.norm_k, _heads(attn.to_k(img), h)).transpose(1, 2)
    v = _heads(attn.to_v(img), h).transpose(1, 2)
    q, k = _rope(q, rope), _rope(k, rope)
    tq = _qk_norm(attn.norm_added_q, _heads(attn.add_q_proj(txt), h)).transpose(1, 2)
    tk = _qk_norm(attn.norm_added_k, _heads(attn.add_k_proj(txt), h)).transpose(1, 2)
    tv = _heads(attn.add_v_proj(txt), h).transpose(1, 2)
    out = attention(torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2), key_mask,
                    attn.attention_backend, sharded_tokens=img.shape[1])
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    n_img = img.shape[1]
    out_img, out_txt = out[:, :n_img], out[:, n_img:]
    return attn.to_out[1](attn.to_out[0](out_img)), attn.to_add_out(out_txt)


def _single_attention(attn: nn.Module, x: Tensor, n_img: int, rope, key_mask: Tensor) -> Tensor:
    """HunyuanVideoAttnProcessor2_0 for a single-stream block (shared projections, RoPE on image
    tokens only, no output projection: `proj_out` of the block does it)."""
    h = attn.heads
    q = _qk_norm(attn.norm_q, _heads(attn.to_q(x), h)).transpose(1, 2)
    k = _qk_norm(attn.norm_k, _heads(attn.to_k(x), h)).transpose(1, 2)
    v = _heads(attn.to_v(x), h).transpose(1, 2)
    if rope is not None:
        q = torch.cat([_rope(q[:, :, :n_img], rope), q[:, :, n_img:]], 2)
        k = torch.cat([_rope(k[:, :, :n_img], rope), k[:, :, n_img:]], 2)
    out = attention(q, k, v, key_mask, attn.attention_backend, sharded_tokens=n_img)
    return out.transpose(1, 2).flatten(2).to(q.dtype)


def double_block_forward(block: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, rope, key_mask: Tensor,
                         hook: FeatureHook = PLAIN, name: str = "double") -> tuple[Tensor, Tensor]:
    """diffusers HunyuanVideoTransformerBlock.forward, with the attention output (`block.attn`, both
    streams) and the feed-forward outputs (`ff`, `ff_context`) through `hook` BEFORE their gates: the
    outputs diffusers' own cache hooks see when they hook those modules."""
    n_img = img.shape[1]
    norm_img, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(img, emb=vec)
    norm_txt, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(txt, emb=vec)

    def attn_out() -> Tensor:
        return torch.cat(_double_attention(block.attn, norm_img, norm_txt, rope, key_mask), dim=1)

    a = hook.delta(f"{name}.attn", attn_out)
    img, txt = img + a[:, :n_img] * gate_msa.unsqueeze(1), txt + a[:, n_img:] * c_gate_msa.unsqueeze(1)

    def mlp_out() -> Tensor:
        n_i = block.norm2(img) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        n_t = block.norm2_context(txt) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        return torch.cat([block.ff(n_i), block.ff_context(n_t)], dim=1)

    m = hook.delta(f"{name}.mlp", mlp_out)
    return img + gate_mlp.unsqueeze(1) * m[:, :n_img], txt + c_gate_mlp.unsqueeze(1) * m[:, n_img:]


def single_block_forward(block: nn.Module, x: Tensor, vec: Tensor, n_img: int, rope, key_mask: Tensor,
                         hook: FeatureHook = PLAIN, name: str = "single") -> Tensor:
    """diffusers HunyuanVideoSingleTransformerBlock.forward on the joint tokens x (B, N_img + N_txt, H).
    The fused `proj_out(cat(attn, mlp))` is applied as its attention and MLP slices; each slice goes
    through `hook` before the gate (a linear map of the `attn` / `act_mlp` module outputs that
    diffusers' hooks cache, so reusing or Taylor-forecasting either gives the same result)."""
    d = x.shape[-1]
    norm_x, gate = block.norm(x, emb=vec)
    w, b = block.proj_out.weight, block.proj_out.bias

    def attn_out() -> Tensor:
        return F.linear(_single_attention(block.attn, norm_x, n_img, rope, key_mask), w[:, :d])

    def mlp_out() -> Tensor:
        return F.linear(block.act_mlp(block.proj_mlp(norm_x)), w[:, d:], b)

    g = gate.unsqueeze(1)
    return x + g * hook.delta(f"{name}.attn", attn_out) + g * hook.delta(f"{name}.mlp", mlp_out)


def _double_modulated_input(block: nn.Module, img: Tensor, vec: Tensor) -> Tensor:
    return block.norm1(img, emb=vec)[0]


def _single_modulated_input(block: nn.Module, x: Tensor, vec: Tensor) -> Tensor:
    return block.norm(x, emb=vec)[0]


def _refiner_attention(attn: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """AttnProcessor2_0 with HunyuanVideo's refiner mask: a real query attends to the real keys and key 0,
    a padded query attends to key 0 only (its output is value 0)."""
    h = attn.heads
    q = _qk_norm(attn.norm_q, _heads(attn.to_q(x), h).transpose(1, 2))
    k = _qk_norm(attn.norm_k, _heads(attn.to_k(x), h).transpose(1, 2))
    v = _heads(attn.to_v(x), h).transpose(1, 2)
    key_mask = mask.clone()
    key_mask[:, 0] = True
    out = attention(q, k, v, key_mask, attn.attention_backend)
    out = torch.where(mask[:, None, :, None], out, v[:, :, :1].expand_as(out))
    out = out.transpose(1, 2).flatten(2).to(q.dtype)
    return attn.to_out[1](attn.to_out[0](out))


def _refiner_block_forward(block: nn.Module, x: Tensor, temb: Tensor, mask: Tensor) -> Tensor:
    """diffusers HunyuanVideoIndividualTokenRefinerBlock.forward."""
    a = _refiner_attention(block.attn, block.norm1(x), mask)
    gate_msa, gate_mlp = block.norm_out(temb)
    x = x + a * gate_msa
    return x + block.ff(block.norm2(x)) * gate_mlp


class HunyuanVideoSingleBlock(nn.Module):
    """A new single-stream block of HunyuanVideo's kind (used by the learned predictor), with the same
    call signature as models.mmdit.SingleStreamBlock: x (B, N_img + N_txt, H) -> same shape."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: float, qk_norm: str = "rms_norm",
                 attention_backend: str = "sdpa"):
        super().__init__()
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoSingleTransformerBlock

        self.block = HunyuanVideoSingleTransformerBlock(num_heads, head_dim, mlp_ratio=mlp_ratio, qk_norm=qk_norm)
        self.block.attn.attention_backend = _check_backend(attention_backend)

    def forward(self, x: Tensor, vec: Tensor, tokens: Tokens, key_mask: Tensor | None = None,
                hook: FeatureHook = PLAIN, name: str = "single") -> Tensor:
        if key_mask is None:
            key_mask = joint_key_mask(tokens)
        return single_block_forward(self.block, x, vec, tokens.num_img, tokens.rope, key_mask, hook, name)


class DiffusersAdapter(ComposedBackbone):
    """Construction shared by the diffusers adapters: `from_config` (a backbone config dict, random
    weights) and `from_pretrained` (a LOCAL diffusers directory, nothing is downloaded). Subclasses set
    `TYPE` (the config's "type"), `_diffusers_class()` and take `(model, r_embed, guidance_embed,
    attention_backend)` in `__init__`."""

    TYPE: str = ""

    @staticmethod
    def _diffusers_class():
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: dict) -> "DiffusersAdapter":
        """Build (random weights) from `{"type": TYPE, "diffusers_config": {...}, "r_embed": ...,
        "guidance_embed": ..., "attention_backend": ...}` ("type" optional)."""
        cfg = dict(cfg)
        kind = cfg.pop("type", cls.TYPE)
        if kind != cls.TYPE:
            raise ValueError(f"config type {kind!r} is not {cls.TYPE!r}")
        if "diffusers_config" not in cfg:
            raise ValueError(f"{cls.TYPE} config needs a 'diffusers_config' dict (the transformer's config.json)")
        dcfg = {k: v for k, v in dict(cfg.pop("diffusers_config")).items() if not str(k).startswith("_")}
        extra = dict(r_embed=cfg.pop("r_embed", None), guidance_embed=cfg.pop("guidance_embed", None),
                     attention_backend=cfg.pop("attention_backend", "sdpa"))
        if cfg:
            raise ValueError(f"unknown {cls.TYPE} config keys {sorted(cfg)}")
        return cls(cls._diffusers_class().from_config(dcfg), **extra)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "transformer", *, r_embed: str | None = None,
                        guidance_embed: bool | None = None, attention_backend: str = "sdpa",
                        **kwargs) -> "DiffusersAdapter":
        """Load a diffusers transformer from a LOCAL directory (`path/subfolder` or `path` itself);
        extra kwargs (e.g. torch_dtype) go to diffusers' from_pretrained. Nothing is downloaded."""
        directory, sub = _resolve_local(path, subfolder)
        model = load_diffusers_model(cls._diffusers_class(), directory, sub, **kwargs)
        return cls(model, r_embed=r_embed, guidance_embed=guidance_embed, attention_backend=attention_backend)


class HunyuanVideoBackbone(DiffusersAdapter):
    """diffusers HunyuanVideoTransformer3DModel (as `self.model`) implementing `VideoBackbone`."""

    TYPE = "hunyuan_video"
    splits_sequence = True  # its blocks mark their joint attention (distributed/sequence_parallel.py)

    def __init__(self, model: nn.Module, *, r_embed: str | None = None, guidance_embed: bool | None = None,
                 attention_backend: str = "sdpa"):
        super().__init__()
        cfg = model.config
        if cfg.get("image_condition_type") == "token_replace":
            raise NotImplementedError("HunyuanVideo image_condition_type='token_replace' (I2V) is not supported "
                                      "by this adapter")
        _check_r_mode(r_embed)
        self.model = model
        for block in self.shard_blocks():
            route_block(block)
        self._attention_backend = _check_backend(attention_backend)
        for m in self._attention_modules():
            m.attention_backend = attention_backend
        self.time_r_in: nn.Module | None = None
        self.r_embed: str | None = None
        if guidance_embed is False and self.guidance_embed:
            raise ValueError("config says guidance_embed=False but the diffusers config has guidance_embeds=True")
        if guidance_embed:
            self.enable_guidance_embedding()
        if r_embed is not None:
            self.enable_r_embedding(r_embed)

    # --- construction ----------------------------------------------------------------------------
    @staticmethod
    def _diffusers_class():
        from diffusers import HunyuanVideoTransformer3DModel

        return HunyuanVideoTransformer3DModel

    def _attention_modules(self) -> list[nn.Module]:
        m = self.model
        mods = [blk.attn for blk in m.context_embedder.token_refiner.refiner_blocks]
        mods += [blk.attn for blk in m.transformer_blocks] + [blk.attn for blk in m.single_transformer_blocks]
        return mods

    def shard_blocks(self) -> list[nn.Module]:
        """Per-block sharding units (FSDP2 / ZeRO-3) and checkpointing units: the double- then the
        single-stream blocks, whose weights are read only inside their (routed) call."""
        return [*self.model.transformer_blocks, *self.model.single_transformer_blocks]

    # --- properties ------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return {"type": "hunyuan_video", "diffusers_config": _json_config(self.model.config),
                "guidance_embed": self.guidance_embed, "r_embed": self.r_embed,
                "attention_backend": self._attention_backend}

    @property
    def hidden_size(self) -> int:
        return self.model.config.num_attention_heads * self.model.config.attention_head_dim

    @property
    def num_blocks(self) -> int:
        return len(self.model.transformer_blocks) + len(self.model.single_transformer_blocks)

    @property
    def guidance_embed(self) -> bool:
        return self.model.time_text_embed.guidance_embedder is not None

    @property
    def patch_size(self) -> tuple[int, int, int]:
        c = self.model.config
        return (c.patch_size_t, c.patch_size, c.patch_size)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def dtype(self) -> torch.dtype:
        return self.model.x_embedder.proj.weight.dtype

    # --- stage extensions: start exactly equal to the model they extend --------------------------
    def enable_guidance_embedding(self) -> None:
        """Stage 1: give the model a guidance embedder. Reuses diffusers' own when present; otherwise adds
        one (a copy of the timestep embedder with a zero last layer: the output is unchanged) and sets
        `guidance_embeds=True` in the diffusers config."""
        tte = self.model.time_text_embed
        if tte.guidance_embedder is not None:
            return
        tte.guidance_embedder = _zero_last(copy.deepcopy(tte.timestep_embedder))
        self.model.register_to_config(guidance_embeds=True)

    def enable_r_embedding(self, mode: str) -> None:
        """Stage 2: add `time_r_in` for the second time r. 'average' copies the timestep embedder (at r = t
        the mean equals the original); 'sum' / 'interval' zero its last layer."""
        if mode not in R_EMBED_MODES:
            raise ValueError(f"r_embed mode {mode!r} not in {R_EMBED_MODES}")
        if self.time_r_in is not None:
            if self.r_embed != mode:
                raise ValueError(f"model already has r_embed={self.r_embed!r}, asked for {mode!r}")
            return
        emb = copy.deepcopy(self.model.time_text_embed.timestep_embedder)
        self.time_r_in = emb if mode == "average" else _zero_last(emb)
        self.r_embed = mode

    # --- the protocol ------------------------------------------------------------------------------
    def embed(self, x: Tensor, text: TextCond, t: Tensor | None = None) -> Tokens:
        """Patch-embed the video and run the token refiner on the text. The refiner is conditioned on
        the timestep, so pass t (float32 (B,), in [0, 1]) unless the model has no refiner layers."""
        c = self.model.config
        if x.ndim != 5 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, F, H, W), got {tuple(x.shape)}")
        pt, ph, pw = self.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"video size {tuple(x.shape[2:])} is not divisible by patch size {(pt, ph, pw)}")
        b = x.shape[0]
        if text.batch_size != b:
            raise ValueError(f"text batch {text.batch_size} != video batch {b}")
        if text.tokens.shape[-1] != c.text_embed_dim:
            raise ValueError(f"text tokens have dim {text.tokens.shape[-1]}, model expects {c.text_embed_dim}")
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        x = x.to(self.dtype)
        rope = self.model.rope(x)  # cos, sin: (N_img, head_dim) float32
        img = self.model.x_embedder(x)

        ce = self.model.context_embedder
        mask = text.mask.bool()
        h = text.tokens.to(ce.proj_in.weight.dtype)
        refiners = ce.token_refiner.refiner_blocks
        temb = None
        if len(refiners):
            if t is None:
                raise ValueError("HunyuanVideo's token refiner is conditioned on the timestep: call "
                                 "embed(x, text, t=t)")
            check_time("t", t, b)
            m = mask.to(torch.float32).unsqueeze(-1)
            pooled = ((h * m).sum(dim=1) / m.sum(dim=1)).to(h.dtype)  # masked mean, as diffusers
            temb = ce.time_text_embed(t * TIMESTEP_SCALE, pooled)
        txt = ce.proj_in(h)
        for blk in refiners:
            txt = _refiner_block_forward(blk, txt, temb, mask)
        return Tokens(img=img, txt=txt, txt_mask=mask, grid=grid, rope=rope)

    def _embed_time(self, embedder: nn.Module, s: Tensor, dtype: torch.dtype) -> Tensor:
        proj = self.model.time_text_embed.time_proj(s * TIMESTEP_SCALE)
        return embedder(proj.to(dtype=dtype))

    def condition(self, t: Tensor, r: Tensor | None, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        """The adaLN vector: diffusers' `temb` = time(t) [+ r term] + guidance(g) + text(pooled)."""
        b = pooled.shape[0]
        check_time("t", t, b)
        check_time("r", r, b)
        check_time("guidance", guidance, b)
        tte = self.model.time_text_embed
        pooled = pooled.to(tte.text_embedder.linear_1.weight.dtype)
        vec = self._embed_time(tte.timestep_embedder, t, pooled.dtype)
        if self.time_r_in is not None:
            r = t if r is None else r
            if self.r_embed == "average":  # HunyuanVideo 1.0 style
                vec = (vec + self._embed_time(self.time_r_in, r, pooled.dtype)) / 2
            elif self.r_embed == "sum":  # HunyuanVideo 1.5 style
                vec = vec + self._embed_time(self.time_r_in, r, pooled.dtype)
            else:  # 'interval': embed the length t - r
                vec = vec + self._embed_time(self.time_r_in, t - r, pooled.dtype)
        elif r is not None and not torch.equal(r, t):
            raise ValueError("this model has no r embedding (enable_r_embedding) but got r != t")
        if tte.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model has a guidance embedder: pass guidance (the CFG scale, float32 (B,))")
            vec = vec + self._embed_time(tte.guidance_embedder, guidance, pooled.dtype)
        return vec + tte.text_embedder(pooled)

    def transformer(self, tokens: Tokens, vec: Tensor, *, hook: FeatureHook = PLAIN,
                    feature_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        n_img = tokens.num_img
        doubles, singles = self.model.transformer_blocks, self.model.single_transformer_blocks
        key_mask = joint_key_mask(tokens)
        features: list[Tensor] = []
        wanted = _check_features(feature_layers, self.num_blocks)
        x0 = torch.cat([tokens.img, tokens.txt], dim=1)
        if _wants_observe(hook):  # TeaCache's signal: block 0's modulated image input (read inside block 0's call)
            if len(doubles):
                hook.observe("modulated_input", doubles[0](tokens.img, vec, block_fn=_double_modulated_input))
            elif len(singles):
                hook.observe("modulated_input", singles[0](x0, vec, block_fn=_single_modulated_input)[:, :n_img])

        def run_double() -> Tensor:
            img, txt = tokens.img, tokens.txt
            for i, block in enumerate(doubles):
                img, txt = block(img, txt, vec, tokens.rope, key_mask, hook=hook, name=f"double{i}",
                                 block_fn=double_block_forward)
                if i in wanted:
                    features.append(img)
            return torch.cat([img, txt], dim=1)

        def run_all() -> Tensor:
            x = run_double()

            def single_delta() -> Tensor:
                y = x
                for j, block in enumerate(singles):
                    y = block(y, vec, n_img, tokens.rope, key_mask, hook=hook, name=f"single{j}",
                              block_fn=single_block_forward)
                    if len(doubles) + j in wanted:
                        features.append(y[:, :n_img])
                return y - x

            return x + hook.delta("single_blocks", single_delta) - x0

        hidden = x0 + hook.delta("blocks", run_all)
        return hidden, features

    def native_forward(self, x: Tensor, t: Tensor, text: TextCond, guidance: Tensor | None = None) -> Tensor:
        """The velocity from diffusers' OWN forward (`HunyuanVideoTransformer3DModel.forward`, its blocks
        and attention processors) with this adapter's conventions (t * 1000, guidance * 1000): what
        diffusers' block-level cache hooks (First Block Cache, MagCache; caching/diffusers_caches.py)
        run on. Equal to `run(...).velocity` up to float rounding. A stage-2 model's r embedder is not a
        diffusers weight, so r-embedded models are refused."""
        if self.time_r_in is not None:
            raise ValueError("diffusers' own forward has no r input: this model has an r embedding (stage 2); "
                             "use run(x, t, text, r=...) instead")
        b = x.shape[0]
        check_time("t", t, b)
        check_time("guidance", guidance, b)
        if self.guidance_embed and guidance is None:
            raise ValueError("this model has a guidance embedder: pass guidance (the CFG scale, float32 (B,))")
        g = guidance * TIMESTEP_SCALE if self.guidance_embed else None
        dtype = self.dtype
        return self.model(hidden_states=x.to(dtype), timestep=t * TIMESTEP_SCALE,
                          encoder_hidden_states=text.tokens.to(dtype), encoder_attention_mask=text.mask,
                          pooled_projections=text.pooled.to(dtype), guidance=g, return_dict=False)[0]

    def head(self, hidden: Tensor, vec: Tensor, tokens: Tokens) -> Tensor:
        pt, ph, pw = self.patch_size
        f, h, w = tokens.grid
        out = self.model.proj_out(self.model.norm_out(hidden[:, : tokens.num_img], vec))
        return rearrange(out, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw)

    def make_single_blocks(self, n: int, hidden_size: int | None = None, mlp_ratio: float | None = None,
                           num_heads: int | None = None) -> nn.ModuleList:
        """New single-stream blocks of HunyuanVideo's kind (diffusers HunyuanVideoSingleTransformerBlock,
        default init) on this backbone's device and dtype. Width `hidden_size` (default the backbone's)
        with `num_heads` heads: the blocks take an adaLN vector of that width, and `tokens.rope` must have
        the blocks' head dim (hidden_size // num_heads)."""
        c = self.model.config
        width = hidden_size or self.hidden_size
        heads = num_heads or max(1, width // c.attention_head_dim)
        if width % heads:
            raise ValueError(f"hidden_size {width} is not divisible by num_heads {heads}")
        ref = self.model.x_embedder.proj.weight
        return nn.ModuleList(
            HunyuanVideoSingleBlock(heads, width // heads, mlp_ratio or c.mlp_ratio, c.qk_norm,
                                    self._attention_backend).to(device=ref.device, dtype=ref.dtype)
            for _ in range(n))
