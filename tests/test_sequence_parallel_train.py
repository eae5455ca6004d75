"""`train.py ... --trainer.devices 2 --sequence_parallel_size 2` (one Ulysses group of 2 ranks, no data
parallelism) equals the 1-process run of the same batch: every logged loss and the exported weights (fp32,
relative 1e-4), and so do the gradient norms (AdamW's steps alone would hide a uniform gradient scale). Stage 2
under each strategy preset (DDP also resumed from `--ckpt_path last`; FSDP2 and ZeRO-3 with per-block activation
checkpointing), stages 0, 1 and 3 under DDP; bad settings fail before training. The probe checks the tokens really were split (each rank
held half of the image tokens), which equal numbers alone would not show: two unsplit ranks on the same
samples give the same result too.

The runs use the command form and helpers of tests/test_strategy_presets.py (batch 2 per rank, few steps)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from distributed.sequence_parallel_strategy import check_model
from tests.test_strategy_presets import ROOT, STAGES, assert_same_weights, load_export, probe, train

BATCH = 2
SP = ("--sequence_parallel_size", "2")
STEPS = {"flow_matching": 2, "cfg_distill": 2, "restricted_meanflow": 2, "predictor_gan": 5}  # stage 3: 1 GAN batch
# stage 3's smoke predictor has 1 head; Ulysses needs heads divisible by S (both runs use 2 heads)
EXTRA = {"predictor_gan": ("--model.init_args.predictor",
                           '{"hidden_size": 8, "num_blocks": 2, "mlp_ratio": 2.0, "num_heads": 2, "cache_residual": true}')}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1-process runs of the same batch, one per stage, on demand; `resume=True` continues stage 2's to 3 steps."""
    root, cache = tmp_path_factory.mktemp("sp_single"), {}

    def get(stage: str, resume: bool = False) -> Path:
        key = (stage, resume)
        if key not in cache:
            run = root / ("resumed" if resume else "fresh") / stage
            train(run, stage, *EXTRA.get(stage, ()), steps=STEPS[stage], batch_size=BATCH)
            if resume:
                train(run, stage, steps=STEPS[stage] + 1, resume=True, batch_size=BATCH)
            cache[key] = run
        return cache[key]
    return get


def check_twin(run: Path, reference: Path, stage: str, tags=("fresh",)) -> None:
    for tag in tags:
        ref = [loss for _, _, loss in probe(reference, tag, 0)["losses"]]
        for rank in (0, 1):
            got = probe(run, tag, rank)
            assert got["world"] == 2
            local, total = got["sequence_parallel_layout"]  # the image tokens really were split over the 2 ranks
            assert total > 1 and local == -(-total // 2), (local, total)
            losses = [loss for _, _, loss in got["losses"]]
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-4, atol=1e-6)
            # AdamW's steps hardly change when all gradients are scaled: compare the gradient norms themselves
            norms, ref_norms = got["grad_norms"], probe(reference, tag, 0)["grad_norms"]
            if stage != "predictor_gan":  # stage 3 logs no grad norm
                assert None not in norms and None not in ref_norms
                torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-4, atol=1e-7)
    assert_same_weights(load_export(stage, run / "export"), load_export(stage, reference / "export"))


@pytest.mark.parametrize("preset", ["ddp", "fsdp2", "deepspeed_zero3"])
def test_stage2_sequence_parallel_matches_single_process(preset: str, tmp_path: Path, single) -> None:
    stage, run = "restricted_meanflow", tmp_path / "run"
    strategy = ("--config", f"configs/strategy/{preset}.yaml", *SP)
    if preset != "ddp":  # blocks recomputed in the backward: the SP state is active there too
        strategy += ("--model.init_args.activation_checkpointing", "true")
    train(run, stage, *strategy, devices=2, steps=STEPS[stage], batch_size=BATCH)
    if preset != "ddp":
        check_twin(run, single(stage), stage)
        return
    # DDP: also a resume from `last` under S = 2, against the 1-process run interrupted the same way
    train(run, stage, *strategy, devices=2, steps=STEPS[stage] + 1, resume=True, batch_size=BATCH)
    for rank in (0, 1):
        assert probe(run, "resume", rank)["global_step"] == STEPS[stage] + 1
    check_twin(run, single(stage, resume=True), stage, tags=("fresh", "resume"))


@pytest.mark.parametrize("stage", ["flow_matching", "cfg_distill", "predictor_gan"])
def test_other_stages_sequence_parallel_under_ddp(stage: str, tmp_path: Path, single) -> None:
    run = tmp_path / "run"
    train(run, stage, "--config", "configs/strategy/ddp.yaml", *SP, *EXTRA.get(stage, ()), devices=2,
          steps=STEPS[stage], batch_size=BATCH)
    check_twin(run, single(stage), stage)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_sequence_parallel_size_must_divide_the_processes(tmp_path: Path) -> None:
    res = run_cli("--config", STAGES["restricted_meanflow"][0], "--config", "configs/strategy/ddp.yaml",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--sequence_parallel_size", "3",
                  "--trainer.default_root_dir", str(tmp_path))
    assert res.returncode != 0
    assert "--sequence_parallel_size 3 does not divide the number of processes 2" in res.stderr
    assert "Initializing distributed" not in res.stdout + res.stderr  # refused before any process started


