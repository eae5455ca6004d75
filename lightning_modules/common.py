"""Small helpers shared by the stage modules (functions, not a base class)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.protocol import TextCond


def drop_prompts(text: TextCond, null: TextCond, p: float, generator: torch.Generator | None = None) -> TextCond:
    """Replace each sample's prompt by the null prompt with probability p (for classifier-free guidance)."""
    if p <= 0:
        return text
    b = text.batch_size
    drop = torch.rand(b, generator=generator, device=text.tokens.device) < p  # (B,)
    if null.tokens.shape[1] != text.tokens.shape[1]:
        raise ValueError(f"null prompt length {null.tokens.shape[1]} != prompt length {text.tokens.shape[1]}")
    d3 = drop[:, None, None]
    return TextCond(torch.where(d3, null.tokens.expand_as(text.tokens), text.tokens),
                    torch.where(drop[:, None], null.mask.expand_as(text.mask), text.mask),
                    torch.where(drop[:, None], null.pooled.expand_as(text.pooled), text.pooled))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step): a run resumed at step k draws exactly the noise, times and
    prompt dropout that the uninterrupted run drew at step k (the global RNG is not checkpointed)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)): early averages do not stay tied to the
    initial weights (with a fixed 0.999, 300 steps would still weigh the init by 0.74)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def warmup_cosine(step: int, warmup: int, total: int | None, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio` at `total` (constant if total is None)."""
    if step < warmup:
        return (step + 1) / warmup
    if not total or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(params, lr: float, betas, weight_decay: float, warmup_steps: int,
                        decay_steps: int | None) -> dict:
    """AdamW with a per-step linear warm-up then cosine schedule, as Lightning's
    `configure_optimizers` return value (every stage with one optimizer uses it)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, decay_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def finite_or_raise(name: str, value: Tensor, step: int) -> Tensor:
    """Stop with a clear message when a loss term is NaN/Inf instead of training on garbage."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {name} at global step {step}: {value.detach().flatten()[:4].tolist()}")
    return value
