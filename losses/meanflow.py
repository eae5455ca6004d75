"""Mean-velocity (MeanFlow) quantities for stage 2, Restricted MeanFlow (SPEC §2, §4).

Mean velocity on [r, t] (MeanFlow, Geng et al. 2025, Eq. 3; DisCa §3.1):

    u(x_t, r, t) = 1 / (t - r) * integral_r^t v(x_tau, tau) dtau,     one step: x_r = x_t - (t - r) u.

Differentiating (t - r) u = integral_r^t v in t gives the MeanFlow identity (Geng et al. 2025, Eq. 6)

    u = v - (t - r) du/dt,     du/dt = v d_x u + d_t u     (total derivative, Eq. 8),

i.e. the JVP of u_theta at (x_t, r, t) along the tangent (v, 0, 1). Training regresses u_theta onto
the stop-gradient of the right-hand side (Geng et al. 2025, Eqs. 9-10; DisCa Eq. 2, Algorithm 2).
DisCa's Restricted MeanFlow samples the interval I = t - r in [0, R] only (DisCa Eq. 3).

Two (t, r) samplers (`T_R_SAMPLERS`):
- 'restricted' (`sample_t_r`, DisCa Algorithm 2): t, I ~ U(0, R), r = max(0, t - I). With R = 1
  this is NOT MeanFlow's recipe: P(r = 0) = 1/2, P(r = t) = 0 without a forced share.
- 'meanflow' (`sample_t_r_meanflow`, MeanFlow's own sampler, Geng et al. 2025 §4.3): two independent
  logit-normal times, sorted so t >= r, then a FIXED COUNT int(equal_fraction * B) of each batch
  (its first samples) gets r = t, as the official JAX code does (`Gsunshine/meanflow`, `meanflow.py`
  `sample_tr`, `configs/default.py` `data_proportion: 0.75`: the paper's ImageNet setting, 75 % r = t;
  its Table 1a ablation: 25 % r != t is best). The PyTorch CIFAR-10 code (`Gsunshine/py-meanflow`,
  `meanflow/models/time_sampler.py`) instead draws a coin per pair whose `ratio` 0.75 is the share of
  r != t: the two codes' 0.75 mean opposite things (SPEC §10.1).

Times t, r are float32 (B,) throughout; tensors are (B, ...) with any trailing shape.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

from losses.flow import expand_time, sample_time
from models.jvp import jvp_rules


T_R_SAMPLERS = ("restricted", "meanflow")
LOSS_REDUCTIONS = ("mean", "sum")


def check_restrict(restrict: float, equal_fraction: float = 0.0) -> None:
    """Validate the restrict factor R (0 < R <= 1; R = 1: intervals over all of [0, 1]) and the share of
    r = t pairs."""
    if not 0.0 < restrict <= 1.0:
        raise ValueError(f"restrict factor R must be in (0, 1] (R = 1: intervals over all of [0, 1]), got {restrict}")
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction (share of r = t samples) must be in [0, 1], got {equal_fraction}")


def check_t_r_sampler(sampler: str, restrict: float, time_distribution: str, time_shift: float = 1.0) -> None:
    """The 'meanflow' sampler draws both times from logit-normals over all of [0, 1]: it takes no R < 1,
    no other t distribution and no shift (those belong to the 'restricted' sampler)."""
    if sampler not in T_R_SAMPLERS:
        raise ValueError(f"t_r_sampler {sampler!r} not in {T_R_SAMPLERS}")
    if sampler == "meanflow" and (restrict != 1.0 or time_distribution != "logit_normal" or time_shift != 1.0):
        raise ValueError("t_r_sampler 'meanflow' (MeanFlow's logit-normal pair) needs restrict=1.0, "
                         f"time_distribution='logit_normal' and time_shift=1.0; got restrict={restrict}, "
                         f"time_distribution={time_distribution!r}, time_shift={time_shift}")


def sample_t_r(batch: int, restrict: float, *, distribution: str = "uniform", mean: float = 0.0, std: float = 1.0,
               shift: float = 1.0, equal_fraction: float = 0.0, generator: torch.Generator | None = None,
               device=None) -> tuple[Tensor, Tensor]:
    """Restricted MeanFlow time pairs (DisCa Algorithm 2, line 2): t from `sample_time`,
    I ~ U(0, R), r = max(0, t - I); then exactly round(equal_fraction * batch) random samples get r = t
    (plain velocity matching). With uniform t: P(r = 0) = (1 - f) R / 2 and
    E[t - r] = (1 - f)(R / 2 - R^2 / 6) for the share f = equal_fraction."""
    check_restrict(restrict, equal_fraction)
    t = sample_time(batch, distribution, mean=mean, std=std, shift=shift, generator=generator, device=device)
    interval = restrict * torch.rand(batch, generator=generator, device=device, dtype=torch.float32)
    r = (t - interval).clamp_min(0.0)
    n_equal = round(equal_fraction * batch)
    if n_equal:
        idx = torch.randperm(batch, generator=generator, device=device)[:n_equal]
        r[idx] = t[idx]
    return t, r  # (B,), (B,) float32, 0 <= r <= t, t - r <= R


def equal_count(batch: int, equal_fraction: float) -> int:
    """How many pairs of a batch get r = t in MeanFlow's recipe: int(equal_fraction * batch), the
    official JAX code's `int(bz * data_proportion)` (`Gsunshine/meanflow`, `meanflow.py` `sample_tr`)."""
    return int(equal_fraction * batch)


