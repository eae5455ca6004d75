"""The strategy presets compose with every stage's config, and bad combinations fail before training
with a message that names the setting and the fix."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from types import SimpleNamespace

import pytest
import torch

import train
from distributed.strategies import DeepSpeedZeRO3, check_stage_host, check_zero_config_for_jvp
from models.mmdit import MMDiT

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = ["teacher_pretrain", "cfg_distill", "restricted_meanflow", "predictor_gan"]
PRESETS = {"ddp": "DDPStrategy", "fsdp2": "FSDP2", "deepspeed_zero3": "DeepSpeedZeRO3"}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("stage", STAGE_CONFIGS)
def test_preset_composes_with_every_stage_config(stage: str, preset: str):
    for prefix in ("configs", "configs/smoke"):
        cfg = train.parse_config(["--config", f"{prefix}/{stage}.yaml", "--config", f"configs/strategy/{preset}.yaml",
                                  "--trainer.accelerator", "cpu", "--trainer.devices", "2"])
        assert cfg.trainer.strategy.class_path.endswith(PRESETS[preset])
        assert cfg.model.class_path.startswith("lightning_modules.")  # the stage itself is untouched


def zero3(**zero) -> DeepSpeedZeRO3:
    return DeepSpeedZeRO3(config={"zero_optimization": {"stage": 3, **zero}})


def test_memory_efficient_linear_is_refused_for_the_jvp():
    with pytest.raises(ValueError, match=r"memory_efficient_linear: false"):
        check_zero_config_for_jvp(zero3(memory_efficient_linear=True), needs_jvp=True)
    with pytest.raises(ValueError, match=r"memory_efficient_linear"):  # DeepSpeed's default is true
        check_zero_config_for_jvp(zero3(), needs_jvp=True)
    check_zero_config_for_jvp(zero3(memory_efficient_linear=False), needs_jvp=True)
    check_zero_config_for_jvp(zero3(memory_efficient_linear=True), needs_jvp=False)  # finite differences


def test_stage3_refused_by_fsdp2_for_a_backbone_without_block_units():
    """Stage 3's predictor calls the frozen DiT's embed/condition/head: FSDP2 gathers them only for backbones
    sharded per block, i.e. with `shard_blocks()` (the MMDiT and the diffusers adapters)."""
    from torch import nn

    from distributed.strategies import FSDP2
    from models.mmdit import MMDiT

    with pytest.raises(ValueError, match=r"cannot host stage 3 with the Linear backbone.*deepspeed_zero3\.yaml"):
        check_stage_host("predictor_gan", FSDP2(), nn.Linear(1, 1))
    check_stage_host("predictor_gan", FSDP2(), MMDiT(size="tiny"))
    check_stage_host("predictor_gan", zero3(), nn.Linear(1, 1))  # ZeRO-3 gathers per submodule call


def test_jvp_through_torch_func_is_refused_under_zero3(tmp_path: Path):
    """A stage-2 config the ZeRO-3 preset cannot host: `jvp_method: func` (torch.func.jvp cannot follow ZeRO's
    parameter swaps); the message names the working setting."""
    from lightning_modules.meanflow import RestrictedMeanFlowModule

    torch.manual_seed(0)
    module = RestrictedMeanFlowModule(MMDiT(size="tiny", config={"guidance_embed": True}), jvp_method="func",
                                      jvp_attention="math")
    module._trainer = SimpleNamespace(strategy=zero3(memory_efficient_linear=False))
    with pytest.raises(ValueError, match=r"jvp_method 'func'.*use jvp_method: forward_ad"):
        module.setup("fit")


def test_bad_combination_fails_before_training(tmp_path: Path):
    """Through train.py: stage 2 with a ZeRO config that keeps memory_efficient_linear on stops in
    `setup`, before any step or checkpoint."""
    override = tmp_path / "mel.yaml"
    override.write_text("trainer:\n  strategy:\n    init_args:\n      config:\n        zero_optimization:\n"
                        "          stage: 3\n          memory_efficient_linear: true\n")
    args = [sys.executable, "train.py", "--config", "configs/smoke/restricted_meanflow.yaml", "--config",
            "configs/strategy/deepspeed_zero3.yaml", "--config", str(override), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.init_args.data_dir", str(tmp_path / "data")]
    run = subprocess.run(args, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0
    assert "memory_efficient_linear: false" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_planner_refuses_unknown_backbone_stage_and_strategy(tmp_path: Path, capsys):
    from distributed.planner import main, plan_stage

    with pytest.raises(ValueError, match=r"unknown backbone 'gpt5'.*hunyuan_video_13b"):
        plan_stage("cfg_distill", "gpt5", 8, "fsdp2", 1024)
    with pytest.raises(ValueError, match=r"unknown stage 'stage9'"):
        plan_stage("stage9", "mmdit_tiny", 8, "fsdp2", 1024)
    with pytest.raises(ValueError, match=r"unknown strategy 'zero4'"):
        plan_stage("cfg_distill", "mmdit_tiny", 8, "zero4", 1024)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  class_path: my.StageFive\n")
    assert main(["plan", "--config", str(bad), "--backbone", "mmdit_tiny", "--gpus", "2", "--strategy", "fsdp2",
                 "--seq_tokens", "64"]) == 2
    assert "model.class_path 'my.StageFive' is not a stage the planner knows" in capsys.readouterr().err


def test_planner_scales_with_gpus_on_the_meta_device():
    """13B on the meta device (nothing allocated): ZeRO-3 divides every per-GPU term but activations by
    the GPU count; DDP holds the whole student, EMA and teacher on every GPU."""
    from distributed.planner import plan_stage

    one = plan_stage("restricted_meanflow", "hunyuan_video_13b", 1, "deepspeed_zero3", 16384)
    eight = plan_stage("restricted_meanflow", "hunyuan_video_13b", 8, "deepspeed_zero3", 16384)
    ddp = plan_stage("restricted_meanflow", "hunyuan_video_13b", 8, "ddp", 16384)
    assert 12.8e9 < one["trained_elements"] < 13.2e9
    for key in ("params", "grads", "optimizer", "ema", "frozen"):
        assert eight[key] == pytest.approx(one[key] / 8, rel=1e-4), key
    assert eight["activations"] == one["activations"]
    assert ddp["trained_elements"] == one["trained_elements"]
