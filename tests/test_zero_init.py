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


def test_deferred_random_backbone_warm_started_or_used_as_a_teacher(tmp_path: Path) -> None:
    """Stage 0's `init_from` on a deferred MMDiT records the export (checked) instead of loading into meta
    tensors; a deferred random MMDiT given to a stage as its frozen teacher is built whole (`freeze`), as
    without ZeRO-3, since the stage derives its student from it."""
    from lightning_modules.flow_matching import FlowMatchingModule
    from lightning_modules.meanflow import RestrictedMeanFlowModule
    from models.io import defer_init
    from models.mmdit import MMDiT

    source = random_backbone("tiny", "cfg", SMOKE_TEACHER, seed=3)
    save_backbone(source, tmp_path)
    with deferred_loading():
        stage0 = FlowMatchingModule(defer_init(MMDiT, size="tiny", config=SMOKE_TEACHER), init_from=str(tmp_path))
    for module in (stage0.backbone, stage0.ema):
        built, stats = materialize(module, partitioned=False)
        assert stats["read_elements"] == stats["file_elements"] == sum(p.numel() for p in source.parameters())
        for name, value in source.state_dict().items():
            assert torch.equal(built.state_dict()[name], value), name
    torch.manual_seed(0)
    eager = MMDiT(size="tiny", config={**SMOKE_TEACHER, "guidance_embed": True})
    torch.manual_seed(0)
    with deferred_loading():
        teacher = defer_init(MMDiT, size="tiny", config={**SMOKE_TEACHER, "guidance_embed": True})
        stage2 = RestrictedMeanFlowModule(teacher)
    assert not is_deferred(stage2.teacher) and not any(p.is_meta for p in stage2.student.parameters())
    for name, value in eager.state_dict().items():
        assert torch.equal(stage2.teacher.state_dict()[name], value), name


def test_eager_and_deferred_loading_leave_the_global_rng_alike(export: Path) -> None:
    """Layers a stage draws after loading an export (stage 1's guidance embedder, stage 3's P and D) get the
    same values under every strategy: neither loader moves the global RNG."""
    draws = []
    for deferred in (False, True):
        torch.manual_seed(0)
        with deferred_loading(deferred):
            load_backbone(export)
        draws.append(torch.randn(8))
    torch.manual_seed(0)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.randn(8))


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


def cli_model(*args: str):
    """The stage module train.py builds for `args` (no training)."""
    import sys

    argv, sys.argv = sys.argv, ["train.py"]  # LightningCLI warns about pytest's own argv otherwise
    try:
        return train_cli.build_cli([*args, "--trainer.accelerator", "cpu", "--trainer.devices", "1"]).model
    finally:
        sys.argv = argv


@pytest.mark.parametrize("preset", ["deepspeed_zero3", "fsdp2"])
def test_train_py_defers_construction_only_under_zero3(preset: str, export: Path) -> None:
    """Stage 0's new MMDiT and its EMA: every parameter on the meta device (nothing held); stage 2's teacher
    from an export, its student and EMA: only the non-block parameters held. Other presets: built whole."""
    strategy = ["--config", f"configs/strategy/{preset}.yaml"]
    zero3 = preset == "deepspeed_zero3"
    stage0 = cli_model("--config", "configs/smoke/teacher_pretrain.yaml", *strategy)
    stage2 = cli_model("--config", "configs/smoke/restricted_meanflow.yaml", *strategy, *loaded_from("teacher", export))
    blocks = block_elements(load_backbone(export))
    for module in (stage0.backbone, stage0.ema, stage2.teacher, stage2.student, stage2.ema):
        assert is_deferred(module) is zero3
        held = sum(p.numel() for p in module.parameters() if not p.is_meta)
        total = sum(p.numel() for p in module.parameters())
        expected_held = (0 if module in (stage0.backbone, stage0.ema) else total - blocks) if zero3 else total
        assert held == expected_held


