"""Calibrate TeaCache's rescale polynomial for one model, sampler mode and step count.

TeaCache (Liu et al. 2024, arXiv 2411.19108, section 3.3) skips the block stack while the
accumulated relative change of the *model output* is estimated to be small. The estimate comes from
the relative L1 change x of block 0's modulated input between consecutive steps, mapped through a
polynomial fitted on full (uncached) sampling runs: y = relative L1 change of the backbone's output
between the same two steps. The fit is per model, per sampler mode and per step count (the step
size changes how much the output moves), so it is saved beside the model as
`<model_dir>/teacache_<mode>_<steps>.json` and loaded with
`make_cache("teacache", num_steps=..., threshold=..., calibration=path)`.

Each row of a model call gives one (x, y) pair per step transition (with CFG the cond and uncond
rows are separate points); inference then applies the polynomial to the whole batch's ratio.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from caching.base import model_fingerprint
from models.protocol import FeatureHook, TextCond
from sampling.sampler import ModelVelocity, sample, time_grid

SIGNAL = "modulated_input"


def calibration_path(model_dir: str | Path, mode: str, num_steps: int) -> Path:
    """Where the calibration of `model_dir` for (mode, num_steps) lives."""
    return Path(model_dir) / f"teacache_{mode}_{num_steps}.json"


def rowwise_relative_l1(x: Tensor, previous: Tensor) -> Tensor:
    """(B,) |x_b - previous_b|_1 / |previous_b|_1 per batch row."""
    diff = (x.float() - previous.float()).abs().flatten(1).mean(1)
    return diff / previous.float().abs().flatten(1).mean(1)


def fit_rescale_polynomial(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray,
                           degree: int = 4) -> list[float]:
    """Least-squares polynomial y ~ p(x), coefficients highest degree first (numpy.polyfit)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"degree must be an integer >= 1, got {degree!r}")
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("calibration pairs contain non-finite values")
    if len(np.unique(x)) <= degree:
        raise ValueError(f"a degree-{degree} fit needs more than {degree} distinct x values, got "
                         f"{len(np.unique(x))}: use more prompts or steps, or a lower degree")
    return [float(c) for c in np.polyfit(x, y, degree)]


class _SignalRecorder(FeatureHook):
    """Keeps the last observed modulated input and appends its row-wise change to `changes`."""

    def __init__(self) -> None:
        self.previous: Tensor | None = None
        self.changes: list[Tensor] = []

    def observe(self, key: str, value: Tensor) -> None:
        if key != SIGNAL:
            return
        if self.previous is not None:
            self.changes.append(rowwise_relative_l1(value, self.previous))
        self.previous = value.detach()


class _OutputRecorder(nn.Module):
    """Wraps a backbone for ModelVelocity: records the row-wise change of its raw output per call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.previous: Tensor | None = None
        self.changes: list[Tensor] = []

    def run(self, *args, **kwargs):
        out = self.model.run(*args, **kwargs)
        if self.previous is not None:
            self.changes.append(rowwise_relative_l1(out.velocity, self.previous))
        self.previous = out.velocity.detach()
        return out


def collect_pairs(model: nn.Module, text: TextCond, noise: Tensor, grid: Tensor, *, mode: str,
                  cfg_scale: float | None = None, null_text: TextCond | None = None,
                  guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run one full sampling pass and return (x, y): the relative L1 changes of block 0's modulated
    input and of the backbone output between consecutive steps, one pair per row and transition."""
    signal, recorder = _SignalRecorder(), _OutputRecorder(model)
    velocity = ModelVelocity(recorder, text, mode=mode, cfg_scale=cfg_scale, null_text=null_text, guidance=guidance,
                             hook=signal)
    sample(velocity, noise, grid)
    if not signal.changes:
        if signal.previous is None:
            raise ValueError(f"the backbone never observed {SIGNAL!r}: TeaCache cannot be calibrated for it")
        raise ValueError("calibration needs at least 2 sampling steps")
    return torch.cat(signal.changes).cpu().numpy(), torch.cat(recorder.changes).cpu().numpy()


@dataclass
class TeaCacheCalibration:
    coefficients: list[float]  # highest degree first
    degree: int
    mode: str
    num_steps: int
    shift: float
    cfg_scale: float | None
    guidance: float | None
    num_prompts: int
    num_points: int
    x_range: tuple[float, float]
    rmse: float
    model_fingerprint: str  # caching.base.model_fingerprint of the calibrated model (checked on load)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=2))
        return p


def calibrate_teacache(model: nn.Module, text: TextCond, noise: Tensor, *, num_steps: int, mode: str,
                       shift: float = 1.0, cfg_scale: float | None = None, null_text: TextCond | None = None,
                       guidance: float | None = None, degree: int = 4) -> TeaCacheCalibration:
    """Fit the rescale polynomial on full sampling runs of `model` from `noise` (B, C, F, H, W) with the
    B prompts in `text`, on the same time grid the cached sampler will use."""
    grid = time_grid(num_steps, shift, device=noise.device)
    x, y = collect_pairs(model, text, noise, grid, mode=mode, cfg_scale=cfg_scale, null_text=null_text,
                         guidance=guidance)
    coefficients = fit_rescale_polynomial(x, y, degree)
    rmse = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    return TeaCacheCalibration(coefficients, degree, mode, num_steps, float(shift), cfg_scale, guidance,
                               text.batch_size, int(x.size), (float(x.min()), float(x.max())), rmse,
                               model_fingerprint(model))
