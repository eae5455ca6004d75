"""Checkpoint I/O and export callbacks.

Lightning writes `.ckpt` through an fsspec transaction (temp file, then move), so an interrupted
save never leaves a truncated checkpoint. We only tighten loading: `torch.load(weights_only=True)`,
so resuming never unpickles arbitrary objects. Exports for later stages are safetensors + JSON.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.io import _atomic_write

TRAINING_STATE = "training_state.json"  # next to an export: the steps the run had completed when it was written


class SafeCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class ExportOnTrainEnd(L.Callback):
    """Write `pl_module.export(dirpath)` (safetensors + config.json) when fit ends and at every
    checkpoint, so the export always matches the newest checkpoint.

    `export` is called on every rank: gathering a sharded (FSDP2) model is a collective, so a
    rank-0-only call would hang. Modules whose export is not collective write on rank 0 only."""

    def __init__(self, dirpath: str, every_checkpoint: bool = True):
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = pl_module.export(self.dirpath)
        if trainer.is_global_zero:
            write_training_state(trainer, path)
            print(f"exported weights to {path}")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.every_checkpoint:
            path = pl_module.export(self.dirpath)
            if trainer.is_global_zero:
                write_training_state(trainer, path)


def write_training_state(trainer: L.Trainer, directory: str | Path) -> None:
    """`training_state.json` beside an export: the run's `global_step` and `max_steps` when it was
    written, so the evaluation can state each stage's completed steps (Lightning's last.ckpt is not
    rewritten when a run ends between checkpoints, e.g. stopped by `max_time`)."""
    state = {"global_step": int(trainer.global_step), "max_steps": int(trainer.max_steps)}
    _atomic_write(Path(directory) / TRAINING_STATE, lambda p: Path(p).write_text(json.dumps(state)))
