"""Stage 2's JVP methods on the real backbone: `forward_ad` (the default, the one that runs under
sharding) equals the float64 `torch.func.jvp` reference of the unsharded model; the finite-difference
option agrees to its float32 accuracy; the choice is validated. (1 process vs 2 sharded processes:
tests/test_strategy_presets.py, whose stage-2 losses are functions of du/dt.)"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from losses.meanflow import meanflow_dudt
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


def dudt(dtype: torch.dtype, method: str, **kw) -> tuple[Tensor, Tensor]:
    model, u_fn, x, r, t, v = setup(dtype)
    with attention_backend(model, "math"), torch.no_grad():
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
