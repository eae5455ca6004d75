"""Faults that lost work (issue 23), one named test each; every test fails on commit 16713fa's behaviour.

1. an export command deleting its --out (a run root, its own source);
2. a SIGKILL while a sharded (FSDP2) checkpoint directory is written;
3. two runs into one root directory;
4. evaluate.py reusing a result whose calibration file changed, or whose stored videos were damaged;
5. an unwritable <output_dir>/partial found only after sampling;
6. prepare.py --source videos reusing a shard of a clip replaced under the same name;
7. bad prepare.py / planner arguments passing or failing late;
8. errors that do not name the file (a corrupt official checkpoint, a YAML syntax error in --config)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from integration.__main__ import main as integration_main
from models.io import load_backbone
from tests.conftest import ROOT
from tests.test_official_weights import official  # noqa: F401  (fixture: tiny files in the official layout)
from tiny_pipelines import tiny_pipeline_dir  # noqa: F401  (fixture: tiny HunyuanVideo and Wan pipelines)

SMOKE_STAGE0 = ROOT / "configs/smoke/teacher_pretrain.yaml"
TIMEOUT = 300


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_command(root: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--config", str(SMOKE_STAGE0), *extra, "--trainer.accelerator", "cpu",
            "--trainer.default_root_dir", str(root), "--data.init_args.data_dir", str(data),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000",
            "--trainer.enable_progress_bar", "false"]


def run_train(root: Path, data: Path, steps: int, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(root, data, steps, *extra), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=TIMEOUT)


# ---- fault 1: exports never delete what they did not write ---------------------------------------------

def test_export_diffusers_refuses_a_run_root_and_its_own_source(tmp_path, capsys):
    """`export-diffusers --out <run root>` (which contains the export it reads), `--out` = `--export`, an
    `--out` inside it, and an existing directory that is not an earlier diffusers export: each exits
    non-zero before anything is read, and every file stays (before: the directory was deleted, rc 0)."""
    root = tmp_path / "run"
    export = root / "export"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"weights")
    (export / "config.json").write_text('{"type": "hunyuan_video"}')
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    before = files_of(tmp_path)
    for out, message in ((root, "contains the source"), (export, "is the source"), (export / "t", "is inside the source"),
                         (other, "is not a previous diffusers export")):
        with pytest.raises(SystemExit) as exit_:
            integration_main(["export-diffusers", "--export", str(export), "--out", str(out)])
        assert exit_.value.code != 0
        assert message in capsys.readouterr().err
        assert files_of(tmp_path) == before
    # the command line itself (what a user runs): non-zero, everything in place
    done = subprocess.run([sys.executable, "-m", "integration", "export-diffusers", "--export", str(export), "--out",
                           str(root)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0 and "contains the source" in done.stderr
    assert files_of(tmp_path) == before


def test_convert_official_refuses_to_replace_without_overwrite(official, capsys):  # noqa: F811
    """An existing converted export is replaced only with --overwrite (before: overwritten without asking);
    a directory holding other files never; an --out inside the inputs' directory's export is refused."""
    d = official[-1]
    args = ["convert-official", "--dit", str(d / "dit.safetensors"), "--transformer_config", str(d / "config.json"),
            "--out", str(d / "out")]
    integration_main(args)
    target = d / "out" / "restricted_meanflow"
    before = files_of(target)
    with pytest.raises(SystemExit):
        integration_main(args)
    assert "pass --overwrite" in capsys.readouterr().err and files_of(target) == before
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        integration_main([*args, "--overwrite"])
    assert "is not a previous converted export" in capsys.readouterr().err
    (target / "notes.txt").unlink()
    integration_main([*args, "--overwrite"])
    assert sorted(p.name for p in (d / "out").iterdir()) == ["restricted_meanflow"]  # no temporaries left
    inside = d / "out2" / "restricted_meanflow"  # the input file kept where the converted export would go
    inside.mkdir(parents=True)
    (inside / "dit.safetensors").write_bytes((d / "dit.safetensors").read_bytes())
    with pytest.raises(SystemExit):
        integration_main(["convert-official", "--dit", str(inside / "dit.safetensors"), "--transformer_config",
                          str(d / "config.json"), "--out", str(d / "out2")])
    assert "contains the source" in capsys.readouterr().err and (inside / "dit.safetensors").is_file()


# ---- fault 2: a SIGKILL during a sharded checkpoint write -------------------------------------------------

def fsdp2_config(tmp_path: Path) -> Path:
    """Stage 0's smoke config under the FSDP2 preset with a checkpoint every 2 steps."""
    cfg = {"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": "${trainer.default_root_dir}/checkpoints", "save_last": True, "save_top_k": 0,
                       "every_n_train_steps": 2}},
        {"class_path": "callbacks.checkpointing.ExportOnTrainEnd",
         "init_args": {"dirpath": "${trainer.default_root_dir}/export"}}]}}
    path = tmp_path / "every2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_during_fsdp2_checkpoint_write_resumes_from_a_complete_one(tmp_path):
    """2 processes (gloo, CPU), FSDP2, a checkpoint every 2 steps. Rank 1 is SIGKILLed in the middle of
    writing its shard of the step-4 checkpoint (test hook: the shard cut to half, then SIGKILL). The step-2
    checkpoint survives whole; `--ckpt_path last` says which directory was incomplete, resumes from the
    step-2 one and ends at step 4 with the weights of an uninterrupted run (before: `last.ckpt/` was
    rewritten in place, and the resume failed with a bare `EOFError`)."""
    from callbacks.checkpointing import COMPLETE_FILE, KILL_HOOK, checkpoint_problem, incomplete_path
    from callbacks.run_lock import LOCK_NAME

    data, extra = tmp_path / "data", ("--config", "configs/strategy/fsdp2.yaml", "--config",
                                      str(fsdp2_config(tmp_path)), "--trainer.devices", "2",
                                      "--data.init_args.batch_size", "1")
    full = run_train(tmp_path / "full", data, 4, *extra)
    assert full.returncode == 0, full.stderr[-4000:]

    root = tmp_path / "killed"
    killed = run_train(root, data, 4, *extra, env={KILL_HOOK: "2:1"})  # rank 1, second checkpoint (step 4)
    assert killed.returncode != 0
    last = root / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(last) is None
    assert json.loads((last / COMPLETE_FILE).read_text())["global_step"] == 2
    assert checkpoint_problem(incomplete_path(last)) is not None  # the interrupted write, left aside

    resumed = run_train(root, data, 4, *extra, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{incomplete_path(last)} is incomplete" in resumed.stderr and f"resuming from {last}" in resumed.stderr
    for run in (tmp_path / "full", root):
        assert json.loads((run / "export" / "training_state.json").read_text())["global_step"] == 4
        assert json.loads((run / "checkpoints" / "last.ckpt" / COMPLETE_FILE).read_text())["global_step"] == 4
        assert not (run / LOCK_NAME).exists()  # released by rank 0; rank 1 never took it
    assert not incomplete_path(last).exists()
    want, got = load_backbone(tmp_path / "full" / "export").state_dict(), load_backbone(root / "export").state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_export_guard_advice_is_not_a_dead_end(tmp_path):
    """A run killed during its first checkpoint write leaves an export and no complete checkpoint: the
    guard then says so and advises deleting the export, not `--ckpt_path last` (which cannot work)."""
    import train

    incomplete_path = lambda p: p.with_name(f".{p.name}.incomplete")  # noqa: E731  (callbacks/checkpointing.py)

    root = tmp_path / "run"
    (root / "export").mkdir(parents=True)
    (root / "export" / "model.safetensors").write_bytes(b"x")
    incomplete = incomplete_path(root / "checkpoints" / "last.ckpt")
    incomplete.mkdir(parents=True)
    (incomplete / "__0_0.distcp").write_bytes(b"")
    args = ["--config", str(SMOKE_STAGE0), "--trainer.default_root_dir", str(root), "--data.init_args.data_dir",
            str(tmp_path / "data"), "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false"]
    with pytest.raises(FileExistsError, match=r"no complete checkpoint to resume, so delete .*export.*incomplete"):
        train.main(args)
    with pytest.raises(FileNotFoundError, match=r"is incomplete.*delete the export"):
        train.main([*args, "--ckpt_path", "last"])


# ---- fault 3: one run per root directory ------------------------------------------------------------------

def test_second_run_into_a_locked_root_is_refused_naming_the_pid(tmp_path, capsys):
    """While one train.py runs, a second one into the same root exits non-zero within 10 s naming the
    first's pid (before: both ran, mixing metrics.csv rows and replacing each other's export). Once the
    first is SIGKILLed, its lock is stale and the next run takes it over, saying so."""
    LOCK_NAME = "run.lock"  # noqa: N806  (callbacks/run_lock.py)
    root, data = tmp_path / "run", tmp_path / "data"
    first = subprocess.Popen(train_command(root, data, 100000), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (root / LOCK_NAME).is_file() or not (root / LOCK_NAME).read_text():
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not take the lock"
            time.sleep(0.2)
        began = time.monotonic()
        second = run_train(root, data, 2)
        assert time.monotonic() - began < 10
        assert second.returncode != 0
        assert f"pid {first.pid}" in second.stderr and "in use by another run" in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from callbacks.run_lock import RunLock

    lock = RunLock(root).acquire()
    assert f"taking over a stale lock (pid {first.pid}" in capsys.readouterr().err
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (root / LOCK_NAME).exists()


# ---- fault 4: evaluate.py's resume store covers every file a method reads, and checks its videos ----------

def test_evaluation_fingerprint_follows_calibration_contents_and_damaged_videos_are_recomputed(tmp_path):
    """A TeaCache calibration kept outside the export directory, rewritten with the same size and time
    stamp, changes the method's fingerprint (before: not in it, and the stale result, 4.0 effective NFE
    instead of 2.0, was reused); flipped bytes inside a stored method's videos make the file unused,
    naming it (before: reused without a word)."""
    from evaluation import resume
    from evaluation.methods import MethodSpec

    calibration = tmp_path / "elsewhere" / "teacache_plain_4.json"
    calibration.parent.mkdir()
    calibration.write_text('{"coefficients": [1.0, 0.0]}')
    spec = MethodSpec(name="tc", kind="cache", base="cfg_distilled", cache="teacache", model="random:tiny",
                      guidance=4.0, cache_kwargs={"threshold": 0.1, "calibration": str(calibration)})
    ref = MethodSpec(name="r", kind="teacher_cfg", model="random:tiny", cfg_scale=4.0)
    before = resume.fingerprint(spec, ref, {"prompts": "p"})
    stat = calibration.stat()
    calibration.write_text('{"coefficients": [2.0, 0.0]}')  # refitted: same size
    os.utime(calibration, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time stamp
    assert resume.fingerprint(spec, ref, {"prompts": "p"}) != before

    logged = []
    store = resume.MethodResults(tmp_path / "partial", log=logged.append)
    videos = torch.linspace(-1, 1, 2 * 3 * 2 * 4 * 4).reshape(2, 3, 2, 4, 4)
    record = {"efficiency": {}, "method_s": [1.0], "reference_s": [2.0], "seconds": 3.0}
    path = store.save("tc", before, videos, record)
    found = store.load("tc", before)
    assert found is not None and torch.equal(found[0], videos)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte inside the stored videos (the file stays readable)
    path.write_bytes(bytes(data))
    assert store.load("tc", before) is None
    assert any("is damaged" in line and str(path) in line for line in logged)


# ---- fault 5: output directories are checked for writability before any work ------------------------------

def test_unwritable_partial_dir_fails_before_any_sampling(tmp_path, monkeypatch):
    """`<output_dir>/partial` that cannot be written (here: a file where the directory should be; the tests
    run as root, which ignores permission bits) fails at start, naming it, before any method is sampled
    (before: found when the first method's sampled videos were saved, losing them)."""
    import evaluate

    sampled = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: (sampled.append(1), real(*a, **k))[1])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "partial").write_text("not a directory")
    with pytest.raises(PermissionError, match=r"--output_dir's partial/ .*eval/partial.* is not writable"):
        evaluate.main(["--config", "configs/smoke/evaluate.yaml", "--output_dir", str(out)])
    assert sampled == []


# ---- fault 6: prepare.py --source videos keys its resume on each video's size and time stamp ---------------

def test_prepare_resume_notices_a_clip_replaced_under_the_same_name(tmp_path, tiny_pipeline_dir, monkeypatch):  # noqa: F811
    """Interrupted after its first shard; every clip is then replaced by another under the same name.
    The resumed prepare encodes them again: its shards equal a fresh prepare's (before: the first shard
    was reused stale, latents off by up to 0.595)."""
    import imageio.v3 as iio
    import numpy as np

    from datamodules.video_source import prepare_from_pipeline
    from tests.test_video_source import ARGS, interrupt_in_second_shard, make_video_dir, write_mp4

    videos = make_video_dir(tmp_path / "videos")
    interrupt_in_second_shard(tmp_path / "out", videos, tiny_pipeline_dir["wan"], monkeypatch)
    rng = np.random.default_rng(1)  # other clips, same names and sizes
    write_mp4(videos / "a.mp4", rng.integers(0, 255, (7, 24, 32, 3), dtype=np.uint8))
    iio.imwrite(videos / "b.gif", rng.integers(0, 255, (6, 20, 20, 3), dtype=np.uint8))
    for i in range(5):
        iio.imwrite(videos / "c" / f"{i:03d}.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    np.save(videos / "d.npy", rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8))
    resumed = prepare_from_pipeline(tmp_path / "out", videos, tiny_pipeline_dir["wan"], **ARGS)
    fresh = prepare_from_pipeline(tmp_path / "fresh", videos, tiny_pipeline_dir["wan"], **ARGS)
    for split in ("train", "val"):
        assert [s["sha256"] for s in resumed["splits"][split]["shards"]] == \
            [s["sha256"] for s in fresh["splits"][split]["shards"]]


# ---- fault 7: bad arguments fail at parse time, naming setting, value and fix ------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--frame_stride", "-1"], "--frame_stride must be >= 1 (1 takes every frame, 2 every other one), got -1"),
    (["--frame_stride", "0"], "--frame_stride must be >= 1"),
    (["--height", "0"], "--height must be >= 1, got 0"),
    (["--height", "-16"], "--height must be >= 1, got -16"),
    (["--width", "0"], "--width must be >= 1, got 0"),
    (["--text_length", "0"], "--text_length must be >= 1 (or leave it out for the pipeline's own length), got 0"),
])
def test_prepare_refuses_bad_video_arguments_at_parse_time(tmp_path, capsys, args, message):
    """Before: `--frame_stride -1` exited 0 with 1 reversed frame, 0 failed in slicing, `--height 0` in
    torch's interpolate, `--text_length 0` silently became 256. The pipeline does not even exist here:
    the arguments are refused before it is opened."""
    import prepare

    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--source", "videos", "--video_dir", str(tmp_path), "--pipeline", str(tmp_path / "none"),
                      "--out", str(tmp_path / "out"), *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gpus", ["100000", "0", "-8"])
