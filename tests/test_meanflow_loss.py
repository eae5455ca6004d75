"""MeanFlow losses (losses/meanflow.py): time-pair sampler, target, adaptive weight, the exact JVP
against finite differences on a tiny MMDiT, and an analytic Gaussian flow where the mean velocity is
known in closed form."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from losses.flow import interpolate
from losses.meanflow import (adaptive_weight, check_t_r_sampler, integrate_mean_velocity, meanflow_dudt,
                             meanflow_loss, meanflow_target, sample_t_r, sample_t_r_meanflow)
from models.layers import attention_backend
from models.mmdit import MMDiT
from models.protocol import TextCond
from tests.conftest import perturb, tiny_text


# --- (t, r) sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("restrict", [0.2, 0.4, 1.0])
def test_sample_t_r_respects_restrict(restrict):
    gen = torch.Generator().manual_seed(0)
    t, r = sample_t_r(4096, restrict, generator=gen)
    assert t.dtype == r.dtype == torch.float32 and t.shape == r.shape == (4096,)
    interval = t - r
    assert (r >= 0).all() and (interval >= 0).all() and (interval <= restrict + 1e-6).all()
    # r = max(0, t - I) is clamped to 0 with probability P(I >= t) = R / 2 for t ~ U(0, 1)
    assert abs((r == 0).float().mean().item() - restrict / 2) < 0.03
    far = t > restrict  # where the clamp never acts, I ~ U(0, R) with mean R / 2
    if far.any():
        assert abs(interval[far].mean().item() - restrict / 2) < 0.03 * restrict + 0.01
    assert interval.max() > 0.9 * restrict


def test_sample_t_r_equal_fraction_and_distributions():
    gen = torch.Generator().manual_seed(1)
    t, r = sample_t_r(64, 0.3, equal_fraction=0.25, generator=gen)
    assert int((t == r).sum()) == 16  # round(0.25 * 64) forced; I = 0 has probability 0
    t, r = sample_t_r(2000, 0.2, distribution="logit_normal", mean=0.0, std=1.0, shift=3.0, generator=gen)
    assert t.median() > 0.6  # shift 3 pushes times toward noise
    assert ((t - r) <= 0.2 + 1e-6).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(restrict=0.0), "restrict factor R"),
    (dict(restrict=1.5), "restrict factor R"),
    (dict(restrict=0.2, equal_fraction=1.2), "equal_fraction"),
    (dict(restrict=0.2, distribution="beta"), "time distribution"),
])
def test_sample_t_r_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_t_r(4, **kwargs)


# --- the two samplers' distributions, pinned -------------------------------------------------------------
N_PAIRS = 200_000


def _binomial_tol(p: float, n: int = N_PAIRS) -> float:
    return 5 * (p * (1 - p) / n) ** 0.5 + 1e-12


def _logit_normal_cdf(x: Tensor, mean: float, std: float) -> Tensor:
    return 0.5 * (1 + torch.erf((torch.logit(x) - mean) / (std * 2 ** 0.5)))


def _expected_gap(mean_a: float, std_a: float, mean_b: float, std_b: float) -> float:
    """E|A - B| = int_0^1 F_A + F_B - 2 F_A F_B dx for independent logit-normals A, B (quadrature)."""
    x = torch.linspace(0, 1, 400_001, dtype=torch.float64)[1:-1]
    fa, fb = _logit_normal_cdf(x, mean_a, std_a), _logit_normal_cdf(x, mean_b, std_b)
    return torch.trapezoid(fa + fb - 2 * fa * fb, x).item()


@pytest.mark.parametrize("restrict, share", [(0.2, 0.0), (1.0, 0.0), (1.0, 0.25)])
def test_restricted_sampler_distribution(restrict, share):
    """DisCa's sampler, uniform t: P(r = t) = the forced share f exactly, P(r = 0) = (1 - f) R / 2,
    E[t - r] = (1 - f)(R / 2 - R^2 / 6). At R = 1: P(r = 0) = 1/2, P(r = t) = 0 without a share."""
    t, r = sample_t_r(N_PAIRS, restrict, equal_fraction=share, generator=torch.Generator().manual_seed(3))
    p_zero = (1 - share) * restrict / 2
    assert (r == t).float().mean().item() == pytest.approx(round(share * N_PAIRS) / N_PAIRS, abs=1e-9)
    assert abs((r == 0).float().mean().item() - p_zero) < _binomial_tol(p_zero)
    assert abs((t - r).mean().item() - (1 - share) * (restrict / 2 - restrict ** 2 / 6)) < 2e-3


@pytest.mark.parametrize("share, means", [(0.75, (-0.4, -0.4)), (0.0, (-0.4, -0.4)), (0.5, (0.0, -2.0))])
def test_meanflow_sampler_distribution(share, means):
    """MeanFlow's sampler: exactly int(share * B) pairs at r = t (a fixed count, the first ones, as the
    official JAX code), P(r = 0) = 0, t >= r, and E[t - r] = (1 - share) E|A - B| for the two logit-normal
    draws A, B (computed by quadrature)."""
    mean_t, mean_r = means
    t, r = sample_t_r_meanflow(N_PAIRS, mean_t=mean_t, mean_r=mean_r, equal_fraction=share,
                               generator=torch.Generator().manual_seed(4))
    assert t.dtype == r.dtype == torch.float32 and (t >= r).all() and (r > 0).all() and (t < 1).all()
    n_equal = int(share * N_PAIRS)
    assert (r == t).sum().item() == n_equal and (r[:n_equal] == t[:n_equal]).all()
    assert (r == 0).sum() == 0
    expected = (1 - share) * _expected_gap(mean_t, 1.0, mean_r, 1.0)
    assert abs((t - r).mean().item() - expected) < 2e-3, ((t - r).mean().item(), expected)
    # the default is the paper's ImageNet setting: lognorm(-0.4, 1.0) pairs, 75 % r = t; its mean interval, pinned
    if means == (-0.4, -0.4) and share == 0.75:
        assert expected == pytest.approx(0.0584, abs=1e-4)  # vs 1/3 for the restricted sampler at R = 1
        # t = the larger of two draws: its median m has F(m)^2 = 1/2
        median = torch.sigmoid(-0.4 + torch.special.ndtri(torch.tensor(0.5 ** 0.5))).item()
        assert abs(torch.median(t[t != r]).item() - median) < 0.01


@pytest.mark.parametrize("batch", [1, 3, 4, 32, 33])
def test_meanflow_sampler_forces_r_equal_t_on_a_fixed_count_of_every_batch(batch):
    """The ImageNet recipe's 75 % r = t is a count per batch (`int(bz * data_proportion)`), not a coin:
    every batch, whatever its seed, has exactly that many, and the defaults are that recipe."""
    for seed in range(5):
        t, r = sample_t_r_meanflow(batch, generator=torch.Generator().manual_seed(seed))
        assert (r == t).sum().item() == int(0.75 * batch)


def test_sampler_settings_are_checked():
    with pytest.raises(ValueError, match="equal_fraction"):
        sample_t_r_meanflow(4, equal_fraction=1.5)
    with pytest.raises(ValueError, match="std_r"):
        sample_t_r_meanflow(4, std_r=0.0)
    with pytest.raises(ValueError, match="t_r_sampler 'uniform' not in"):
        check_t_r_sampler("uniform", 1.0, "logit_normal")
    with pytest.raises(ValueError, match="needs restrict=1.0"):
        check_t_r_sampler("meanflow", 0.2, "logit_normal")
    with pytest.raises(ValueError, match="time_distribution='logit_normal'"):
        check_t_r_sampler("meanflow", 1.0, "uniform")
    check_t_r_sampler("restricted", 0.2, "uniform")


# --- target and loss -------------------------------------------------------------------------------------
def test_meanflow_target_formula():
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    dudt = torch.tensor([[10.0, -10.0], [1.0, 1.0]])
    t, r = torch.tensor([0.5, 0.9]), torch.tensor([0.25, 0.9])
    expected = torch.tensor([[1.0 - 2.5, 2.0 + 2.5], [3.0, 4.0]])  # r = t leaves v unchanged
    torch.testing.assert_close(meanflow_target(v, dudt, t, r), expected)


def test_adaptive_weight_values_and_stop_gradient():
    err = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    w1 = adaptive_weight(err, 1.0, 1e-3)
    torch.testing.assert_close(w1, torch.tensor([1000.0, 1 / 1.001, 1 / 3.001]))
    torch.testing.assert_close(adaptive_weight(err, 0.5, 1e-3), torch.tensor([1e-3, 1.001, 3.001]).rsqrt())
    torch.testing.assert_close(adaptive_weight(err, 0.0), torch.ones(3))
    assert not w1.requires_grad
    with pytest.raises(ValueError, match="power"):
        adaptive_weight(err, -1.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_weight(err, 1.0, 0.0)


def test_meanflow_loss_weighting_and_stop_gradient():
    u = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    u_tgt = torch.zeros(2, 2, requires_grad=True)
    loss, mse = meanflow_loss(u, u_tgt, power=0.0)
    torch.testing.assert_close(mse, torch.tensor(1.5))  # per-sample means 1 and 2
    torch.testing.assert_close(loss, mse)
    loss.backward()
    assert u_tgt.grad is None  # the target is stop-gradient
    torch.testing.assert_close(u.grad, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))  # d/du mean_b mean_i u^2
    loss_w, mse_w = meanflow_loss(u, u_tgt.detach(), power=1.0, eps=1e-3)
    torch.testing.assert_close(loss_w, torch.tensor((1 / 1.001 + 2 / 2.001) / 2))
    torch.testing.assert_close(mse_w, mse)


def test_meanflow_loss_sum_reduction_is_the_official_weighting():
    """py-meanflow: per-sample loss = SUM of squared error, divided by (loss.detach() + 1e-3)^p, batch mean."""
    gen = torch.Generator().manual_seed(0)
    u, u_tgt = torch.randn(3, 2, 4, generator=gen, requires_grad=True), torch.randn(3, 2, 4, generator=gen)
    per_sample = (u - u_tgt).pow(2).sum(dim=(1, 2))
    for p in (0.5, 1.0):
        loss, mse = meanflow_loss(u, u_tgt, power=p, eps=1e-3, reduction="sum")
        torch.testing.assert_close(loss, (per_sample / (per_sample.detach() + 1e-3) ** p).mean())
        torch.testing.assert_close(mse, (u - u_tgt).pow(2).mean())  # logged on the per-element scale
    (grad,) = torch.autograd.grad(loss, u)  # p = 1: the weight is stop-gradient, so d/du = w * 2 (u - u_tgt) / B
    w = 1 / (per_sample.detach() + 1e-3)
    torch.testing.assert_close(grad, w[:, None, None] * 2 * (u - u_tgt).detach() / 3)
    with pytest.raises(ValueError, match="reduction 'max'"):
        meanflow_loss(u, u_tgt, reduction="max")


def test_meanflow_dudt_rejects_non_float32_times():
    with pytest.raises(ValueError, match="float32"):
        meanflow_dudt(lambda x, r, t: x, torch.zeros(1, 2), torch.zeros(1, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64), torch.zeros(1, 2))


# --- the exact JVP on the real backbone --------------------------------------------------------------------
def test_jvp_matches_finite_difference_on_mmdit():
    """du/dt = jvp along (v, 0, 1) vs a 4th-order central difference along the same direction.
    The model runs in float64 (`.double()`); times stay float32, so t and the step are powers of two
    (exact in float32). The step is small because the time embedding has frequencies up to 1000."""
    torch.manual_seed(0)
    model = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True,
                                                "r_embed": "average"})).double().eval()
    text = tiny_text()
    text = TextCond(text.tokens.double(), text.mask, text.pooled.double())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=torch.float64)
    t, r, g = torch.tensor([0.5, 0.75]), torch.tensor([0.25, 0.625]), torch.tensor([2.0, 5.0])

    def u_fn(x_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model.run(x_, t_, text, r=r_, guidance=g).velocity

    with attention_backend(model, "math"), torch.no_grad():
        u, dudt = meanflow_dudt(u_fn, x, r, t, v)
        h = 2.0 ** -12

        def at(k: int) -> Tensor:
            return u_fn(x + k * h * v, r, t + k * h)

        fd = (-at(2) + 8 * at(1) - 8 * at(-1) + at(-2)) / (12 * h)
    torch.testing.assert_close(u, u_fn(x, r, t))
    rel = ((fd - dudt).abs().max() / dudt.abs().max()).item()
    assert rel < 2e-3, rel  # measured 2.4e-4


# --- an analytic flow: 2-D Gaussian data, where v and u are closed form ------------------------------------
MU, STD = torch.tensor([1.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 0.6], dtype=torch.float64)


def marginal(t: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of x_t = (1 - t) x0 + t eps for x0 ~ N(MU, STD^2), eps ~ N(0, 1); (B, 2) each."""
    te = t[:, None].to(MU.dtype)
    return (1 - te) * MU, ((1 - te) ** 2 * STD ** 2 + te ** 2).sqrt()


