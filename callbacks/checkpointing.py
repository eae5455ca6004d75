"""Checkpoint I/O and export callbacks.

`.ckpt` files are written with `models.io.atomic_write` (temp file in the checkpoint's own directory,
fsync, `os.replace`): Lightning's default writes the temp file in `$TMPDIR` and moves it, which on
another filesystem is a copy over the old checkpoint that a kill leaves truncated. Loading uses
`torch.load(weights_only=True)`, so resuming never unpickles arbitrary objects. Exports for later
stages are safetensors + JSON.

Sharded checkpoints (DeepSpeed ZeRO-3, FSDP2: `last.ckpt/` is a directory every rank writes into) are made
atomic by `AtomicShardedSave`, a mixin of the strategies in distributed/strategies.py: every rank writes
into `.last.ckpt.incomplete/`; when all ranks are done, rank 0 records the files and sizes in
`checkpoint_complete.json`, moves the old `last.ckpt/` aside (`.last.ckpt.previous/`), renames the new one
into place and only then deletes the old one. `find_resumable` picks the newest complete checkpoint, so a
resume after a kill at any moment finds one, and says which incomplete directory it passed over.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.io import (CONFIG_NAME, WEIGHTS_NAME, _fsync_dir, atomic_write, atomic_write_json,
                       remove_partial_files)

TRAINING_STATE = "training_state.json"  # next to an export: the steps the run had completed when it was written
COMPLETE_FILE = "checkpoint_complete.json"  # in a sharded checkpoint directory: written last, lists every file
KILL_HOOK = "DISCA_TEST_KILL_IN_CHECKPOINT"
"""test hook, `SAVE:RANK` (e.g. `2:1`): on this process's SAVE-th sharded save, rank RANK cuts its shard files
to half their size and SIGKILLs itself before the ranks agree that the checkpoint is written (what a kill in
the middle of writing a shard leaves); tests/test_faults_round3.py sets it"""


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


def incomplete_path(path: str | os.PathLike) -> Path:
    """Where a sharded checkpoint is written before it is complete."""
    return Path(path).with_name(f".{Path(path).name}.incomplete")


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint a new one replaces stays until the new one is in place."""
    return Path(path).with_name(f".{Path(path).name}.previous")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit_directory(tmp: Path, final: Path, info: dict) -> None:
    """Rank 0, once every rank has written into `tmp`: fsync the files, list them with their sizes in
    COMPLETE_FILE (written last), then swap `tmp` in for `final`, keeping the old `final` aside until the
    new one is in place."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = f.stat().st_size
    atomic_write_json(tmp / COMPLETE_FILE, {**info, "files": files})
    previous = previous_path(final)
    _remove(previous)  # left by a kill after an earlier swap: `final` is newer and complete
    if final.exists() or final.is_symlink():
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _remove(previous)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint, or None. A single file is complete (written atomically); a
    directory is when its COMPLETE_FILE lists files that are all there with their sizes."""
    path = Path(path)
    if path.is_file():
        return None
    if not path.is_dir():
        return "it does not exist"
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        empty = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.stat().st_size == 0)
        return (f"it has no {COMPLETE_FILE}: its write did not finish (a kill or crash while saving"
                + (f"; 0-byte files {empty[:3]}" if empty else "") + ")")
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"its {COMPLETE_FILE} is unreadable ({err})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written"
    return None


def find_resumable(dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest complete `last*.ckpt` (or one kept aside by an interrupted swap) in `dirs`, and a note on
    each incomplete checkpoint passed over."""
    complete, notes = [], []
    for d in dirs:
        candidates = [*d.glob("last*.ckpt"), *d.glob(".last*.ckpt.previous"), *d.glob(".*.ckpt.incomplete")]
        for c in candidates:
            problem = checkpoint_problem(c)
            if problem is None:
                complete.append(c)
            else:
                notes.append(f"{c} is incomplete: {problem}")
    if not complete:
        return None, notes
    return max(complete, key=_written_at), notes


def _written_at(path: Path) -> float:
    return (path / COMPLETE_FILE if path.is_dir() else path).stat().st_mtime


def _kill_hook(tmp: Path, rank: int, save_index: int) -> None:
    when = os.environ.get(KILL_HOOK)
    if not when or [int(x) for x in when.split(":")] != [save_index, rank]:
        return
    for f in tmp.rglob("*"):
        if f.is_file() and (f.name.startswith(f"__{rank}_") or f"_rank_{rank}_" in f.name):
            os.truncate(f, f.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)


class AtomicShardedSave:
    """Mixin for a Lightning strategy whose checkpoint is a directory written by every rank (the strategy's
    own `save_checkpoint` writes it): the directory is written as `incomplete_path(path)` and swapped in by
    rank 0 once every rank is done (`commit_directory`)."""

    _sharded_saves = 0

    def saves_directory(self) -> bool:
        return True

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self.saves_directory():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        tmp = incomplete_path(final)
        info = {"global_step": int(checkpoint.get("global_step", -1)), "world_size": self.world_size}
        if self.is_global_zero:
            _remove(tmp)  # what an interrupted save left
        self.barrier("AtomicShardedSave: cleared")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        AtomicShardedSave._sharded_saves += 1
        _kill_hook(tmp, self.global_rank, AtomicShardedSave._sharded_saves)
        self.barrier("AtomicShardedSave: written")
        if self.is_global_zero:
            commit_directory(tmp, final, info)
        self.barrier("AtomicShardedSave: committed")


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
            dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            resumable, notes = find_resumable(dirs)
            if resumable is not None:
                how, why = "Resume that run with --ckpt_path last, or", f" ({resumable} is its newest complete checkpoint)"
            else:  # --ckpt_path last would fail: do not send the user there
                how, why = "That run left no complete checkpoint to resume, so", (
                    f" (checkpoint directories {[str(d) for d in dirs]}" + (f": {'; '.join(notes)}" if notes else "") + ")")
            raise FileExistsError(
                f"{self.dirpath} already holds an export ({', '.join(existing)}) from an earlier run; a new run would "
                f"replace it. {how} delete {self.dirpath} (or set another --trainer.default_root_dir) to start "
                f"anew{why}.")

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
