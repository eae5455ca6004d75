"""Stop a diverging run before it checkpoints or exports garbage.

Every stage gets a `DivergenceGuard` (train.py adds one when the config lists none): a non-finite
gradient norm, a non-finite logged training metric, or a metric above its configured limit stops
training with a `FloatingPointError` naming the step, the term and the last good checkpoint. It runs
before `ModelCheckpoint` and the export callback, and training ends by the exception, so
`ExportOnTrainEnd.on_train_end` never writes the diverged weights.
"""
from __future__ import annotations

import math

import lightning as L
import torch

from lightning_modules.common import full_value


class DivergenceGuard(L.Callback):
    def __init__(self, max_metrics: dict[str, float] | None = None, check_grad_norm: bool = True):
        """
        Args:
            max_metrics: logged training metric -> largest allowed value, e.g. {"train/loss": 1.0e3}
                (a loss blow-up); any logged `train/` metric that is NaN/Inf stops the run regardless.
            check_grad_norm: stop when the gradient norm before an optimizer step is NaN/Inf (not checked
                under fp16 loss scaling, where an overflow only skips the step).
        """
        self.max_metrics = dict(max_metrics or {})
        self.check_grad_norm = check_grad_norm

    @staticmethod
    def last_good_checkpoint(trainer: L.Trainer) -> str:
        for cb in trainer.checkpoint_callbacks:
            path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
            if path:
                return path
        return trainer.ckpt_path or "none (no checkpoint was written before the divergence)"

    def _stop(self, trainer: L.Trainer, bad: bool, what: str) -> None:
        if trainer.strategy.reduce_boolean_decision(bad, all=False):  # every rank stops together
            raise FloatingPointError(
                f"training diverged at global step {trainer.global_step}: {what}. Nothing was exported after "
                f"this step; last good checkpoint: {self.last_good_checkpoint(trainer)} (lower the learning "
                f"rate or tighten gradient clipping, then resume with --ckpt_path)")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self.check_grad_norm or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16 loss scaling: an inf gradient just makes the scaler skip the step and lower the scale
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = float(full_value(torch.nn.utils.get_total_norm(grads))) if grads else 0.0
        index = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        self._stop(trainer, not math.isfinite(norm), f"gradient norm of optimizer {index} is {norm}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bad = []
        for name, value in trainer.callback_metrics.items():
            if not name.startswith("train/") and name not in self.max_metrics:
                continue
            value = float(value)
            if not math.isfinite(value) or value > self.max_metrics.get(name, math.inf):
                limit = f" (limit {self.max_metrics[name]})" if name in self.max_metrics else ""
                bad.append(f"{name} = {value:.4g}{limit}")
        self._stop(trainer, bool(bad), ", ".join(bad) or "a metric on another rank")