ZERO_INIT_REPLAY = """
import os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
import deepspeed
from distributed.zero_init import materialize
from lightning_modules.common import gathered_state_dict
from models.io import defer_init, deferred_loading
from models.mmdit import MMDiT
deepspeed.init_distributed(dist_backend="gloo")
kw = dict(size="tiny", config={"patch_size": [2, 4, 4], "text_dim": 384, "pooled_dim": 384})
torch.manual_seed(0)
eager = MMDiT(**kw)
torch.manual_seed(0)
with deferred_loading():
    deferred = defer_init(MMDiT, **kw)
config = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
with deepspeed.zero.Init(config_dict_or_path=config):
    built, _ = materialize(deferred, partitioned=True)
partitioned = all(hasattr(p, "ds_tensor") and p.data.numel() == 0 for p in built.parameters())
gathered = gathered_state_dict(built)
diff = [k for k, v in eager.state_dict().items() if not torch.equal(gathered[k], v)]
print("RESULT", partitioned, diff)
torch.distributed.destroy_process_group()  # before exit: gloo can abort at interpreter shutdown (pytorch#190489)
"""


def test_random_init_replayed_under_zero_init_equals_the_eager_init() -> None:
    """Stage 0's MMDiT rebuilt under zero.Init (1 process; every parameter partitioned, its data freed) from
    the recorded RNG state has the eager initial weights, adaLN-Zero and zeroed head included: its
    `initialize_weights` writes partitioned children, which `InitGathered` gathers one parameter at a time."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([sys.executable, "-c", ZERO_INIT_REPLAY, str(port)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=240, env={**__import__("os").environ,
                                                                           "OMP_NUM_THREADS": "1"})
    result = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    assert run.returncode == 0 and result, run.stdout[-2000:] + run.stderr[-4000:]
    assert result[0] == "RESULT True []"


def loaded_from(key: str, directory: Path) -> list[str]:
    return [f"--model.init_args.{key}",
            json.dumps({"class_path": "models.io.load_backbone", "init_args": {"directory": str(directory)}})]


def zero_init_probe(out: Path, export: Path, networks: list[str], frozen: str) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": "tests.zero_init_probe.ZeroInitProbe", "init_args": {
        "out_dir": str(out), "export": str(export), "networks": networks, "frozen": frozen}})


def test_zero3_stage2_loads_the_teacher_into_partitions(export: Path, tmp_path: Path) -> None:
    teacher = loaded_from("teacher", export)
    out = tmp_path / "zero_init_probe"
    single = train(tmp_path / "single", "restricted_meanflow", *teacher, "--trainer.accumulate_grad_batches", "2",
                   steps=2)
    run = train(tmp_path / "zero3", "restricted_meanflow", *teacher, "--config",
                "configs/strategy/deepspeed_zero3.yaml",
                zero_init_probe(out, export, ["teacher", "student", "ema"], "teacher"), devices=2, steps=2)

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
        assert rec["frozen_keys_equal"] and rec["frozen_max_diff"] == 0.0
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


def test_zero3_stage3_loads_the_frozen_dit_into_partitions(tmp_path: Path) -> None:
    """Stage 3's frozen DiT from a stage-2 export: partitioned at construction, each rank reading half of
    its block elements, equal to the export; 3 MSE batches then one GAN batch (D and P steps) train."""
    export = tmp_path / "stage2_export"
    save_backbone(random_backbone("tiny", "meanflow", {**SMOKE_TEACHER, "guidance_embed": True, "r_embed": "average"},
                                  seed=0), export)
    out = tmp_path / "zero_init_probe"
    run = train(tmp_path / "zero3", "predictor_gan", *loaded_from("model", export), "--config",
                "configs/strategy/deepspeed_zero3.yaml", zero_init_probe(out, export, ["model"], "model"), devices=2,
                steps=5)
    blocks = block_elements(load_backbone(export))
    for rank in (0, 1):
        rec = json.loads((out / f"rank{rank}.json").read_text())
        held, full = rec["before"]["model"]
        assert held == full - blocks and rec["partitioned"]["model"]
        stats = rec["stats"]["model"]
        assert stats["file_elements"] == blocks and 0.4 * blocks <= stats["read_elements"] <= 0.6 * blocks
        assert rec["frozen_keys_equal"] and rec["frozen_max_diff"] == 0.0
        fresh = probe(run, "fresh", rank)
        assert fresh["global_step"] == 5 and all(torch.isfinite(torch.tensor(loss)) for _, _, loss in fresh["losses"])
    assert load_export("predictor_gan", run / "export")


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
