"""A fused JVP flash-attention kernel (Triton): softmax attention O and its tangent dO in one pass.

Stage 2's du/dt pushes tangents through every attention call. `models.jvp.attention_jvp` (the blocked
rule) computes dO = dP V + P dV in plain PyTorch over blocks of queries, materialising each block's
scores, P and dS; this kernel streams the keys once per block of queries, as flash attention does for O,
and keeps six running row statistics in fp32 registers instead of any (rows x keys) buffer.

The recurrence (SPEC §10.2; the design of NVIDIA rCM's `rcm/utils/flash_attention_jvp_triton.py`, written
here from the formula, not copied). With s = q k^T scale (+ mask), ds = (dq k^T + q dk^T) scale and, for one
query row and the keys seen so far, running max m and p_j = exp(s_j - m):

    l     = sum_j p_j              acc_o  = sum_j p_j v_j       acc_dv = sum_j p_j dv_j
    mu    = sum_j p_j ds_j         acc_t  = sum_j p_j ds_j v_j

    INVARIANT: after each key block every statistic is the sum over all keys seen so far, each term taken
    relative to the current m; a new block with a larger max m' rescales all five by exp(m - m') first.

At the end (P_j = p_j / l is the softmax row, dP_j = P_j (ds_j - sum_i P_i ds_i)):

    O  = acc_o / l
    dO = sum_j dP_j v_j + sum_j P_j dv_j = (acc_t - (mu / l) acc_o) / l + acc_dv / l

so nothing of size N_q x N_k is ever stored: extra memory is O and dO. Plain pointer arithmetic with masks
(no block pointers, which current Triton removed), so it compiles on the Triton that torch's CUDA wheels
bring and runs on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before triton is
imported), where the tests check it against `reference_attention_jvp` (float64 torch.func.jvp of math
attention). Tails (N not a multiple of the block) are masked inside the kernel. Masks are SDPA's: boolean
(True = attend; a masked key gets score -1e30, so a fully masked row is uniform, as in the blocked rule) or
additive, broadcast to (B, H, N_q, N_k) by strides (a (B, 1, 1, N_k) key-padding mask is read as one row).
Tangent-only kernel: no backward (stage 2 runs its JVP under no_grad).
"""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
MASKED_SCORE = -1.0e30  # a masked key's score: exp(-1e30 - m) = 0 unless the whole row is masked

try:
    import triton
    import triton.language as tl
except ImportError:  # the blocked rule is used instead (models.jvp)
    triton = None


def triton_available() -> bool:
    return triton is not None


def interpreter_active() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1, so kernels run on CPU tensors."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_jvp_attention_kernel, InterpretedFunction)


