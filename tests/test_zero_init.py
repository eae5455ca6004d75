"""ZeRO-3 start-up without a full model on any rank (distributed/zero_init.py, models.io deferred loading).

Unit tests of the pieces on one process, then ONE 2-process DeepSpeed ZeRO-3 run of stage 2 (frozen
teacher loaded from an export, student = teacher + r embedding, EMA) beside the 1-process run of the same
global batch built the ordinary way: before `configure_model` each rank holds only the teacher's
non-block parameters (blocks on the meta device); `configure_model` partitions every network at
construction and each rank reads about half of the block elements from the file; the gathered teacher
is the export bit for bit; losses and exported weights equal the ordinary path."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train as train_cli
from distributed.zero_init import builds_partitioned, is_deferred, materialize, read_flat_range
from evaluation.methods import random_backbone
from lightning_modules.common import shard_blocks
from models.io import deferred_loading, load_backbone, save_backbone
from tests.test_strategy_presets import load_export, probe, train

SMOKE_TEACHER = {"patch_size": [2, 4, 4], "text_dim": 384, "pooled_dim": 384}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """The smoke config's stage-2 teacher (random_backbone, seed 0) written as an export."""
    directory = tmp_path_factory.mktemp("teacher")
    save_backbone(random_backbone("tiny", "cfg_distilled", SMOKE_TEACHER, seed=0), directory)
    return directory


def block_elements(model: torch.nn.Module) -> int:
    return sum(p.numel() for b in shard_blocks(model) for p in b.parameters())