def test_planner_refuses_an_absurd_gpu_count(capsys, gpus):
    """Before: `--gpus 100000` printed rows of 0.00 GiB."""
    from distributed.planner import main as planner_main

    with pytest.raises(SystemExit) as exit_:
        planner_main(["plan", "--config", "configs/smoke/teacher_pretrain.yaml", "--backbone", "mmdit_tiny_smoke",
                      "--gpus", gpus, "--strategy", "fsdp2", "--seq_tokens", "16"])
    assert exit_.value.code == 2
    assert f"--gpus {gpus} is out of range: give an integer from 1 to 16384" in capsys.readouterr().err


# ---- fault 8: file-reading errors name the file ------------------------------------------------------------

def test_a_corrupt_official_file_and_a_yaml_syntax_error_name_their_path(tmp_path, official):  # noqa: F811
    """convert-official on a truncated safetensors file (before: "header too small", no name); a YAML syntax
    error in a --config file of train.py or evaluate.py (before: `in "<unicode string>", line 3`)."""
    import evaluate
    import train
    from integration.official import convert_official

    d = official[-1]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((d / "dit.safetensors").read_bytes()[:4])
    with pytest.raises(ValueError, match=rf"{corrupt} \(4 bytes\) is not a readable safetensors file"):
        convert_official(tmp_path / "out", dit=corrupt, transformer_config=d / "config.json")

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ntrainer:\n  max_steps: [1, 2\n  foo: 1\n")
    expected = rf"--config {bad}: YAML syntax error at line 4, column 6: .*; fix the file"
    with pytest.raises(ValueError, match=expected):
        train.parse_config(["--config", str(SMOKE_STAGE0), "--config", str(bad)])
    with pytest.raises(ValueError, match=expected):
        evaluate.main(["--config", "configs/smoke/evaluate.yaml", "--config", str(bad)])