def exact_v(x: Tensor, t: Tensor) -> Tensor:
    """E[eps - x0 | x_t = x] = -MU + Cov(eps - x0, x_t) / Var(x_t) (x - E x_t)."""
    mean, std = marginal(t)
    te = t[:, None].to(x.dtype)
    return -MU + (te - (1 - te) * STD ** 2) / std ** 2 * (x - mean)


def exact_u(x: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """The flow map of Gaussian marginals keeps standardised coordinates: x_r = m_r + s_r / s_t (x - m_t);
    u = (x - x_r) / (t - r)."""
    m_t, s_t = marginal(t)
    m_r, s_r = marginal(r)
    return (x - (m_r + s_r / s_t * (x - m_t))) / (t - r)[:, None].to(x.dtype)


def gaussian_batch(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = MU + STD * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x0, torch.randn(n, 2, generator=gen, dtype=torch.float64)


def test_exact_mean_velocity_satisfies_the_meanflow_identity():
    x0, eps = gaussian_batch(64, 0)
    gen = torch.Generator().manual_seed(1)
    t = 0.2 + 0.8 * torch.rand(64, generator=gen)
    r = t - 0.2 * (0.05 + 0.95 * torch.rand(64, generator=gen))  # t - r >= 0.01: no 0/0
    x_t = interpolate(x0, eps, t)
    v = exact_v(x_t, t)
    u, dudt = meanflow_dudt(exact_u, x_t, r, t, v)
    torch.testing.assert_close(meanflow_target(v, dudt, t, r), u, rtol=1e-10, atol=1e-10)  # measured 4e-16
    # and the closed form is what integrating v gives, u -> v as r -> t
    u_int = integrate_mean_velocity(exact_v, x_t, t, r, 400)
    torch.testing.assert_close(u_int, u, rtol=0, atol=2e-3)
    torch.testing.assert_close(exact_u(x_t, t - 1e-3, t), v, rtol=0, atol=5e-3)


class TinyMeanVelocity(nn.Module):
    """u_theta(x, r, t) = a(r, t) + b(r, t) * x with (a, b) from an MLP: the family holds the exact u
    (affine in x for Gaussian data), so a few hundred steps show whether the loss points at it."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 4))

    def forward(self, x: Tensor, r: Tensor, t: Tensor) -> Tensor:
        a, b = self.net(torch.stack([r, t], dim=1)).chunk(2, dim=1)  # (B, 2) each
        return a + b * x


def test_restricted_meanflow_loss_learns_the_exact_mean_velocity():
    """Training with the exact teacher v, the Restricted MeanFlow loss and the JVP target reaches the
    closed-form mean velocity far better than v itself does as a one-step predictor."""
    torch.manual_seed(0)
    restrict = 0.5
    model = TinyMeanVelocity()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(250):
        x0, eps = gaussian_batch(256, 100 + step)
        t, r = sample_t_r(256, restrict, equal_fraction=0.25, generator=gen)
        x_t = interpolate(x0, eps, t).float()
        v = exact_v(x_t.double(), t).float()
        with torch.no_grad():
            _, dudt = meanflow_dudt(model, x_t, r, t, v)
        loss, _ = meanflow_loss(model(x_t, r, t), meanflow_target(v, dudt, t, r))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0, eps = gaussian_batch(2000, 1)
    gen = torch.Generator().manual_seed(2)
    t = 0.5 + 0.5 * torch.rand(2000, generator=gen)
    r = t - restrict * (0.5 + 0.5 * torch.rand(2000, generator=gen))  # long intervals, where v is worst
    x_t = interpolate(x0, eps, t)
    u_true = exact_u(x_t, r, t)
    with torch.no_grad():
        model_err = (model(x_t.float(), r, t).double() - u_true).pow(2).mean().item()
    v_err = (exact_v(x_t, t) - u_true).pow(2).mean().item()
    assert model_err < 0.1 * v_err, (model_err, v_err)  # measured 6.9e-4 vs 4.7e-2 (seeds 0-3: ratio 0.011-0.020)