def test_read_flat_range_reads_only_covering_rows(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"m": torch.arange(60.).reshape(5, 3, 4), "v": torch.arange(7.), "s": torch.tensor(3.)}
    save_file(tensors, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        for name, (start, stop) in [("m", (0, 30)), ("m", (30, 60)), ("m", (13, 14)), ("m", (11, 37)), ("v", (4, 7)),
                                    ("s", (0, 1))]:
            value, read = read_flat_range(f, name, start, stop)
            assert torch.equal(value, tensors[name].reshape(-1)[start:stop])
            rows = tensors[name].reshape(-1).numel() // max(1, tensors[name].shape[0]) if tensors[name].ndim else 1
            assert read <= (stop - start) + 2 * rows  # at most one partial row at either end
        assert read_flat_range(f, "m", 13, 14)[1] == 12  # one row of 3 x 4


def test_deferred_backbone_holds_only_the_root_and_materializes_to_the_export(export: Path) -> None:
    eager = load_backbone(export)
    with deferred_loading():
        deferred = load_backbone(export)
    assert is_deferred(deferred) and not is_deferred(eager)
    blocks = block_elements(eager)
    assert all(p.is_meta for b in shard_blocks(deferred) for p in b.parameters())
    held = sum(p.numel() for p in deferred.parameters() if not p.is_meta)
    assert held == sum(p.numel() for p in eager.parameters()) - blocks
    # what stage 2 does to the teacher works on the deferred copy and stays deferred
    student = copy.deepcopy(deferred).requires_grad_(True)
    student.enable_r_embedding("average")
    reference = copy.deepcopy(eager)
    reference.enable_r_embedding("average")
    assert is_deferred(student)
    built, stats = materialize(student, partitioned=False)
    assert stats == {"read_elements": blocks, "file_elements": blocks, "held_elements": held + sum(
        p.numel() for p in reference.time_r_in.parameters())}
    assert all(p.requires_grad for p in built.parameters())
    state, ref = built.state_dict(), reference.state_dict()
    assert state.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(state[name], value), name


def test_materialize_partitioned_needs_zero_init(export: Path) -> None:
    with deferred_loading():
        deferred = load_backbone(export)
    with pytest.raises(RuntimeError, match="inside deepspeed.zero.Init"):
        materialize(deferred, partitioned=True)


def test_deferred_load_checks_the_file(export: Path, tmp_path: Path) -> None:
    wrong = random_backbone("tiny", "cfg_distilled", {**SMOKE_TEACHER, "hidden_size": 64, "num_heads": 4}, seed=0)
    save_backbone(wrong, tmp_path)
    (tmp_path / "config.json").write_text((export / "config.json").read_text())  # config of another width
    with deferred_loading(), pytest.raises(ValueError, match="does not match the model config"):
        load_backbone(tmp_path)


@pytest.mark.parametrize(("preset", "expected"), [("deepspeed_zero3", True), ("fsdp2", False), ("ddp", False),
                                                  (None, False)])
def test_only_the_zero3_preset_builds_deferred(preset: str | None, expected: bool) -> None:
    args = ["--config", "configs/smoke/restricted_meanflow.yaml"]
    if preset:
        args += ["--config", f"configs/strategy/{preset}.yaml"]
    assert builds_partitioned(train_cli.parse_config(args).trainer.strategy) is expected
    assert builds_partitioned("deepspeed_stage_3") and not builds_partitioned("deepspeed_stage_2")


def test_zero3_stage2_loads_the_teacher_into_partitions(export: Path, tmp_path: Path) -> None:
    teacher = ["--model.init_args.teacher",
               json.dumps({"class_path": "models.io.load_backbone", "init_args": {"directory": str(export)}})]
    out = tmp_path / "zero_init_probe"
    zprobe = json.dumps({"class_path": "tests.zero_init_probe.ZeroInitProbe",
                         "init_args": {"out_dir": str(out), "teacher_export": str(export)}})
    single = train(tmp_path / "single", "restricted_meanflow", *teacher, "--trainer.accumulate_grad_batches", "2",
                   steps=2)
    run = train(tmp_path / "zero3", "restricted_meanflow", *teacher, "--config", "configs/strategy/deepspeed_zero3.yaml",
                f"--trainer.callbacks+={zprobe}", devices=2, steps=2)

    model = load_backbone(export)
    blocks, total = block_elements(model), sum(p.numel() for p in model.parameters())
    reads = []
    for rank in (0, 1):
        rec = json.loads((out / f"rank{rank}.json").read_text())
        held, full = rec["before"]["teacher"]
        assert full == total and held == total - blocks  # before configure_model: no block weight on the rank
        for name in ("student", "ema"):
            assert rec["before"][name][0] < rec["before"][name][1] - blocks + 1
        assert all(rec["partitioned"].values())
        for name in ("teacher", "student", "ema"):
            stats = rec["stats"][name]
            assert stats["file_elements"] == blocks
            assert 0.4 * blocks <= stats["read_elements"] <= 0.6 * blocks, (name, stats)  # its half, never the whole
        reads.append(rec["stats"]["teacher"]["read_elements"])
        assert rec["teacher_keys_equal"] and rec["teacher_max_diff"] == 0.0
    assert sum(reads) >= blocks  # together the ranks read every element

    ref = [2 * loss for _, _, loss in probe(single, "fresh", 0)["losses"]]  # accumulated loss is reported / 2
    for rank in (0, 1):
        losses = [loss for _, _, loss in probe(run, "fresh", rank)["losses"]]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[rank::2]), rtol=1e-4, atol=1e-6)
    sharded, plain = load_export("restricted_meanflow", run / "export"), load_export("restricted_meanflow",
                                                                                     single / "export")
    assert sharded.keys() == plain.keys()
    for name, value in plain.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_diffusers_adapters_load_deferred_or_eagerly_with_the_same_weights(family: str, tmp_path: Path) -> None:
    """A backbone with per-block units is deferred (its computed buffers, e.g. Wan's RoPE tables, kept), one
    without is loaded eagerly; either way the weights a stage ends up with are the export's."""
    from models.hunyuan_video import HunyuanVideoBackbone
    from models.wan import WanBackbone
    from tests.test_diffusers_adapters import _hv_model, _wan_model

    model = HunyuanVideoBackbone(_hv_model(False)) if family == "hunyuan_video" else WanBackbone(_wan_model())
    model.enable_guidance_embedding()
    save_backbone(model, tmp_path)
    with deferred_loading():
        loaded = load_backbone(tmp_path)
    expect_deferred = bool(shard_blocks(model))
    assert is_deferred(loaded) is expect_deferred
    if expect_deferred:
        loaded, _ = materialize(loaded, partitioned=False)
    state, buffers = loaded.state_dict(), dict(loaded.named_buffers())
    assert state.keys() == model.state_dict().keys() and buffers.keys() == dict(model.named_buffers()).keys()
    for name, value in [*model.state_dict().items(), *model.named_buffers()]:
        assert torch.equal(state.get(name, buffers.get(name)), value), name
