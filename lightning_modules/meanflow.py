"""Stage 2: Restricted MeanFlow distillation (DisCa Algorithm 2, §3.2; MeanFlow, Geng et al. 2025).

The student is the stage-1 model plus a second time input r (`enable_r_embedding`), so at r = t it
starts equal to the stage-1 model. Per step:

    t, r = sample_t_r(R)                       (I ~ U(0, R), r = max(0, t - I); or, with
                                                t_r_sampler='meanflow', MeanFlow's own logit-normal pair)
    g ~ U(g_min, g_max),  x_t = (1 - t) x0 + t eps
    v     = M*(x_t, t, g)                      (frozen stage-1 model, no grad)
    du/dt = jvp(u_theta, (x_t, r, t), (v, 0, 1))   (no grad; explicit rules for linear and attention)
    loss  = w || u_theta(x_t, r, t, g) - sg(v - (t - r) du/dt) ||^2

The JVP runs without autograd and the student then runs a normal forward with grad: the same peak
memory as forward+backward, and it works with activation checkpointing and sharding (SPEC §4).
`jvp_method: forward_ad` (default) pushes dual tensors through an ordinary forward of the (possibly
sharded) student, so FSDP2 and ZeRO-3 gather one block at a time exactly as in training; linear layers
and fused attention take the explicit tangent rules of `models.jvp` (about 1.4x cheaper than PyTorch's
own rules on CPU, and attention in blocks of queries instead of one N x N matrix); ZeRO-3 needs
`memory_efficient_linear: false` and identity jvp rules on its hook Functions (`distributed.zero_jvp`).
`func` is `torch.func.jvp` (unsharded or FSDP2 only); `finite_difference` a float32 cross-check.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.latent_video import batch_text
from lightning_modules.common import (EMAStudentModule, check_guidance_range, finite_or_raise, freeze,
                                      sample_guidance, shard_generator)
from distributed.strategies import check_zero_config_for_jvp, zero_stage
from distributed.zero_jvp import enable_forward_ad_through_zero_hooks
from losses.flow import interpolate
from losses.meanflow import (JVP_METHODS, LOSS_REDUCTIONS, check_restrict, check_t_r_sampler,
                             integrate_mean_velocity, meanflow_dudt, meanflow_loss, meanflow_target, sample_t_r,
                             sample_t_r_meanflow)
from models.layers import ATTENTION_BACKENDS, attention_backend


JVP_ATTENTION_RULE = {"sdpa": "blocked", "math": "blocked", "triton": "triton", "auto": "auto"}  # models.jvp backend


def check_jvp_attention(jvp_attention: str, device: torch.device | None = None) -> None:
    """`jvp_attention` names a known backend, and 'triton' can run: triton is installed and, on CPU (`device`
    cpu, or no CUDA at all), Triton's interpreter is on."""
    if jvp_attention not in ATTENTION_BACKENDS:
        raise ValueError(f"jvp_attention {jvp_attention!r} is not one of {ATTENTION_BACKENDS}: set "
                         "model.init_args.jvp_attention to one of them ('auto' = the Triton kernel on CUDA, "
                         "the blocked rule elsewhere)")
    if jvp_attention != "triton":
        return
    from models.jvp_triton import interpreter_active, triton_available

    if not triton_available():
        raise ValueError("jvp_attention: triton needs the triton package: install it (`make install` / "
                         "`pip install triton`), or set jvp_attention: auto")
    on_cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    if on_cpu and not interpreter_active():
        raise ValueError("jvp_attention: triton on CPU runs the kernel in Triton's interpreter, which is off: "
                         "start the run with TRITON_INTERPRET=1 in the environment (it must be set before triton "
                         "is imported), or set jvp_attention: auto (the blocked rule on CPU)")


def check_finite(step: int, **terms: Tensor) -> None:
    """One host sync for all terms; on failure name the first non-finite one and the step."""
    if not bool(torch.stack([torch.isfinite(v).all() for v in terms.values()]).all()):
        for name, value in terms.items():
            finite_or_raise(name, value, step)


