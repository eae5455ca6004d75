"""TeaCache: "Timestep embedding tells: it's time to cache for video diffusion model" (Liu et al. 2024,
arXiv 2411.19108).

The cheap signal is block 0's timestep-modulated input (observed by the backbone as
`modulated_input`). Between consecutive steps TeaCache measures its relative L1 change
`|x_s - x_{s-1}|_1 / |x_{s-1}|_1`, maps it through a per-model rescale polynomial to an estimate of
the model output's relative change, and accumulates it. While the accumulated estimate stays below
`threshold` the whole block stack is skipped by adding the cached `blocks` residual (hidden - input
tokens) to the new input tokens; otherwise the stack runs, the residual is refreshed and the
accumulator resets. The first and last steps always compute (DisCa appendix: l = 0.15 and 0.4).

The polynomial must be calibrated for each model (caching/teacache_calibration.py); coefficients
are numpy.poly1d order (highest degree first). A negative polynomial value (possible outside the
fitted range) is clamped to 0, so the accumulator never decreases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from torch import Tensor

from caching.base import CacheHook

KEY = "blocks"
SIGNAL = "modulated_input"


def rescale(coefficients: Sequence[float], x: float) -> float:
    """The rescale polynomial at x (coefficients highest degree first, as numpy.poly1d)."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def relative_l1(x: Tensor, previous: Tensor) -> float:
    """|x - previous|_1 / |previous|_1 over all elements (the whole batch, as TeaCache does)."""
    return float((x - previous).abs().mean() / previous.abs().mean())


def load_coefficients(path: str | Path, num_steps: int | None = None, *, model_fingerprint: str | None = None,
                      mode: str | None = None, shift: float | None = None) -> list[float]:
    """Coefficients from a calibration JSON. Each given expectation is checked against what the file was
    fitted for, and a mismatch is refused (the polynomial is per model, sampler and step count):
    `num_steps`, `model_fingerprint` (caching.base.model_fingerprint of the model it will run on),
    `mode` (ModelVelocity mode) and `shift` (of the time grid)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TeaCache calibration file {str(p)!r} not found (run calibrate_teacache.py)")
    data = json.loads(p.read_text())
    if "coefficients" not in data:
        raise ValueError(f"{p} has no 'coefficients': not a TeaCache calibration file")
    redo = "re-run calibrate_teacache.py for this model, sampler and step count"
    if num_steps is not None and data.get("num_steps") != num_steps:
        raise ValueError(f"{p} was calibrated for num_steps={data.get('num_steps')}, but the cache is for "
                         f"num_steps={num_steps}: {redo}")
    if model_fingerprint is not None and data.get("model_fingerprint") != model_fingerprint:
        raise ValueError(f"{p} was calibrated on another model (fingerprint {data.get('model_fingerprint')}, this "
                         f"model's is {model_fingerprint}): {redo}")
    if mode is not None and data.get("mode") != mode:
        raise ValueError(f"{p} was calibrated for sampler mode {data.get('mode')!r}, not {mode!r}: {redo}")
    if shift is not None and data.get("shift") != float(shift):
        raise ValueError(f"{p} was calibrated on a grid with shift {data.get('shift')}, not {shift}: {redo}")
    return [float(c) for c in data["coefficients"]]


class TeaCache(CacheHook):
    name = "teacache"

    def __init__(self, num_steps: int, threshold: float = 0.15, coefficients: Sequence[float] | None = None,
                 calibration: str | Path | None = None, *, model_fingerprint: str | None = None,
                 count_flops: bool = True):
        """Give exactly one of `coefficients` (highest degree first; `[1.0, 0.0]` = no rescaling) or
        `calibration` (a JSON written by caching.teacache_calibration; refused unless fitted for
        `num_steps`, and for the model of `model_fingerprint` when given)."""
        if (coefficients is None) == (calibration is None):
            raise ValueError("TeaCache needs exactly one of coefficients=[...] (highest degree first) or "
                             "calibration='teacache_<mode>_<steps>.json' (see calibrate_teacache.py)")
        if calibration is not None:
            coefficients = load_coefficients(calibration, num_steps, model_fingerprint=model_fingerprint)
        coefficients = [float(c) for c in coefficients]
        if not coefficients:
            raise ValueError("TeaCache coefficients must not be empty")
        if float(threshold) < 0:
            raise ValueError(f"TeaCache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.coefficients = coefficients
        super().__init__(num_steps, count_flops=count_flops)

    def clear(self) -> None:
        self.residual: Tensor | None = None
        self.previous_input: Tensor | None = None
        self.accumulated = 0.0
        self.compute = True
        self.observed = False

    def plan(self, step: int, t: float) -> None:
        self.observed = False

    def observe(self, key: str, value: Tensor) -> None:
        if key != SIGNAL:
            return
        step = self.records[-1].step
        if step == 0 or step == self.num_steps - 1 or self.previous_input is None:
            self.compute, self.accumulated = True, 0.0
        else:
            self.accumulated += max(rescale(self.coefficients, relative_l1(value, self.previous_input)), 0.0)
            self.compute = self.accumulated >= self.threshold
            if self.compute:
                self.accumulated = 0.0
        self.previous_input = value
        self.observed = True
        self.track_peak()

    def lookup(self, key: str) -> Tensor | None:
        if key != KEY:
            return None
        if not self.observed:
            raise ValueError(f"TeaCache needs the backbone to observe {SIGNAL!r} before the {KEY!r} update "
                             "(block 0's modulated input); this backbone did not")
        return None if self.compute else self.residual

    def store(self, key: str, value: Tensor) -> None:
        if key == KEY:
            self.residual = value

    def held(self) -> Iterable[Tensor]:
        return tuple(t for t in (self.residual, self.previous_input) if t is not None)