if triton is not None:
    _MASKED = tl.constexpr(MASKED_SCORE)  # a jit function reads only constexpr globals

    @triton.jit
    def _jvp_attention_kernel(
            Q, K, V, DQ, DK, DV, MASK, O, DO,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
            sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
            smb, smh, smm, smn, sob, soh, son,
            H, N_Q, N_K, D_QK, D_V, scale,
            HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr, HAS_DS: tl.constexpr,
            MASK_KIND: tl.constexpr, MASK_ROWS: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAD_QK: tl.constexpr, PAD_V: tl.constexpr):
        """One program = BLOCK_M query rows of one (batch, head); loops over all keys (module docstring).
        MASK_KIND: 0 none, 1 boolean (stored as uint8), 2 additive; MASK_ROWS: the mask varies over queries."""
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)  # 64-bit (batch, head) offsets
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d_qk, d_v = tl.arange(0, PAD_QK), tl.arange(0, PAD_V)
        row_ok = rows < N_Q
        qk_ok, v_ok = d_qk < D_QK, d_v < D_V
        q_mask = row_ok[:, None] & qk_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + d_qk[None, :], mask=q_mask, other=0.0)
        if HAS_DQ:
            dq = tl.load(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqn + d_qk[None, :], mask=q_mask, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        mu = tl.zeros([BLOCK_M], tl.float32)
        acc_o = tl.zeros([BLOCK_M, PAD_V], tl.float32)
        acc_dv = tl.zeros([BLOCK_M, PAD_V], tl.float32)
        acc_t = tl.zeros([BLOCK_M, PAD_V], tl.float32)
        for start in range(0, N_K, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < N_K
            k_mask, v_mask = col_ok[:, None] & qk_ok[None, :], col_ok[:, None] & v_ok[None, :]
            k = tl.load(K + b * skb + h * skh + cols[:, None] * skn + d_qk[None, :], mask=k_mask, other=0.0)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + d_v[None, :], mask=v_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale               # (BLOCK_M, BLOCK_N)
            if MASK_KIND != 0:
                base = MASK + b * smb + h * smh
                if MASK_ROWS:
                    mval = tl.load(base + rows[:, None] * smm + cols[None, :] * smn,
                                   mask=row_ok[:, None] & col_ok[None, :], other=0)
                else:
                    mval = tl.load(base + cols * smn, mask=col_ok, other=0)[None, :]
                if MASK_KIND == 1:
                    s = tl.where(mval != 0, s, _MASKED)
                else:
                    s = s + mval.to(tl.float32)
            s = tl.where(col_ok[None, :], s, float("-inf"))                           # tail keys: p = 0
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)                                               # rescale (INVARIANT)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc_o = acc_o * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            if HAS_DV:
                dv = tl.load(DV + b * sdvb + h * sdvh + cols[:, None] * sdvn + d_v[None, :], mask=v_mask, other=0.0)
                acc_dv = acc_dv * alpha[:, None] + tl.dot(p.to(dv.dtype), dv, input_precision=PRECISION)
            if HAS_DS:                                                                # dq or dk given
                if HAS_DQ:
                    ds = tl.dot(dq, tl.trans(k), input_precision=PRECISION)
                    if HAS_DK:
                        dk = tl.load(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + d_qk[None, :],
                                     mask=k_mask, other=0.0)
                        ds += tl.dot(q, tl.trans(dk), input_precision=PRECISION)
                else:
                    dk = tl.load(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + d_qk[None, :],
                                 mask=k_mask, other=0.0)
                    ds = tl.dot(q, tl.trans(dk), input_precision=PRECISION)
                pds = p * (ds * scale)
                mu = mu * alpha + tl.sum(pds, 1)
                acc_t = acc_t * alpha[:, None] + tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        inv_l = 1.0 / l_i
        o = acc_o * inv_l[:, None]
        do = (acc_t - (mu * inv_l)[:, None] * acc_o + acc_dv) * inv_l[:, None]
        o_ptrs = b * sob + h * soh + rows[:, None] * son + d_v[None, :]
        o_mask = row_ok[:, None] & v_ok[None, :]
        tl.store(O + o_ptrs, o.to(O.dtype.element_ty), mask=o_mask)
        tl.store(DO + o_ptrs, do.to(DO.dtype.element_ty), mask=o_mask)


def _pad(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


def block_sizes(n_q: int, n_k: int, pad_qk: int, pad_v: int, dtype: torch.dtype,
                interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter: few, large programs (each is a Python call).
    GPU, from ptxas on sm_90 without a GPU (no timing yet: `make gpu-check`): bf16/fp16 at these sizes use
    255 registers with <= 1.5 KB spill; fp32 (exact `ieee` dots, a check path) small tiles, one stage,
    64 KiB shared memory, so it launches on every CUDA GPU."""
    if interpreted:
        return min(64, _pad(n_q)), min(128, _pad(n_k)), 1, 1
    d = max(pad_qk, pad_v)
    if dtype == torch.float32:
        return 32, 32, 4, 1
    if d <= 64:
        return 64, 64, 4, 2
    if d <= 128:
        return 64, 32, 8, 2
    return 32, 32, 8, 2


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
                       mask: Tensor | None) -> str | None:
    """Why the kernel cannot take these inputs (None: it can)."""
    if triton is None:
        return "triton is not installed"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreter_active()):
        return (f"{q.device.type} tensors need a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
                "(CPU)")
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bf16 dots need a GPU of compute capability >= 8.0"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"inputs must be (B, H, N, D), got {q.dim()}-d"
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[-1] != q.shape[-1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (GQA / broadcast heads)"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype}/{k.dtype}/{v.dtype} (supported: one of {SUPPORTED_DTYPES})"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    for name, x, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if x is not None and (x.shape != like.shape or x.dtype != like.dtype or x.device != like.device):
            return f"tangent {name} {tuple(x.shape)} {x.dtype} differs from its primal"
    if any(x is not None and x.requires_grad for x in (q, k, v, dq, dk, dv)) and torch.is_grad_enabled():
        return "inputs require grad (the kernel has no backward)"
    if max(x.shape[2] * x.stride(2) for x in (q, k, v)) >= 2 ** 31:
        return "one head's rows span >= 2^31 elements (32-bit row offsets)"
    if mask is not None:
        if mask.dim() > 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):
            return f"mask {tuple(mask.shape)} {mask.dtype}"
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return f"mask {tuple(mask.shape)} does not broadcast to (B, H, N_q, N_k)"
    return None


def triton_attention_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None,
                         dv: Tensor | None, mask: Tensor | None = None, scale: float | None = None,
                         block_m: int | None = None, block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """(O, dO) of softmax attention over (B, H, N, D) by the fused kernel; callers check `unsupported_reason`
    first (models.jvp.attention_jvp does). Missing tangents are zero; `mask` as in SDPA."""
    b, h, n_q, d_qk = q.shape
    n_k, d_v = k.shape[2], v.shape[3]
    scale = d_qk ** -0.5 if scale is None else scale
    interpreted = q.device.type == "cpu"
    out_dtype = q.dtype
    if interpreted and q.dtype == torch.bfloat16:  # the interpreter mis-handles bf16 memory (SPEC §10.2)
        q, k, v, dq, dk, dv = (None if x is None else x.float() for x in (q, k, v, dq, dk, dv))
    q, k, v, dq, dk, dv = (None if x is None else x if x.stride(-1) == 1 else x.contiguous()
                           for x in (q, k, v, dq, dk, dv))
    pad_qk, pad_v = _pad(d_qk), _pad(d_v)
    bm, bn, warps, stages = block_sizes(n_q, n_k, pad_qk, pad_v, q.dtype, interpreted)
    bm, bn = block_m or bm, block_n or bn
    out = torch.empty(b, h, n_q, d_v, dtype=q.dtype, device=q.device)
    tangent = torch.empty_like(out)
    if mask is None:
        mask_kind, mask_rows, m, mask_strides = 0, False, q, (0, 0, 0, 0)
    else:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, h, n_q, n_k)
        if m.dtype == torch.bool:
            mask_kind, m = 1, m.view(torch.uint8)
        else:
            mask_kind = 2
        mask_rows, mask_strides = m.stride(2) != 0, m.stride()
    zeros3 = (0, 0, 0)
    strides = lambda x: zeros3 if x is None else x.stride()[:3]  # noqa: E731
    grid = (triton.cdiv(n_q, bm), b * h)
    _jvp_attention_kernel[grid](
        q, k, v, q if dq is None else dq, k if dk is None else dk, v if dv is None else dv, m, out, tangent,
        *strides(q), *strides(k), *strides(v), *strides(dq), *strides(dk), *strides(dv), *mask_strides,
        *out.stride()[:3], h, n_q, n_k, d_qk, d_v, float(scale),
        HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None, HAS_DS=dq is not None or dk is not None,
        MASK_KIND=mask_kind, MASK_ROWS=mask_rows, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, PAD_QK=pad_qk, PAD_V=pad_v, num_warps=warps,
        num_stages=stages)
    return out.to(out_dtype), tangent.to(out_dtype)


def reference_attention_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Tensor | None, dk: Tensor | None,
                            dv: Tensor | None, mask: Tensor | None = None,
                            scale: float | None = None) -> tuple[Tensor, Tensor]:
    """float64 torch.func.jvp of math attention (the kernel's reference; boolean masks as score -1e30)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    primals = tuple(x.double() for x in (q, k, v))
    tangents = tuple(torch.zeros_like(p) if t is None else t.double() for p, t in zip(primals, (dq, dk, dv)))

    def attend(q_: Tensor, k_: Tensor, v_: Tensor) -> Tensor:
        s = (q_ @ k_.transpose(-2, -1)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, MASKED_SCORE) if mask.dtype == torch.bool else s + mask.double()
        return s.softmax(-1) @ v_

    return torch.func.jvp(attend, primals, tangents)

