"""Every stage's smoke config under the strategy presets on 2 CPU processes (gloo), in the command form
users run: `train.py --config configs/smoke/<stage>.yaml --config configs/strategy/<preset>.yaml
--trainer.accelerator cpu --trainer.devices 2`. One 2-process run (then one `--ckpt_path last` resume)
per stage x preset serves all of its checks:

- it trains, checkpoints, and resumes to the same step;
- its export is an ordinary safetensors directory that `load_backbone` / `load_predictor` loads;
- its per-batch losses equal the 1-process run of the same global batch (2 micro-batches of 1, gradient
  accumulation; `shard_generator` makes micro-batch k draw what rank k draws), and so do the exported
  weights: the sharded math (FSDP2 / ZeRO-3 gathering, the stage-2 forward-AD JVP through sharded
  blocks, the EMA on shards, clipping) is the unsharded math;
- every large network is partitioned: each rank holds about half of its parameter elements, and the
  memory planner's per-rank parameter and optimizer elements are what the rank holds;
- the 2-process runs checkpoint activations per block (`activation_checkpointing: true`), the 1-process
  reference does not: recomputation changes no number.
bf16-mixed runs (stage 2, both presets) train with finite losses, float32 timesteps, and export.

Batch size 1 per rank so that the distributed sampler's interleaving (rank k gets samples k, k+2, ...)
is the 1-process order of the micro-batches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed.planner import plan_stage, stage_of_config
from models.io import load_backbone
from models.predictor import load_predictor

ROOT = Path(__file__).resolve().parents[1]
STAGES = {  # stage -> (smoke config, steps of the first run, steps after the resume)
    "flow_matching": ("configs/smoke/teacher_pretrain.yaml", 2, 4),
    "cfg_distill": ("configs/smoke/cfg_distill.yaml", 2, 4),
    "restricted_meanflow": ("configs/smoke/restricted_meanflow.yaml", 2, 4),
    "predictor_gan": ("configs/smoke/predictor_gan.yaml", 3, 5),  # 3 MSE batches, then 1 GAN batch (D + P)
}
FROZEN = {"flow_matching": (), "cfg_distill": ("teacher",), "restricted_meanflow": ("teacher",),
          "predictor_gan": ("model",)}
TIMEOUT = 240


def train(tmp: Path, stage: str, *extra: str, devices: int = 1, resume: bool = False, steps: int) -> Path:
    config = STAGES[stage][0]
    probe = json.dumps({"class_path": "tests.dist_probe.Probe", "init_args": {"out_dir": str(tmp / "probe")}})
    args = [sys.executable, "train.py", "--config", config, *extra, "--trainer.accelerator", "cpu",
            "--trainer.devices", str(devices), "--trainer.default_root_dir", str(tmp),
            "--data.init_args.data_dir", str(tmp.parent / "data"), "--data.init_args.batch_size", "1",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000",
            "--trainer.log_every_n_steps", "1", f"--trainer.callbacks+={probe}"]
    if resume:
        args += ["--ckpt_path", "last"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if run.returncode:
        raise AssertionError(f"{' '.join(args[1:])} failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
    return tmp


def probe(tmp: Path, tag: str, rank: int) -> dict:
    return json.loads((tmp / "probe" / f"{tag}_rank{rank}.json").read_text())


def load_export(stage: str, directory: Path) -> dict[str, torch.Tensor]:
    if stage == "predictor_gan":
        cfg = json.loads((directory / "config.json").read_text())
        from models.io import build_backbone

        return load_predictor(directory, build_backbone(cfg["backbone"])).state_dict()
    return load_backbone(directory).state_dict()


def check_planner(stage: str, preset: str, measured: dict) -> None:
    """The memory planner's per-rank parameter and optimizer elements (rank 0 holds the most) are what
    rank 0 of the run holds (AdamW: exp_avg and exp_avg_sq per trained element)."""
    init_args = stage_of_config(STAGES[stage][0])[1]
    plan = plan_stage(stage, "mmdit_tiny_smoke", 2, preset, seq_tokens=1, precision="32", init_args=init_args)
    held = {name: local for name, (local, _) in measured["held"].items()}
    trained = {"flow_matching": ("backbone",), "predictor_gan": ("predictor", "discriminator")}.get(stage, ("student",))
    assert plan["trained_elements"] == sum(held[n] for n in trained)
    assert plan["ema_elements"] == held.get("ema", 0)
    assert plan["frozen_elements"] == sum(held[n] for n in FROZEN[stage])
    assert plan["optimizer_elements"] == measured["optimizer_elements"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """1-process runs of the same global batch (2 micro-batches of 1), one per stage, built on demand, with
    the same interruption: a run that reached max_steps counts its epoch as finished, so its resume starts
    the next epoch's order (Lightning's semantics, identical for 1 and 2 processes)."""
    root, cache = tmp_path_factory.mktemp("single"), {}

    def get(stage: str) -> Path:
        if stage not in cache:
            acc = ("--trainer.accumulate_grad_batches", "2")
            train(root / stage, stage, *acc, steps=STAGES[stage][1])
            cache[stage] = train(root / stage, stage, *acc, steps=STAGES[stage][2], resume=True)
        return cache[stage]
    return get


CASES = [(stage, preset) for stage in STAGES for preset in ("fsdp2", "deepspeed_zero3")]


@pytest.mark.parametrize(("stage", "preset"), CASES)
def test_two_process_preset(stage: str, preset: str, tmp_path: Path, reference) -> None:
    _, first, total = STAGES[stage]
    run = tmp_path / "run"
    strategy = ["--config", f"configs/strategy/{preset}.yaml", "--model.init_args.activation_checkpointing", "true"]
    train(run, stage, *strategy, devices=2, steps=first)
    train(run, stage, *strategy, devices=2, steps=total, resume=True)

    for rank in (0, 1):
        fresh, resumed = probe(run, "fresh", rank), probe(run, "resume", rank)
        assert fresh["world"] == 2 and fresh["global_step"] == first
        assert resumed["global_step"] == total  # resumed from `last` to the requested step
        # it went on from there: its first batch ends at step first + 1 (stage 3: a GAN batch, D and P steps, + 2)
        assert resumed["losses"][0][0] == first + (2 if stage == "predictor_gan" else 1)
        for name, (local, full) in fresh["held"].items():  # every network partitioned (~half per rank)
            if (name, preset) == ("discriminator", "deepspeed_zero3"):  # replicated outside ZeRO by design
                assert local == full
                continue
            assert 0.4 * full <= local <= 0.6 * full, (name, local, full)
        assert set(FROZEN[stage]) <= set(fresh["held"])
    check_planner(stage, preset, probe(run, "resume", 0))  # after the resume every optimizer has stepped
    export = run / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    sharded_weights = load_export(stage, export)

    if stage == "predictor_gan":  # manual optimization cannot accumulate micro-batches: no 1-process twin (README)
        return
    single = reference(stage)
    # micro-batch 2s + k; Lightning reports an accumulated micro-batch's loss divided by the accumulation (2)
    ref = [2 * loss for tag in ("fresh", "resume") for _, _, loss in probe(single, tag, 0)["losses"]]
    for rank in (0, 1):
        losses = [loss for _, _, loss in probe(run, "fresh", rank)["losses"] + probe(run, "resume", rank)["losses"]]
        assert len(losses) == total
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[rank::2]), rtol=1e-4, atol=1e-6)
    single_weights = load_export(stage, single / "export")
    assert sharded_weights.keys() == single_weights.keys()
    for name, value in single_weights.items():
        torch.testing.assert_close(sharded_weights[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("preset", ["fsdp2", "deepspeed_zero3"])
def test_two_process_bf16(preset: str, tmp_path: Path) -> None:
    run = train(tmp_path / "run", "restricted_meanflow", "--config", f"configs/strategy/{preset}.yaml",
                "--trainer.precision", "bf16-mixed", devices=2, steps=2)
    for rank in (0, 1):
        losses = [loss for _, _, loss in probe(run, "fresh", rank)["losses"]]
        assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    assert load_backbone(run / "export").config["r_embed"] == "average"
