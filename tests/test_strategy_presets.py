"""Every stage's smoke config under the strategy presets on 2 CPU processes (gloo), in the command form
users run: `train.py --config configs/smoke/<stage>.yaml --config configs/strategy/<preset>.yaml
--trainer.accelerator cpu --trainer.devices 2`. One 2-process run (then one `--ckpt_path last` resume)
per stage x preset serves all of its checks:

- it trains, checkpoints, and resumes to the same step;
- its export is an ordinary safetensors directory that `load_backbone` / `load_predictor` loads;
- its per-batch losses equal the 1-process run of the same global batch (stages 0-2: 2 micro-batches of 1,
  gradient accumulation; `shard_generator` makes micro-batch k draw what rank k draws; stage 3, whose manual
  optimization does not accumulate: one batch of 2, `sample_generators` keying each sample's draws by its
  position in the global batch, every logged `train/` scalar the mean of the ranks'), and so do the exported
  weights (stage 3: the predictor and the discriminator): the sharded math (FSDP2 / ZeRO-3 gathering, the
  stage-2 forward-AD JVP through sharded blocks, the EMA on shards, clipping, D's and P's gradient averaging)
  is the unsharded math;
- every large network is partitioned: each rank holds about half of its parameter elements, and the
  memory planner's per-rank parameter and optimizer elements are what the rank holds;
- the 2-process runs checkpoint activations per block (`activation_checkpointing: true`), the 1-process
  reference does not: recomputation changes no number.
bf16-mixed runs (stage 2, both presets) train with finite losses, float32 timesteps, and export.

Batch size 1 per rank so that the distributed sampler's interleaving (rank k gets samples k, k+2, ...)
is the 1-process order of the micro-batches."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
# stage 3: D's Adam epsilon well above the float32 rounding of its gradient (`eps_d`), so that D's first step
# is a smooth function of the gradient and the twin's D weights can be compared at rtol 1e-4
STAGE_ARGS = {"predictor_gan": ("--model.init_args.eps_d", "1e-2")}
FROZEN = {"flow_matching": (), "cfg_distill": ("teacher",), "restricted_meanflow": ("teacher",),
          "predictor_gan": ("model",)}
TIMEOUT = 240


def train(tmp: Path, stage: str, *extra: str, devices: int = 1, resume: bool = False, steps: int,
          batch_size: int = 1) -> Path:
    config = STAGES[stage][0]
    probe = json.dumps({"class_path": "tests.dist_probe.Probe", "init_args": {"out_dir": str(tmp / "probe")}})
    args = [sys.executable, "train.py", "--config", config, *extra, *STAGE_ARGS.get(stage, ()),
            "--trainer.accelerator", "cpu",
            "--trainer.devices", str(devices), "--trainer.default_root_dir", str(tmp),
            "--data.init_args.data_dir", str(tmp.parent / "data"), "--data.init_args.batch_size", str(batch_size),
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
    """1-process runs of the same global batch (2 micro-batches of 1; stage 3: one batch of 2), one per stage,
    built on demand, with the same interruption: a run that reached max_steps counts its epoch as finished,
    so its resume starts the next epoch's order (Lightning's semantics, identical for 1 and 2 processes)."""
    root, cache = tmp_path_factory.mktemp("single"), {}

    def get(stage: str) -> Path:
        if stage not in cache:
            manual = stage == "predictor_gan"
            acc, size = ((), 2) if manual else (("--trainer.accumulate_grad_batches", "2"), 1)
            train(root / stage, stage, *acc, steps=STAGES[stage][1], batch_size=size)
            cache[stage] = train(root / stage, stage, *acc, steps=STAGES[stage][2], resume=True, batch_size=size)
        return cache[stage]
    return get


CASES = [(stage, preset) for stage in STAGES for preset in ("fsdp2", "deepspeed_zero3", "ddp")]


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
            if preset == "ddp" or (name, preset) == ("discriminator", "deepspeed_zero3"):  # replicated by design
                assert local == full
                continue
            assert 0.4 * full <= local <= 0.6 * full, (name, local, full)
        assert set(FROZEN[stage]) <= set(fresh["held"])
    check_planner(stage, preset, probe(run, "resume", 0))  # after the resume every optimizer has stepped
    export = run / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    sharded_weights = load_export(stage, export)

    single = reference(stage)
    if stage == "predictor_gan":
        check_stage3_twin(run, single)
    else:  # micro-batch 2s + k; Lightning reports an accumulated micro-batch's loss divided by the accumulation (2)
        ref = [2 * loss for tag in ("fresh", "resume") for _, _, loss in probe(single, tag, 0)["losses"]]
        for rank in (0, 1):
            losses = [loss for _, _, loss in probe(run, "fresh", rank)["losses"] + probe(run, "resume", rank)["losses"]]
            assert len(losses) == total
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref[rank::2]), rtol=1e-4, atol=1e-6)
    assert_same_weights(sharded_weights, load_export(stage, single / "export"))


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def check_stage3_twin(run: Path, single: Path) -> None:
    """Stage 3 against its 1-process twin (one batch of 2 = the ranks' batches of 1): per batch, the same
    step and every logged `train/` scalar (L_P, mse, L_D, g_loss, D's logits and accuracy: means over the
    batch) the mean of the two ranks'; the discriminator (not exported) the same weights, after the
    twin's D step moved them."""
    for tag in ("fresh", "resume"):
        ref = probe(single, tag, 0)
        ranks = [probe(run, tag, rank) for rank in (0, 1)]
        assert [s for s, _, _ in ref["losses"]] == [s for s, _, _ in ranks[0]["losses"]]
        assert len(ref["metrics"]) == len(ranks[0]["metrics"]) == len(ranks[1]["metrics"]) > 0
        for j, expected in enumerate(ref["metrics"]):
            assert expected.keys() == ranks[0]["metrics"][j].keys() == ranks[1]["metrics"][j].keys()
            for key, value in expected.items():
                mean = (ranks[0]["metrics"][j][key] + ranks[1]["metrics"][j][key]) / 2
                torch.testing.assert_close(mean, value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{tag} {j} {key}: {m}")
    assert "train/L_D" in ref["metrics"][-1]  # the twin's last batch is a GAN batch
    d = {tag: load_file(single / "probe" / f"{tag}_discriminator.safetensors") for tag in ("fresh", "resume")}
    assert any(not torch.equal(d["fresh"][k], v) for k, v in d["resume"].items() if k.endswith("original"))
    assert_same_weights(load_file(run / "probe" / "resume_discriminator.safetensors"), d["resume"])


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("preset", ["fsdp2", "deepspeed_zero3"])
def test_two_process_bf16(stage: str, preset: str, tmp_path: Path, reference) -> None:
    """bf16-mixed (timesteps stay float32) with per-block activation checkpointing, every stage (stage 3 through
    its first GAN batch), both presets: finite losses, the first within bf16 rounding of the float32 1-process
    twin's, and an export that loads."""
    steps = STAGES[stage][2] if stage == "predictor_gan" else STAGES[stage][1]
    run = train(tmp_path / "run", stage, "--config", f"configs/strategy/{preset}.yaml", "--trainer.precision",
                "bf16-mixed", "--model.init_args.activation_checkpointing", "true", devices=2, steps=steps)
    single = probe(reference(stage), "fresh", 0)["losses"]
    firsts = [probe(run, "fresh", rank)["losses"][0][2] for rank in (0, 1)]
    expected = ([single[0][2]] * 2 if stage == "predictor_gan"  # the twin's one batch of 2: the ranks' mean
                else [2 * loss for _, _, loss in single[:2]])   # micro-batches 0 and 1 (accumulation halves them)
    for rank in (0, 1):
        losses = [loss for _, _, loss in probe(run, "fresh", rank)["losses"]]
        assert losses and all(math.isfinite(x) and x >= 0 for x in losses)
    got = [sum(firsts) / 2] * 2 if stage == "predictor_gan" else firsts
    for value, ref in zip(got, expected):
        assert abs(value - ref) <= 0.05 * abs(ref) + 1e-3, (value, ref)  # bf16 rounding only
    assert load_export(stage, run / "export")
