"""Explicit forward-mode rules for the two ops that dominate a DiT's JVP (stage 2's du/dt).

PyTorch's built-in forward-AD formulas are exact but wasteful for an inference-style JVP: `addmm`'s
rule also multiplies the input by a materialised zero tangent of the (non-dual) weight, doubling the
matmuls of every linear layer, and the fused scaled-dot-product attention kernels have no rule at all
(explicit softmax attention then runs through a chain of slow per-op rules and holds the full score
matrix). `jvp_rules()` is a `TorchFunctionMode` that, while dual tensors flow without autograd
(`torch.no_grad()`, as stage 2 runs its JVP), computes value and tangent of

  F.linear(x, W, b)                       y = x W^T + b,       dy = dx W^T               (W, b not dual)
  F.scaled_dot_product_attention(q, k, v) O = P V,  P = softmax(S),  S = q k^T s + mask,
                                          dO = dP V + P dV,   dP = P * (dS - rowsum(P * dS)),
                                          dS = (dq k^T + q dk^T) s

with plain ops on the primal and tangent parts and returns the dual result. Attention runs in blocks of
queries (rows are independent), so its extra memory is one block's (rows x keys) scores, not N x N.
Plain ops run inside any sharding wrapper (FSDP2 and ZeRO-3 gather a block's weights before its forward
as usual), and the model code is unchanged, so the rules apply to the built-in MMDiT and to the
diffusers adapters alike. Anything else (dual weights, dropout, causal or GQA attention, grad mode)
falls through to PyTorch's own rules. Checked against the float64 `torch.func.jvp` of math attention
(tests/test_jvp_methods.py). `attention_jvp(..., backend="triton")` runs the same rule as one fused flash pass
(`models.jvp_triton`: no rows x keys buffer); `auto` takes it for the CUDA tensors it supports.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

ATTENTION_BLOCK_ELEMENTS = 2 ** 26  # scores per query block: batch x heads x rows x keys (256 MiB in float32)
JVP_ATTENTION_BACKENDS = ("blocked", "triton", "auto")  # blocked rule | fused kernel | kernel on CUDA, else blocked
_log = logging.getLogger(__name__)
_fallbacks_logged: set[str] = set()


def _split(x) -> tuple[Tensor | None, Tensor | None]:
    """(primal, tangent) of a tensor (tangent None when it is not dual); (None, None) for None."""
    if x is None:
        return None, None
    primal, tangent = fwAD.unpack_dual(x)
    return primal, tangent


def linear_jvp(x: Tensor, dx: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x W^T + b, dx W^T)."""
    return F.linear(x, weight, bias), F.linear(dx, weight)


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
                  mask: Tensor | None = None, scale: float | None = None,
                  block_elements: int = ATTENTION_BLOCK_ELEMENTS, backend: str = "blocked",
                  key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention over (..., N, D) and its tangent (module docstring). `mask` is SDPA's: boolean
    (True = attend) or additive, broadcastable to (..., N_q, N_k); `key_padding_mask` (B, N_k) bool (True =
    a real key) for (B, H, N, D) inputs, combined with `mask`; missing tangents are zero. `backend`
    (JVP_ATTENTION_BACKENDS): 'blocked' = the rule below in query blocks; 'triton' = the fused kernel
    (inputs it does not support fall back to the blocked rule, logged once per reason); 'auto' = the kernel
    for CUDA tensors it supports, the blocked rule otherwise."""
    if backend not in JVP_ATTENTION_BACKENDS:
        raise ValueError(f"unknown JVP attention backend {backend!r}; expected one of {JVP_ATTENTION_BACKENDS}")
    mask = merge_key_padding(mask, key_padding_mask)
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from models.jvp_triton import triton_attention_jvp, unsupported_reason

        reason = unsupported_reason(q, k, v, dq, dk, dv, mask)
        if reason is None:
            return triton_attention_jvp(q, k, v, dq, dk, dv, mask, scale)
        if reason not in _fallbacks_logged:
            _fallbacks_logged.add(reason)
            _log.warning("JVP attention: the Triton kernel does not take these inputs (%s); "
                         "using the blocked rule", reason)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_q, n_k = q.shape[-2], k.shape[-2]
    per_row = max(1, q[..., 0, 0].numel() * n_k)
    rows = max(1, min(n_q, block_elements // per_row))
    kt = k.transpose(-2, -1)
    dkt = None if dk is None else dk.transpose(-2, -1)
    outs, tangents = [], []
    for start in range(0, n_q, rows):
        sl = slice(start, start + rows)
        qb = q[..., sl, :] * scale                                     # scale the (rows x D) side, not the scores
        scores = qb @ kt
        m = None if mask is None else mask[..., sl, :] if mask.shape[-2] == n_q else mask
        if m is not None:
            scores = scores.masked_fill_(~m, torch.finfo(scores.dtype).min) if m.dtype == torch.bool else scores.add_(m)
        p = scores.softmax(dim=-1)
        outs.append(p @ v)
        ds = None if dq is None else (dq[..., sl, :] * scale) @ kt
        if dkt is not None:
            ds = qb @ dkt if ds is None else ds.add_(qb @ dkt)
        tangent = torch.zeros_like(outs[-1])
        if ds is not None:
            pds = ds.mul_(p)                                           # P * dS
            dp = pds.addcmul_(p, pds.sum(-1, keepdim=True), value=-1)  # P * (dS - rowsum(P * dS))
            tangent = dp @ v
        if dv is not None:
            tangent = tangent.add_(p @ dv)
        tangents.append(tangent)
    return torch.cat(outs, -2), torch.cat(tangents, -2)


def merge_key_padding(mask: Tensor | None, key_padding_mask: Tensor | None) -> Tensor | None:
    """One SDPA mask from `mask` and a (B, N_k) bool key-padding mask (as (B, 1, 1, N_k); a padded key gets
    the additive mask's dtype minimum, as the blocked rule gives boolean masks)."""
    if key_padding_mask is None:
        return mask
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask must be (B, N_k) bool, got {tuple(key_padding_mask.shape)} "
                         f"{key_padding_mask.dtype}")
    keys = key_padding_mask[:, None, None, :]
    if mask is None:
        return keys
    if mask.dtype == torch.bool:
        return mask & keys
    return mask.masked_fill(~keys, torch.finfo(mask.dtype).min)


