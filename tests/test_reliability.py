"""Fault injection: every row of the fault table in docs/reliability.md is one test here (issue 13).

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


# ---- item 1: a SIGKILL during a checkpoint write, with $TMPDIR on another filesystem ------------------

WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from callbacks.checkpointing import SafeCheckpointIO
state = {"state_dict": {"w": torch.zeros(4 << 20)}, "global_step": 0}  # 16 MiB
step = 0
while True:
    step += 1
    state["global_step"] = step
    state["state_dict"]["w"].fill_(step)
    print(step, flush=True)  # step `step` is being written now
    SafeCheckpointIO().save_checkpoint(state, sys.argv[1])
"""


@pytest.fixture
def other_filesystem(tmp_path):
    """A directory on another filesystem than tmp_path: a fresh tmpfs (needs root), else /dev/shm."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode == 0:
        yield mount
        subprocess.run(["umount", "-l", str(mount)], check=True)
        return
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        import tempfile

        with tempfile.TemporaryDirectory(dir=shm) as d:
            yield Path(d)
        return
    pytest.skip(f"no second filesystem: `mount -t tmpfs` failed ({done.stderr.decode().strip()}) and /dev/shm is "
                f"missing, read-only or on the same device as {tmp_path}")


def _kill_mid_write(child: subprocess.Popen, directory: Path, full: int, min_size: int) -> None:
    """SIGKILL `child` the moment a file in `directory` (the target or a temporary file beside it) holds
    between `min_size` and 90 % of a checkpoint's bytes, i.e. while a write into that directory is under way."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in os.scandir(directory):
            try:
                size = entry.stat().st_size
            except FileNotFoundError:  # renamed away meanwhile
                continue
            if min_size <= size < 0.9 * full:
                child.send_signal(signal.SIGKILL)
                child.wait()
                return
    child.kill()
    raise AssertionError(f"no write into {directory} observed within 30 s")


def test_sigkill_during_checkpoint_write_keeps_a_whole_checkpoint(tmp_path, other_filesystem):
    """Before: Lightning wrote the temp file in $TMPDIR and moved it; across filesystems the move is a copy
    over the old file, and a kill during it left last.ckpt truncated (EOFError on resume). The kill is
    timed by watching the output directory: it lands while a file there is partly written."""
    from callbacks.checkpointing import SafeCheckpointIO

    out = tmp_path / "run" / "checkpoints"
    out.mkdir(parents=True)
    assert out.stat().st_dev != other_filesystem.stat().st_dev
    target = out / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(other_filesystem), "OMP_NUM_THREADS": "1"}
    seen = set()
    for min_size in (0, 1):  # the kill lands as the temporary file appears / with part of the data written
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(ROOT)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        first = int(child.stdout.readline())
        assert int(child.stdout.readline()) == first + 1  # this child has written one whole checkpoint
        _kill_mid_write(child, out, target.stat().st_size, min_size)
        state = torch.load(target, weights_only=True, map_location="cpu")
        step = state["global_step"]
        assert step >= first and torch.equal(state["state_dict"]["w"], torch.full((4 << 20,), float(step)))
        seen.update(p.name for p in out.iterdir() if p.name != "last.ckpt")
        assert list(other_filesystem.iterdir()) == [], "nothing may be written to $TMPDIR"
    assert all(name.startswith(".last.ckpt.") and name.endswith(".partial") for name in seen), seen
    SafeCheckpointIO().load_checkpoint(target)  # resuming removes what the kill left next to the target
    assert [p.name for p in out.iterdir()] == ["last.ckpt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- item 3: divergence stops the run, names step, term and last good checkpoint, exports nothing -----

def stage0_args(root: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", SMOKE_STAGE0, "--trainer.default_root_dir", str(root), "--data.init_args.data_dir", str(data),
            "--trainer.val_check_interval", "100", *extra]


def test_divergence_stops_the_run_before_export(tmp_path):
    """Before: stage 0 at lr 1e6 trained on with grad_norm = inf, exited 0 and exported garbage."""
    root = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"diverged at global step \d+: .*(gradient norm|train/).*last good "
                                                 r"checkpoint: none"):
        fit(stage0_args(root, tmp_path / "data", "--model.init_args.lr", "1e6", "--model.init_args.warmup_steps", "1"))
    assert not (root / "export").exists()


