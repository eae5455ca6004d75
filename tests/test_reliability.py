"""Fault injection: every row of the README "Reliability" table is one test here (issue 13).

Each test injects the fault (SIGKILL during a checkpoint write, a crash mid-run, divergence, stale
or bad files, bad sizes) and checks that no work is lost and that nothing exits silently."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import train
from tests.conftest import ROOT

SMOKE_STAGE0 = str(ROOT / "configs/smoke/teacher_pretrain.yaml")
SMOKE_STAGE3 = str(ROOT / "configs/smoke/predictor_gan.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


class Recorder(L.Callback):
    """(batch index in the run, sample indices, logged training metric) per batch; optionally crashes."""

    def __init__(self, metric: str, crash_after_batches: int | None = None):
        self.metric, self.crash_after = metric, crash_after_batches
        self.rows: list[tuple[int, list[int], float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        self.rows.append((done, batch["index"].tolist(), float(trainer.callback_metrics[self.metric])))
        if self.crash_after is not None and done >= self.crash_after:
            raise RuntimeError("simulated crash")


def fit(args: list[str], recorder: L.Callback | None = None, ckpt: str | None = None):
    cli = train.build_cli(args + QUIET + (["--ckpt_path", ckpt] if ckpt else []))
    if recorder is not None:
        cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=train.resolve_ckpt_path(cli.trainer, ckpt))
    return cli


def stage3_args(root: Path, data: Path) -> list[str]:
    return ["--config", SMOKE_STAGE3, "--trainer.default_root_dir", str(root), "--data.init_args.data_dir", str(data),
            "--trainer.val_check_interval", "100"]


# ---- item 2: stage 3 checkpoints on batches and resumes exactly --------------------------------------

def test_stage3_killed_run_resumes_exactly(tmp_path):
    """Smoke stage 3: 3 MSE warm-up batches, then GAN batches (global_step +2 each), a checkpoint every 5
    batches. Killed after batch 6 and resumed, it reproduces the uninterrupted loss curve exactly
    (before: no checkpoint was ever written, `--ckpt_path last` restarted from zero, and the draws
    came from the global RNG so even a resumed run diverged)."""
    data = tmp_path / "data"
    full = Recorder("train/L_P")
    cli_full = fit(stage3_args(tmp_path / "full", data), full)
    assert [r[0] for r in full.rows] == list(range(1, 8)) and cli_full.trainer.global_step == 11

    crashed = Recorder("train/L_P", crash_after_batches=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(stage3_args(tmp_path / "resumed", data), crashed)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True, map_location="cpu")
    assert state["global_step"] == 3 + 2 * 2 and state["predictor_gan_batches_seen"] == 5
    resumed = Recorder("train/L_P")
    cli_res = fit(stage3_args(tmp_path / "resumed", data), resumed, ckpt="last")

    stitched = [r for r in crashed.rows if r[0] <= 5] + resumed.rows
    assert [r[:2] for r in stitched] == [r[:2] for r in full.rows]
    torch.testing.assert_close(torch.tensor([r[2] for r in stitched]), torch.tensor([r[2] for r in full.rows]),
                               rtol=0, atol=0)
    assert cli_res.trainer.global_step == 11
    for p_full, p_res in zip(cli_full.model.predictor.parameters(), cli_res.model.predictor.parameters()):
        torch.testing.assert_close(p_res, p_full, rtol=0, atol=0)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path):
    cli = train.build_cli(stage3_args(tmp_path / "run", tmp_path / "data") + QUIET)
    with pytest.raises(FileNotFoundError, match="no last\\*.ckpt in .*nothing to resume"):
        train.resolve_ckpt_path(cli.trainer, "last")
