"""One sampling loop for every method: x_{next} = x_t - (t - r) * velocity(x_t, t, r).

With an instantaneous-velocity model this is Euler; with a mean-velocity (MeanFlow) model
`velocity` returns u(x_t, r, t) and the same update is exact on each interval [r, t].
Velocity callables own their model calls and count NFE (full backbone evaluations).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from losses.flow import cfg_combine, shift_time
from models.protocol import PLAIN, FeatureHook, TextCond


def time_grid(num_steps: int, shift: float = 1.0, device=None) -> Tensor:
    """(num_steps + 1,) float32 times from 1 (noise) to 0 (data), uniform then shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)
    return shift_time(t, shift) if shift != 1.0 else t


class Velocity(Protocol):
    nfe: float

    def __call__(self, x: Tensor, t: Tensor, r: Tensor, step: int) -> Tensor: ...


class ModelVelocity:
    """A backbone as a sampler velocity.

    mode 'cfg':       g v(x, t, c) + (1 - g) v(x, t, null) in one batched call (2 NFE per step);
    mode 'plain':     v(x, t, c) (1 NFE), optionally with the distilled guidance input;
    mode 'meanflow':  u(x, r, t, c) (1 NFE) for stage-2 models, r = the step's end time.
    """

    MODES = ("cfg", "plain", "meanflow")

    def __init__(self, model: nn.Module, text: TextCond, *, mode: str = "plain", cfg_scale: float | None = None,
                 null_text: TextCond | None = None, guidance: float | None = None, hook: FeatureHook = PLAIN):
        if mode not in self.MODES:
            raise ValueError(f"velocity mode {mode!r} not in {self.MODES}")
        if mode == "cfg" and (cfg_scale is None or null_text is None):
            raise ValueError("mode 'cfg' needs cfg_scale and null_text")
        self.model, self.text, self.mode, self.hook = model, text, mode, hook
        self.cfg_scale, self.guidance = cfg_scale, guidance
        if mode == "cfg":  # broadcast the null prompt to the batch once, then run cond+uncond together
            b = text.batch_size
            null = TextCond(null_text.tokens.expand(b, -1, -1), null_text.mask.expand(b, -1),
                            null_text.pooled.expand(b, -1))
            self.text = _pad_cat(text, null)
        self.nfe = 0.0

    def __call__(self, x: Tensor, t: Tensor, r: Tensor, step: int) -> Tensor:
        b = x.shape[0]
        tb = t.expand(b).float()
        self.hook.begin_step(step, float(t))
        if self.mode == "cfg":
            out = self.model.run(torch.cat([x, x]), torch.cat([tb, tb]), self.text, hook=self.hook).velocity
            self.nfe += 2
            return cfg_combine(out[:b], out[b:], self.cfg_scale)
        g = None if self.guidance is None else torch.full((b,), float(self.guidance), device=x.device)
        rb = r.expand(b).float() if self.mode == "meanflow" else None
        self.nfe += 1
        return self.model.run(x, tb, self.text, r=rb, guidance=g, hook=self.hook).velocity


def _pad_cat(a: TextCond, b: TextCond) -> TextCond:
    """Batch-concatenate two text conditions whose token lengths may differ (pad with masked zeros)."""
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(c: TextCond) -> TextCond:
        extra = length - c.tokens.shape[1]
        if extra == 0:
            return c
        tok = torch.nn.functional.pad(c.tokens, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(c.mask, (0, extra), value=False)
        return TextCond(tok, mask, c.pooled)

    return pad(a).cat(pad(b))


@torch.no_grad()
def sample(velocity: Velocity, noise: Tensor, grid: Tensor, *, progress: bool = False) -> Tensor:
    """Integrate from grid[0] (noise) to grid[-1] with x_r = x_t - (t - r) * velocity(x_t, t, r)."""
    x = noise
    steps = range(len(grid) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        t, r = grid[i], grid[i + 1]
        x = x - (t - r).to(x.dtype) * velocity(x, t, r, i)
    return x