def test_heads_not_divisible_by_sequence_parallel_size_fail_before_training(tmp_path: Path) -> None:
    res = run_cli("--config", STAGES["predictor_gan"][0], "--config", "configs/strategy/ddp.yaml",
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--sequence_parallel_size", "2",
                  "--trainer.default_root_dir", str(tmp_path))
    assert res.returncode != 0
    assert "predictor.blocks.0" in res.stderr and "has 1 attention heads, not divisible by 2" in res.stderr
    assert "Initializing distributed" not in res.stdout + res.stderr


class UnmarkedBackbone(nn.Module):
    """A backbone whose blocks call attention without marking sharded tokens (nothing would split)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def embed(self, x, text, t=None):
        return x

    def transformer(self, tokens, vec, **kwargs):
        return self.proj(tokens), []


def test_a_backbone_without_a_sequence_parallel_path_is_named() -> None:
    holder = nn.ModuleDict({"teacher": UnmarkedBackbone()})
    with pytest.raises(ValueError, match=r"--sequence_parallel_size 2: teacher \(UnmarkedBackbone\) has no "
                                         r"sequence-parallel attention path"):
        check_model(holder, 2)
    check_model(holder, 1)  # S = 1 runs any backbone


def test_planner_divides_activations_and_adds_all_to_all_buffers(capsys) -> None:
    """HunyuanVideo 13B stage 2 at 720p x 129 frames (119,056 tokens) on 8 GPUs: 82 GiB without SP, under 80 GiB
    per GPU with S = 2 (activations halved, the all-to-all buffers added); S must divide the GPUs."""
    from distributed.planner import main as planner_main
    from distributed.planner import plan_stage

    gib = 2.0 ** 30
    args = dict(stage="restricted_meanflow", backbone="hunyuan_video_13b", gpus=8, strategy="deepspeed_zero3",
                seq_tokens=119_056)
    plain, split = plan_stage(**args), plan_stage(**args, sequence_parallel_size=2)
    assert plain["total"] > 80 * gib > split["total"]
    assert split["activations"] == plain["activations"] // 2 and plain["sp_buffers"] == 0 < split["sp_buffers"]
    assert split["params"] == plain["params"] and split["optimizer"] == plain["optimizer"]
    with pytest.raises(ValueError, match="--sequence_parallel_size 3 must be >= 1 and divide --gpus 8"):
        plan_stage(**args, sequence_parallel_size=3)
    assert planner_main(["plan", "--config", "configs/hunyuan_video/restricted_meanflow.yaml", "--backbone",
                         "hunyuan_video_13b", "--gpus", "8", "--strategy", "deepspeed_zero3", "--seq_tokens", "119056",
                         "--sequence_parallel_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "sequence parallel 2" in out and "| restricted_meanflow |" in out and "sp_buffers" in out


def test_ranks_of_a_sequence_parallel_group_read_the_same_samples(monkeypatch) -> None:
    """4 processes, S = 2: ranks (0, 1) and (2, 3) are the data-parallel replicas 0 and 1, for Lightning's samplers
    (`distributed_sampler_kwargs`), the data module's and the stages' per-step draws (`data_parallel`)."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    # set_global_rank also sets the process-wide rank_zero_only.rank: restore it, or every later in-process
    # run of the suite thinks it is rank 3 and its loggers write nothing
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    from lightning.pytorch.strategies import DDPStrategy

    from datamodules.latent_video import EpochShuffleSampler
    from distributed.sequence_parallel import data_parallel
    from distributed.sequence_parallel_strategy import sequence_parallel_class

    orders = []
    for rank in range(4):
        env = LightningEnvironment()
        env.set_world_size(4)
        env.set_global_rank(rank)
        strategy = DDPStrategy(parallel_devices=[torch.device("cpu")] * 4, cluster_environment=env)
        strategy.__class__ = sequence_parallel_class(DDPStrategy)
        strategy.sequence_parallel_size = 2
        kwargs = strategy.distributed_sampler_kwargs
        assert (kwargs["num_replicas"], kwargs["rank"]) == (2, rank // 2)
        trainer = SimpleNamespace(strategy=strategy, world_size=4, global_rank=rank)
        assert data_parallel(trainer) == (2, rank // 2)
        orders.append(list(EpochShuffleSampler(16, seed=0, num_replicas=2, rank=data_parallel(trainer)[1])))
    assert orders[0] == orders[1] and orders[2] == orders[3] and not set(orders[0]) & set(orders[2])