def _linear_args(input, weight, bias=None):
    return input, weight, bias


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, scale, bool(dropout_p or is_causal or enable_gqa)


_RULES = (F.linear, F.scaled_dot_product_attention)


class _JVPRules(TorchFunctionMode):
    def __init__(self, attention: str = "blocked"):
        if attention not in JVP_ATTENTION_BACKENDS:
            raise ValueError(f"unknown JVP attention backend {attention!r}; expected one of {JVP_ATTENTION_BACKENDS}")
        super().__init__()
        self.attention = attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _RULES or torch.is_grad_enabled():
            return func(*args, **kwargs)
        if func is F.linear:
            (x, dx), (w, dw), (b, db) = map(_split, _linear_args(*args, **kwargs))
            if dx is not None and dw is None and db is None:
                return fwAD.make_dual(*linear_jvp(x, dx, w, b))
        else:
            q, k, v, mask, scale, unsupported = _sdpa_args(*args, **kwargs)
            (q, dq), (k, dk), (v, dv), (mask, dmask) = map(_split, (q, k, v, mask))
            if not unsupported and dmask is None and not (dq is None and dk is None and dv is None):
                return fwAD.make_dual(*attention_jvp(q, k, v, dq, dk, dv, mask, scale, backend=self.attention))
        return func(*args, **kwargs)


@contextmanager
def jvp_rules(attention: str = "blocked"):
    """Compute F.linear and F.scaled_dot_product_attention with the explicit forward-mode rules above
    (effective only under `torch.no_grad()` on dual tensors; see the module docstring); `attention` is
    attention_jvp's backend."""
    with _JVPRules(attention):
        yield
