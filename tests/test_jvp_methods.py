"""Stage 2's JVP methods on the real backbones: `forward_ad` (the default, the one that runs under
sharding), with PyTorch's own forward-mode rules and with the explicit rules of `models.jvp` (fused
SDPA backend), equals the float64 `torch.func.jvp` reference of the unsharded model (math attention),
on the built-in MMDiT and on both diffusers adapters; the explicit attention rule equals the float64
reference in values and tangents, with masks and in query blocks; the finite-difference option agrees
to its float32 accuracy; the choice is validated. (1 process vs 2 sharded processes:
tests/test_strategy_presets.py, whose stage-2 losses are functions of du/dt.)"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from losses.meanflow import meanflow_dudt
from models.jvp import attention_jvp, jvp_rules
from models.layers import attention_backend
from models.mmdit import MMDiT
from models.protocol import TextCond
from tests.conftest import perturb, tiny_text


def setup(dtype: torch.dtype):
    torch.manual_seed(0)
    model = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True,
                                                "r_embed": "average"})).to(dtype).eval()
    text = tiny_text()
    text = TextCond(text.tokens.to(dtype), text.mask, text.pooled.to(dtype))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=torch.float64).to(dtype)
    t, r, g = torch.tensor([0.5, 0.75]), torch.tensor([0.25, 0.625]), torch.tensor([2.0, 5.0])

    def u_fn(x_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model.run(x_, t_, text, r=r_, guidance=g).velocity

    return model, u_fn, x, r, t, v


def dudt(dtype: torch.dtype, method: str, backend: str = "math", **kw) -> tuple[Tensor, Tensor]:
    model, u_fn, x, r, t, v = setup(dtype)
    with attention_backend(model, backend), torch.no_grad():
        return meanflow_dudt(u_fn, x, r, t, v, method, **kw)


def test_forward_ad_equals_float64_func_jvp_reference():
    u_ref, ref = dudt(torch.float64, "func")
    u64, d64 = dudt(torch.float64, "forward_ad")
    torch.testing.assert_close(d64, ref, rtol=1e-12, atol=1e-12)  # same maths in float64
    torch.testing.assert_close(u64, u_ref, rtol=1e-12, atol=1e-12)
    u32, d32 = dudt(torch.float32, "forward_ad")
    rel = ((d32.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel  # float32 rounding only
    assert ref.abs().max() > 1e-2  # a non-trivial tangent


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_explicit_rules_equal_float64_func_jvp_reference(backend):
    """The default JVP (forward_ad + models.jvp rules; SDPA as in training) on the MMDiT."""
    u_ref, ref = dudt(torch.float64, "func")
    u64, d64 = dudt(torch.float64, "forward_ad", backend, explicit_rules=True)
    torch.testing.assert_close(d64, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(u64, u_ref, rtol=1e-10, atol=1e-12)
    _, d32 = dudt(torch.float32, "forward_ad", backend, explicit_rules=True)
    assert ((d32.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_sdpa_needs_the_explicit_rules():
    """Fused SDPA has no forward-mode rule of its own on CPU: the rules are what make it usable."""
    with pytest.raises(NotImplementedError, match="forward AD"):
        dudt(torch.float32, "forward_ad", "sdpa", explicit_rules=False)


def _math_attention(q, k, v, mask):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "additive_full"])
@pytest.mark.parametrize("block_elements", [2 ** 26, 2 * 3 * 5 * 11])  # one block; blocks of 5 query rows
def test_attention_rule_equals_float64_reference(mask_kind, block_elements):
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(2, 3, 13, 8, generator=gen, dtype=torch.float64) for _ in range(6))
    k, v, dk, dv = k[..., :11, :], v[..., :11, :], dk[..., :11, :], dv[..., :11, :]  # 13 queries, 11 keys
    mask = {"none": None, "key_padding": torch.arange(11).expand(2, 1, 1, 11) < torch.tensor([11, 7])[:, None, None, None],
            "additive_full": torch.randn(2, 1, 13, 11, generator=gen, dtype=torch.float64)}[mask_kind]
    ref_out, ref_tan = torch.func.jvp(lambda a, b, c: _math_attention(a, b, c, mask), (q, k, v), (dq, dk, dv))
    out, tan = attention_jvp(q, k, v, dq, dk, dv, mask, block_elements=block_elements)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-12, atol=1e-12)
    _, ref_q_only = torch.func.jvp(lambda a: _math_attention(a, k, v, mask), (q,), (dq,))
    torch.testing.assert_close(attention_jvp(q, k, v, dq, None, None, mask, block_elements=block_elements)[1],
                               ref_q_only, rtol=1e-12, atol=1e-12)


def test_rules_apply_only_where_exact():
    """Under grad mode, with a dual weight or a causal mask the mode defers to PyTorch's own rules."""
    gen = torch.Generator().manual_seed(0)
    x, dx, w, dw = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(4))
    with fwAD.dual_level(), jvp_rules(), torch.no_grad():
        both = fwAD.unpack_dual(F.linear(fwAD.make_dual(x, dx), fwAD.make_dual(w, dw))).tangent
        q = fwAD.make_dual(x[None, None], dx[None, None])
        with pytest.raises(NotImplementedError, match="forward AD"):  # causal: not covered, PyTorch's SDPA runs
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(both, dx @ w.T + x @ dw.T)
    with fwAD.dual_level(), jvp_rules():  # grad mode: PyTorch's rule (same value)
        grad_mode = fwAD.unpack_dual(F.linear(fwAD.make_dual(x, dx), w)).tangent
    torch.testing.assert_close(grad_mode, dx @ w.T)


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_explicit_rules_on_diffusers_adapters(family):
    """The same rules through the HunyuanVideo and Wan adapters (their own block code, SDPA backend)."""
    from models.hunyuan_video import HunyuanVideoBackbone
    from models.wan import WanBackbone
    from tests.test_diffusers_adapters import L, POOL_DIM, TXT_DIM, _hv_model, _wan_model

    model = (HunyuanVideoBackbone(_hv_model(guidance_embeds=False)) if family == "hunyuan_video"
             else WanBackbone(_wan_model())).double()
    gen = torch.Generator().manual_seed(3)
    x, v = (torch.randn(2, 4, 3, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 4:] = False
    text = TextCond(torch.randn(2, L, TXT_DIM, generator=gen, dtype=torch.float64), mask,
                    torch.randn(2, POOL_DIM, generator=gen, dtype=torch.float64))
    t, r = torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.7])

    def u_fn(x_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model.run(x_, t_, text).velocity

    with torch.no_grad():
        with attention_backend(model, "math"):
            _, ref = meanflow_dudt(u_fn, x, r, t, v, "func")
            _, own_rules = meanflow_dudt(u_fn, x, r, t, v, "forward_ad", explicit_rules=False)
        _, new = meanflow_dudt(u_fn, x, r, t, v, "forward_ad", explicit_rules=True)
    assert ref.abs().max() > 1e-3
    scale = ref.abs().max()
    assert (new - own_rules).abs().max() / scale < 1e-12  # the same maths as PyTorch's rules, in float64
    # against torch.func.jvp: Wan runs its norms and time embedding in float32 inside a float64 model, where
    # the two AD implementations round differently (measured 2.1e-8; HunyuanVideo 1e-16)
    assert (new - ref).abs().max() / scale < 1e-6


def test_finite_difference_option_is_a_float32_cross_check():
    _, ref = dudt(torch.float64, "func")
    _, fd = dudt(torch.float32, "finite_difference", fd_eps=2.0 ** -12)
    rel = ((fd.double() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 2e-2, rel  # float32 central difference: measured 7.7e-3 at 2^-12 (0.11 at 2^-10: the time
    # embedding has frequencies up to 1000, so the truncation error grows fast with the step)


def test_jvp_method_is_validated():
    with pytest.raises(ValueError, match="unknown JVP method 'reverse'"):
        dudt(torch.float32, "reverse")
    with pytest.raises(ValueError, match="fd_eps must be > 0"):
        dudt(torch.float32, "finite_difference", fd_eps=0.0)


def test_func_jvp_with_fused_attention_is_refused_before_training():
    from lightning_modules.meanflow import RestrictedMeanFlowModule

    teacher = MMDiT(size="tiny", config={"guidance_embed": True})
    with pytest.raises(ValueError, match="set jvp_attention: math, or use jvp_method: forward_ad"):
        RestrictedMeanFlowModule(teacher, jvp_method="func", jvp_attention="sdpa")