class RestrictedMeanFlowModule(EMAStudentModule):
    def __init__(self, teacher: nn.Module, student: nn.Module | None = None, r_embed: str = "average",
                 restrict: float = 0.2, equal_fraction: float = 0.0, time_distribution: str = "uniform",
                 time_mean: float = 0.0, time_std: float = 1.0, time_shift: float = 1.0,
                 t_r_sampler: str = "restricted", time_r_mean: float = -0.4, time_r_std: float = 1.0,
                 loss_reduction: str = "mean",
                 guidance_min: float = 1.0, guidance_max: float = 8.0, adaptive_power: float = 0.0,
                 adaptive_eps: float = 1e-3, jvp_attention: str = "auto", jvp_method: str = "forward_ad",
                 fd_eps: float = 2.0 ** -12, val_integration_steps: int = 8,
                 lr: float = 1e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.99),
                 warmup_steps: int = 100, decay_steps: int | None = None, ema_decay: float = 0.999,
                 grad_clip: float = 1.0, seed: int = 0,
                 activation_checkpointing: bool = False):
        """Stage 2: Restricted MeanFlow distillation of the stage-1 model.

        Args:
            teacher: the frozen stage-1 (guidance-distilled) model, which gives v.
            student: defaults to a copy of the teacher with `enable_r_embedding(r_embed)`.
            r_embed: how the student embeds r: 'average' | 'sum' | 'interval'.
            restrict: R, the largest interval t - r (R = 1 is unrestricted MeanFlow).
            equal_fraction: share of samples with r = t (plain flow matching), a fixed count per batch
                (MeanFlow's ImageNet recipe, configs/meanflow.yaml: 0.75).
            time_distribution: training times, 'uniform' or 'logit_normal'.
            time_mean: logit-normal mean (of t).
            time_std: logit-normal standard deviation (of t).
            time_shift: timestep shift applied to the sampled times (1 = none).
            t_r_sampler: 'restricted' (losses.meanflow.sample_t_r, DisCa) or 'meanflow' (sample_t_r_meanflow,
                MeanFlow's own: t and r from two logit-normals, sorted, r = t on the first
                int(equal_fraction B) pairs; needs restrict = 1 and time_distribution 'logit_normal').
            time_r_mean: logit-normal mean of r (t_r_sampler 'meanflow').
            time_r_std: logit-normal standard deviation of r (t_r_sampler 'meanflow').
            loss_reduction: how each sample's error is reduced before the adaptive weight, 'mean' | 'sum'
                (the official code's).
            guidance_min: smallest distilled CFG scale g drawn.
            guidance_max: largest distilled CFG scale g drawn.
            adaptive_power: p of the adaptive loss weight (0 = plain MSE).
            adaptive_eps: epsilon of the adaptive loss weight.
            jvp_attention: attention backend inside the JVP (see ATTENTION_BACKENDS): 'auto' (default) takes
                the fused Triton kernel of `models.jvp_triton` for CUDA tensors it supports and the blocked
                explicit rule of `models.jvp` otherwise (CPU); 'sdpa' always the blocked rule; 'triton' always
                the kernel (on CPU only with TRITON_INTERPRET=1; unsupported shapes fall back, logged once);
                'math' is explicit softmax attention (what torch.func.jvp needs).
            jvp_method: how du/dt is computed: 'forward_ad' (default, composes with ZeRO-3 and FSDP2),
                'func' (torch.func.jvp) or 'finite_difference' (a cross-check, step `fd_eps`).
            fd_eps: step of the central finite difference (jvp_method 'finite_difference').
            val_integration_steps: Euler steps of the reference mean velocity used by validation.
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay.
            betas: AdamW betas.
            warmup_steps: linear learning-rate warm-up, in optimizer steps.
            decay_steps: cosine decay to 10 % by this step (None: constant after warm-up).
            ema_decay: EMA decay of the exported student.
            grad_clip: gradient-norm clipping threshold (0 = off).
            seed: keys the per-step draws (`shard_generator`), so resumes are exact.
            activation_checkpointing: recompute each block in the backward pass (less activation memory).
        """
        super().__init__()
        check_guidance_range(guidance_min, guidance_max)
        check_restrict(restrict, equal_fraction)
        check_jvp_attention(jvp_attention)
        check_t_r_sampler(t_r_sampler, restrict, time_distribution, time_shift)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction {loss_reduction!r} not in {LOSS_REDUCTIONS}")
        if jvp_method not in JVP_METHODS:
            raise ValueError(f"jvp_method {jvp_method!r} not in {JVP_METHODS}")
        if jvp_method == "func" and jvp_attention != "math":
            raise ValueError(f"jvp_method 'func' (torch.func.jvp) has no forward-mode rule for fused SDPA attention "
                             f"(jvp_attention: {jvp_attention}): set jvp_attention: math, or use jvp_method: forward_ad")
        if adaptive_power < 0:
            raise ValueError(f"adaptive_power must be >= 0, got {adaptive_power}")
        if val_integration_steps < 1:
            raise ValueError(f"val_integration_steps must be >= 1, got {val_integration_steps}")
        teacher_cfg = getattr(teacher, "config", {})
        if isinstance(teacher_cfg, dict) and teacher_cfg.get("guidance_embed") is False:
            raise ValueError("the stage-2 teacher must be the stage-1 (guidance-distilled) model: its config has "
                             "guidance_embed=False; run stage 1 (CFGDistillModule) first and load its export")
        self.save_hyperparameters(ignore=["teacher", "student"])
        self.teacher = freeze(teacher)
        if student is None:
            student = copy.deepcopy(teacher).requires_grad_(True).train()
            student.enable_r_embedding(r_embed)
        self.student = student
        self.ema = copy.deepcopy(student).requires_grad_(False)

    # --- the loss (Algorithm 2) --------------------------------------------------------------------
    def sample_inputs(self, batch: dict, generator: torch.Generator | None = None,
                      equal_fraction: float | None = None) -> dict[str, Tensor]:
        """x_t, t, r, g for a batch (all times and the guidance float32 (B,))."""
        hp, x0 = self.hparams, batch["latents"]
        b, device = x0.shape[0], x0.device
        equal_fraction = hp.equal_fraction if equal_fraction is None else equal_fraction
        if hp.t_r_sampler == "meanflow":
            t, r = sample_t_r_meanflow(b, mean_t=hp.time_mean, std_t=hp.time_std, mean_r=hp.time_r_mean,
                                       std_r=hp.time_r_std, equal_fraction=equal_fraction, generator=generator,
                                       device=device)
        else:
            t, r = sample_t_r(b, hp.restrict, distribution=hp.time_distribution, mean=hp.time_mean,
                              std=hp.time_std, shift=hp.time_shift, generator=generator, device=device,
                              equal_fraction=equal_fraction)
        g = sample_guidance(b, hp.guidance_min, hp.guidance_max, generator, device)
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        return {"x_t": interpolate(x0, eps, t), "t": t, "r": r, "g": g}

    def loss_terms(self, batch: dict, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        s, text, student = self.sample_inputs(batch, generator), batch_text(batch), self.student
        x_t, t, r, g = s["x_t"], s["t"], s["r"], s["g"]

        def u_fn(x: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
            return student.run(x, t_, text, r=r_, guidance=g).velocity

        with torch.no_grad():
            v = self.teacher.run(x_t, t, text, guidance=g).velocity
            with attention_backend(student, self.hparams.jvp_attention):
                _, dudt = meanflow_dudt(u_fn, x_t, r, t, v, self.hparams.jvp_method, self.hparams.fd_eps,
                                        attention=JVP_ATTENTION_RULE[self.hparams.jvp_attention])
            u_tgt = meanflow_target(v, dudt, t, r)
        u = u_fn(x_t, r, t)  # the only pass with autograd
        loss, mse = meanflow_loss(u, u_tgt, self.hparams.adaptive_power, self.hparams.adaptive_eps,
                                  self.hparams.loss_reduction)
        return {"loss": loss, "mse": mse, "v": v, "dudt": dudt, "u_tgt": u_tgt, "interval": t - r}

    def setup(self, stage: str) -> None:
        if self.hparams.jvp_attention == "triton":  # the kernel on this run's device (CPU: the interpreter)
            check_jvp_attention("triton", self.trainer.strategy.root_device)
        check_zero_config_for_jvp(self.trainer.strategy, self.hparams.jvp_method != "finite_difference")
        if self.hparams.jvp_method == "func" and zero_stage(self.trainer.strategy) == 3:
            raise ValueError("jvp_method 'func' (torch.func.jvp) does not run under DeepSpeed ZeRO-3 (SPEC §9.1): "
                             "use jvp_method: forward_ad")

    def on_fit_start(self) -> None:
        enable_forward_ad_through_zero_hooks(self.student)  # no-op unless a ZeRO-3 engine hooked it

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.loss_terms(batch, shard_generator(self, self.hparams.seed, batch_idx))
        check_finite(self.global_step, **{k: terms[k] for k in ("v", "dudt", "u_tgt", "loss")})
        b = batch["latents"].shape[0]
        self.log("train/loss", terms["loss"], prog_bar=True, batch_size=b)
        self.log("train/mse", terms["mse"], batch_size=b)
        self.log("train/dudt_abs", terms["dudt"].abs().mean(), batch_size=b)
        self.log("train/interval", terms["interval"].mean(), batch_size=b)
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Error of the EMA student's one-step mean velocity against the stage-1 model integrated over
        [r, t] (no JVP, so it runs under inference mode); `val/v_as_u_error` is the same error for the
        stage-1 velocity used as one Euler step, the baseline the student must beat."""
        gen = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        s, text = self.sample_inputs(batch, gen, equal_fraction=0.0), batch_text(batch)
        x_t, t, r, g = s["x_t"], s["t"], s["r"], s["g"]

        def v_fn(x: Tensor, tau: Tensor) -> Tensor:
            return self.teacher.run(x, tau, text, guidance=g).velocity

        u_ref = integrate_mean_velocity(v_fn, x_t, t, r, self.hparams.val_integration_steps)
        u = self.ema.run(x_t, t, text, r=r, guidance=g).velocity
        b = x_t.shape[0]
        self.log("val/u_error", F.mse_loss(u.float(), u_ref.float()), prog_bar=True, batch_size=b)
        self.log("val/v_as_u_error", F.mse_loss(v_fn(x_t, t).float(), u_ref.float()), batch_size=b)

    # --- export ------------------------------------------------------------------------------------
    def sampling_model(self) -> nn.Module:
        """The EMA student; sample with `ModelVelocity(model, text, mode='meanflow', guidance=g)`."""
        return self.ema