def sample_t_r_meanflow(batch: int, *, mean_t: float = -0.4, std_t: float = 1.0, mean_r: float = -0.4,
                        std_r: float = 1.0, equal_fraction: float = 0.75, generator: torch.Generator | None = None,
                        device=None) -> tuple[Tensor, Tensor]:
    """MeanFlow's own (t, r) sampler (Geng et al. 2025, section 4.3; the official JAX code,
    `Gsunshine/meanflow` `meanflow.py` `sample_tr`): t' ~ logit-normal(mean_t, std_t),
    r' ~ logit-normal(mean_r, std_r), t = max(t', r'), r = min(t', r'); then the first
    `equal_count(batch, equal_fraction)` pairs of the batch get r = t (a fixed count per batch; the
    batch order is already random). The defaults are the paper's ImageNet setting
    (`configs/default.py`: lognorm(-0.4, 1.0) for both times, `data_proportion` 0.75 = 75 % r = t)."""
    if not 0.0 <= equal_fraction <= 1.0:
        raise ValueError(f"equal_fraction (share of r = t samples) must be in [0, 1], got {equal_fraction}")
    for name, std in (("std_t", std_t), ("std_r", std_r)):
        if std <= 0:
            raise ValueError(f"{name} of the logit-normal must be > 0, got {std}")
    a = sample_time(batch, "logit_normal", mean=mean_t, std=std_t, generator=generator, device=device)
    b = sample_time(batch, "logit_normal", mean=mean_r, std=std_r, generator=generator, device=device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.arange(batch, device=device) < equal_count(batch, equal_fraction)
    return t, torch.where(equal, t, r)  # (B,), (B,) float32, 0 < r <= t < 1


JVP_METHODS = ("forward_ad", "func", "finite_difference")


def meanflow_dudt(u_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x: Tensor, r: Tensor, t: Tensor,
                  v: Tensor, method: str = "func", fd_eps: float = 2.0 ** -12,
                  explicit_rules: bool = True, attention: str = "blocked") -> tuple[Tensor, Tensor]:
    """(u, du/dt) with du/dt = v d_x u + d_t u: the JVP of u_fn(x, r, t) along the tangent (v, 0, 1)
    (MeanFlow Eq. 8). Call under `torch.no_grad()` when only du/dt is needed: the target is
    stop-gradient anyway, and the no-grad JVP costs no more memory than a forward.

    `method`: 'func' = `torch.func.jvp` (a functional transform: `u_fn` must be a plain function of its
    tensors, not a DDP/FSDP wrapper, and it does not run under DeepSpeed ZeRO-3); 'forward_ad' =
    `torch.autograd.forward_ad` dual tensors through an ordinary forward, so sharding hooks (FSDP2,
    ZeRO-3) gather each block as in a normal forward (SPEC §9.1), with `explicit_rules` (default) the
    linear layers and fused attention take the cheaper explicit tangent rules of `models.jvp` under
    no_grad (fused SDPA then works inside the JVP); 'finite_difference' = central
    difference with step `fd_eps` along (v, 0, 1), 2 forwards (its u is their mean, exact to O(eps^2)),
    a float32 cross-check only (SPEC §4). `attention`: the explicit attention rule's backend,
    `models.jvp.JVP_ATTENTION_BACKENDS` ('triton': the fused kernel of `models.jvp_triton`)."""
    if t.dtype != torch.float32 or r.dtype != torch.float32:
        raise ValueError(f"t and r must be float32 (SPEC §2), got {t.dtype} and {r.dtype}")
    tangent_x, tangent_t = v.to(x.dtype), torch.ones_like(t)
    if method == "func":
        return torch.func.jvp(lambda x_, t_: u_fn(x_, r, t_), (x, t), (tangent_x, tangent_t))
    if method == "forward_ad":
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level(), (jvp_rules(attention) if explicit_rules else nullcontext()):
            out = u_fn(fwAD.make_dual(x, tangent_x), r, fwAD.make_dual(t, tangent_t))
            u, dudt = fwAD.unpack_dual(out)
        if dudt is None:  # the output does not depend on (x, t): a zero tangent
            dudt = torch.zeros_like(u)
        return u, dudt
    if method == "finite_difference":
        if not fd_eps > 0:
            raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
        up = u_fn(x + fd_eps * tangent_x, r, t + fd_eps)
        down = u_fn(x - fd_eps * tangent_x, r, t - fd_eps)
        return (up + down) / 2, (up - down) / (2 * fd_eps)
    raise ValueError(f"unknown JVP method {method!r}; expected one of {JVP_METHODS}")


def meanflow_target(v: Tensor, dudt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """u_tgt = v - (t - r) du/dt (MeanFlow, Geng et al. 2025, Eq. 10; DisCa Eq. 2, Algorithm 2 line 6).

    `v` is the instantaneous velocity at (x_t, t) (in DisCa stage 2: the frozen stage-1 model's
    output); `dudt` from `meanflow_dudt`. Callers detach the result (the target is stop-gradient)."""
    return v - expand_time(t - r, v) * dudt


def adaptive_weight(err_sq: Tensor, power: float, eps: float = 1e-3) -> Tensor:
    """w = 1 / (err_sq + eps)^p, detached: MeanFlow's adaptive loss weighting (Geng et al. 2025, after
    Song & Dhariwal's pseudo-Huber loss). The official recipes: ImageNet p = 1, eps 0.01 (`Gsunshine/meanflow`
    `configs/default.py`); CIFAR-10 p = 0.75, eps 1e-3 (`Gsunshine/py-meanflow` `scripts/cifar10_v0.sh`). p = 0.5 behaves like a
    pseudo-Huber loss, p = 1 normalises each sample's loss to ~1; p = 0 gives w = 1."""
    if power < 0:
        raise ValueError(f"adaptive weight power p must be >= 0, got {power}")
    if eps <= 0:
        raise ValueError(f"adaptive weight eps must be > 0, got {eps}")
    return (err_sq.detach() + eps).pow(-power)


def meanflow_loss(u: Tensor, u_tgt: Tensor, power: float = 0.0, eps: float = 1e-3,
                  reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """|| u_theta - sg(u_tgt) ||^2 (MeanFlow Eq. 9; DisCa Eq. 2) per sample, weighted by
    `adaptive_weight` (p = power) and averaged over the batch. `reduction` is how a sample's squared
    error is reduced before weighting: 'mean' over its elements, or 'sum' (the official py-meanflow,
    `meanflow/models/meanflow.py`: `loss.sum(dim=(1, 2, 3))`, then `loss / (loss.detach() + eps)^p`).
    Returns (weighted loss, unweighted per-element mse), both scalars."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction {reduction!r} not in {LOSS_REDUCTIONS}")
    err = (u.float() - u_tgt.detach().float()).pow(2).flatten(1)
    per_sample = err.sum(1) if reduction == "sum" else err.mean(1)  # (B,)
    weighted = adaptive_weight(per_sample, power, eps) * per_sample if power else per_sample
    return weighted.mean(), err.mean()


def integrate_mean_velocity(v_fn: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, r: Tensor,
                            num_steps: int) -> Tensor:
    """Reference mean velocity by Euler integration of v_fn(x, tau) from t down to r in `num_steps`
    equal steps: u = (x_t - x_r) / (t - r) = the average of the step velocities (exact limit as
    num_steps grows; at r = t it is v(x_t, t)). Used for validation, never as a training target."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    dt = (t - r) / num_steps  # (B,) float32
    x, tau, total = x_t, t, torch.zeros_like(x_t)
    for _ in range(num_steps):
        v = v_fn(x, tau)
        total = total + v
        x = x - expand_time(dt, x) * v
        tau = tau - dt
    return total / num_steps
