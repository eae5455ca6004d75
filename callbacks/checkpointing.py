"""Checkpoint I/O and export callbacks.

`.ckpt` files are written with `models.io.atomic_write` (temp file in the checkpoint's own directory,
fsync, `os.replace`): Lightning's default writes the temp file in `$TMPDIR` and moves it, which on
another filesystem is a copy over the old checkpoint that a kill leaves truncated. Loading uses
`torch.load(weights_only=True)`, so resuming never unpickles arbitrary objects. Exports for later
stages are safetensors + JSON.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, atomic_write_json, remove_partial_files

TRAINING_STATE = "training_state.json"  # next to an export: the steps the run had completed when it was written


class SafeCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
        remove_partial_files(path)  # what a kill during its last save left behind
        try:
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
            problem = None if isinstance(checkpoint, dict) and "state_dict" in checkpoint else "it has no state_dict"
        except Exception as err:  # noqa: BLE001 (the weights-only unpickler raises KeyError, EOFError, ... on junk)
            # torch's own message would suggest weights_only=False, i.e. unpickling an unknown file
            problem = f"torch.load(weights_only=True) raised {type(err).__name__}"
        if problem:
            raise ValueError(f"{str(path)!r} ({Path(path).stat().st_size} bytes) is not a Lightning checkpoint written "
                             f"by train.py ({problem}); resume from another .ckpt, or drop --ckpt_path to start anew")
        return checkpoint


class BatchCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_batches` training batches. `ModelCheckpoint(every_n_train_steps=N)`
    counts optimizer steps: with two optimizers (stage 3: 1 step per warm-up batch, 2 per GAN batch)
    `global_step` can jump over every multiple of N and no checkpoint is ever written."""

    def __init__(self, dirpath: str, every_n_batches: int, save_last: bool = True, save_top_k: int = 0):
        """
        Args:
            dirpath: checkpoint directory (`last.ckpt` is written there).
            every_n_batches: save after every this many training batches (counted across resumes).
            save_last: keep `last.ckpt` pointing at the newest checkpoint.
            save_top_k: as in ModelCheckpoint (0: only `last.ckpt`).
        """
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        super().__init__(dirpath=dirpath, save_last=save_last, save_top_k=save_top_k)
        self.every_n_batches = every_n_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        batches = trainer.fit_loop.epoch_loop.batch_progress.total.processed  # restored on resume
        if batches % self.every_n_batches or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class ExportOnTrainEnd(L.Callback):
    """Write `pl_module.export(dirpath)` (safetensors + config.json) when fit ends and at every
    checkpoint, so the export always matches the newest checkpoint.

    A new run (no `--ckpt_path`) refuses to start when `dirpath` already holds an export, instead of
    silently replacing it: resume that run, or delete the export / choose another root.

    `export` is called on every rank: gathering a sharded (FSDP2) model is a collective, so a
    rank-0-only call would hang. Modules whose export is not collective write on rank 0 only."""

    def __init__(self, dirpath: str, every_checkpoint: bool = True):
        """
        Args:
            dirpath: export directory (model weights + config.json) read by the next stage.
            every_checkpoint: also export whenever a checkpoint is saved.
        """
        self.dirpath = dirpath
        self.every_checkpoint = every_checkpoint

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not in setup: only now is `trainer.ckpt_path` set under every strategy
        existing = [n for n in (WEIGHTS_NAME, CONFIG_NAME) if (Path(self.dirpath) / n).exists()]
        if trainer.ckpt_path is None and existing:
            raise FileExistsError(
                f"{self.dirpath} already holds an export ({', '.join(existing)}) from an earlier run; a new run would "
                f"replace it. Resume that run with --ckpt_path last, or delete {self.dirpath} (or set another "
                f"--trainer.default_root_dir) to start anew.")

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
    atomic_write_json(Path(directory) / TRAINING_STATE, state)