def test_loss_limit_stops_after_the_last_good_checkpoint(tmp_path):
    """A configured loss blow-up limit: the error names the metric, its limit and the checkpoint to resume."""
    cli = train.build_cli(stage0_args(tmp_path / "run", tmp_path / "data", "--trainer.max_steps", "14") + QUIET)
    guard = cli.trainer.callbacks[0]
    assert type(guard).__name__ == "DivergenceGuard"

    class BlowUp(L.Callback):  # a logged loss term "explodes" after the step-10 checkpoint
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log("train/term", 1.0e9 if trainer.global_step >= 12 else 1.0)

    cli.trainer.callbacks.insert(0, BlowUp())
    guard.max_metrics = {"train/term": 1.0e3}
    with pytest.raises(FloatingPointError, match=r"global step 12: train/term = 1e\+09 \(limit 1000.0\).*last good "
                                                 r"checkpoint: .*last.ckpt"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 10


# ---- item 4: no stale artefacts ----------------------------------------------------------------------

def test_stale_digit_classifier_is_retrained_not_reused(tmp_path):
    """Before: evaluate.py reused whatever classifier an interrupted or shorter run left in classifier_dir."""
    from evaluation.semantic import CONFIG_FILE, WEIGHTS_FILE, ensure_digit_classifier, train_digit_classifier

    quick = dict(batch_size=16)
    train_digit_classifier(tmp_path, steps=5, **quick)  # an under-trained leftover
    said: list[str] = []
    _, config = ensure_digit_classifier(tmp_path, log=said.append, steps=8, **quick)
    assert len(said) == 1 and "stale digit classifier" in said[0] and "train.steps = 5 (wanted 8)" in said[0]
    assert config["train"]["steps"] == 8 and 0 <= config["frame_accuracy_unseen"] <= 1
    ensure_digit_classifier(tmp_path, log=said.append, steps=8, **quick)
    assert len(said) == 1  # a matching classifier is reused
    (tmp_path / CONFIG_FILE).unlink()  # killed between the weights and the config
    ensure_digit_classifier(tmp_path, log=said.append, steps=8, **quick)
    assert len(said) == 2 and f"no {CONFIG_FILE}" in said[1] and (tmp_path / WEIGHTS_FILE).is_file()


def test_new_run_refuses_to_replace_an_existing_export(tmp_path):
    root, data = tmp_path / "run", tmp_path / "data"
    fit(stage0_args(root, data, "--trainer.max_steps", "1"))
    weights = (root / "export" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds an export .* --ckpt_path last, or delete"):
        fit(stage0_args(root, data, "--trainer.max_steps", "2"))
    assert (root / "export" / "model.safetensors").read_bytes() == weights


def test_make_teacher_ships_only_when_asked():
    def dry_run(*args: str) -> str:
        return subprocess.run(["make", "-n", "teacher", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout

    assert "assets/teacher/" not in dry_run()
    assert "assets/teacher/" in dry_run("SHIP=1")


# ---- item 5: prepare.py protects data; no training batches is an error ----------------------------------

def prepare(*args: str) -> dict:
    import prepare as prepare_script

    return prepare_script.main(["--num_train", "8", "--num_val", "2", "--shard_size", "4", *args])


def test_prepare_refuses_to_overwrite_and_bad_sizes(tmp_path, capsys):
    """Before: an existing dataset was replaced without a word (a stale shard left behind), and
    --num_train 0 / -5 were accepted."""
    out = tmp_path / "data"
    prepare("--out", str(out))
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~_umask() for p in out.iterdir() if p.suffix != ".txt")
    with pytest.raises(SystemExit):
        prepare("--out", str(out), "--num_train", "4")
    err = capsys.readouterr().err
    assert f"--out {out} is not empty" in err and "pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):
            prepare("--out", str(tmp_path / "empty"), "--num_train", bad)
        assert f"--num_train must be >= 1, got {bad}" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()

    interrupted = tmp_path / "interrupted"  # shards but no metadata.json: redone without --overwrite
    prepare("--out", str(interrupted))
    (interrupted / "metadata.json").unlink()
    assert prepare("--out", str(interrupted))["splits"]["train"]["num_samples"] == 8

    meta = prepare("--out", str(out), "--num_train", "4", "--overwrite")
    names = sorted(p.name for p in out.iterdir())
    assert meta["splits"]["train"]["num_samples"] == 4
    assert names == ["metadata.json", "notes.txt", "null_prompt.safetensors", "train-00000.json",
                     "train-00000.safetensors", "val-00000.json", "val-00000.safetensors"]  # no stale train-00001


def test_training_without_batches_or_validation_fails_before_training(tmp_path):
    """Before: training on an empty split exited 0 with no export; a dataset without validation
    samples failed with a bare StopIteration after training."""
    tiny, noval = tmp_path / "tiny", tmp_path / "noval"
    prepare("--out", str(tiny), "--num_train", "2")  # fewer samples than one batch of 4
    with pytest.raises(ValueError, match="train split has 2 samples, fewer than one batch of 4"):
        fit(stage0_args(tmp_path / "a", tiny))
    prepare("--out", str(noval), "--num_val", "0")
    with pytest.raises(ValueError, match="no validation samples .*--num_val N"):
        fit(stage0_args(tmp_path / "b", noval))
    assert not (tmp_path / "a" / "export").exists()


# ---- item 6: late failures moved early -------------------------------------------------------------

@pytest.mark.parametrize("option, value, message", [("--timing.repeats", "0", "repeats >= 1"),
                                                    ("--output.fps", "0", "fps > 0"),
                                                    ("--output.scale", "0", "scale >= 1")])
def test_evaluate_options_are_checked_at_start(tmp_path, option, value, message):
    import evaluate

    with pytest.raises(ValueError, match=message):
        evaluate.main(["--config", str(ROOT / "configs/smoke/evaluate.yaml"), "--output_dir", str(tmp_path),
                       option, value])
    assert not any(tmp_path.iterdir())  # nothing sampled, nothing written


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    from callbacks.checkpointing import SafeCheckpointIO

    junk, tensors = tmp_path / "junk.ckpt", tmp_path / "tensors.ckpt"
    junk.write_bytes(os.urandom(5000))
    torch.save({"w": torch.zeros(2)}, tensors)
    for path in (junk, tensors):
        with pytest.raises(ValueError, match="is not a Lightning checkpoint written by train.py") as err:
            SafeCheckpointIO().load_checkpoint(path)
        assert "weights_only=False" not in str(err.value)


def test_negative_numbers_parse_on_the_command_line():
    cfg = train.parse_config(["--config", SMOKE_STAGE0, "--model.init_args.lr", "-1e-3", "--seed", "-3",
                              "--model.init_args.weight_decay", "-.5"])
    assert (cfg.model.init_args.lr, cfg.seed, cfg.model.init_args.weight_decay) == (-1e-3, -3, -0.5)
