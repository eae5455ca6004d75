"""Stage 0 end to end through train.py: the smoke config runs, and a run killed mid-training and
resumed from its last checkpoint continues exactly like an uninterrupted run."""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

import train
from tests.conftest import ROOT

SMOKE = str(ROOT / "configs/smoke/teacher_pretrain.yaml")


class Recorder(L.Callback):
    """Records (global_step, sample indices, loss) of every training batch; optionally crashes."""

    def __init__(self, crash_after: int | None = None):
        self.rows: list[tuple[int, list[int], float]] = []
        self.crash_after = crash_after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, batch["index"].tolist(), float(outputs["loss"])))
        if self.crash_after is not None and trainer.global_step >= self.crash_after:
            raise RuntimeError("simulated crash")


def run(tmp: Path, data: Path, max_steps: int, recorder: Recorder, ckpt: str | None = None):
    args = ["--config", SMOKE, "--trainer.default_root_dir", str(tmp), "--data.init_args.data_dir", str(data),
            "--trainer.max_steps", str(max_steps), "--trainer.val_check_interval", "100", "--trainer.enable_progress_bar", "false"]
    if ckpt:
        args += ["--ckpt_path", ckpt]
    cli = train.build_cli(args)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    return cli


def csv_losses(root: Path) -> dict[int, float]:
    with open(root / "csv" / "metrics.csv", newline="") as file:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(file) if r.get("train/loss")}


def test_smoke_config_writes_events_checkpoint_and_export(tmp_path):
    metrics = train.main(["--config", SMOKE, "--trainer.default_root_dir", str(tmp_path / "run"),
                          "--data.init_args.data_dir", str(tmp_path / "data")])
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


def test_killed_run_resumes_exactly(tmp_path):
    data = tmp_path / "data"  # 32 training samples, batch 4: 8 batches per epoch
    full = Recorder()
    cli_full = run(tmp_path / "full", data, 14, full)

    crashed = Recorder(crash_after=13)  # the newest checkpoint is at step 10 (every 10 steps)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", data, 14, crashed)
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 10
    resumed = Recorder()
    cli_res = run(tmp_path / "resumed", data, 14, resumed, ckpt=str(last))

    stitched = [row for row in crashed.rows if row[0] <= 10] + resumed.rows
    assert [r[0] for r in stitched] == [r[0] for r in full.rows] == list(range(1, 15))
    assert [r[1] for r in stitched] == [r[1] for r in full.rows]  # same data order, across an epoch boundary
    torch.testing.assert_close(torch.tensor([r[2] for r in stitched]), torch.tensor([r[2] for r in full.rows]))
    assert cli_res.trainer.global_step == cli_full.trainer.global_step == 14
    # the CSV training log survives the resume (Lightning's own CSVLogger deletes the file; the replacement of
    # rows logged after the checkpoint is tested below)
    full_log, resumed_log = csv_losses(tmp_path / "full"), csv_losses(tmp_path / "resumed")
    assert resumed_log.keys() == full_log.keys() == {4, 9}  # logged every 5 steps, both before the resume
    torch.testing.assert_close(torch.tensor(list(resumed_log.values())), torch.tensor(list(full_log.values())))
    opt_full, opt_res = cli_full.trainer.optimizers[0], cli_res.trainer.optimizers[0]
    for p_full, p_res in zip(cli_full.model.backbone.parameters(), cli_res.model.backbone.parameters()):
        torch.testing.assert_close(p_res, p_full)
        torch.testing.assert_close(opt_res.state[p_res]["exp_avg_sq"], opt_full.state[p_full]["exp_avg_sq"])


def test_resume_skip_reaches_sampler_through_ddp_wrapper():
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from datamodules.latent_video import EpochShuffleSampler
    from datamodules.resumable import ResumableDataLoader

    sampler = EpochShuffleSampler(32, seed=0)
    order = list(sampler)
    wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=0, shuffle=False)
    loader = ResumableDataLoader(list(range(32)), batch_size=4, sampler=wrapped)
    loader.load_state_dict({"epoch": 0, "batches_done": 1})
    # rank 0 of 2 gets every other index of our order; it already trained on its first batch of 4
    assert torch.cat(list(loader)).tolist() == order[::2][4:]
    assert torch.cat(list(loader)).tolist() == order[::2]  # the skip applies to the resumed pass only


def test_warm_start_from_export_loads_weights_and_rejects_a_mismatch(tmp_path):
    """`init_from` continues training from an exported backbone (e.g. the shipped teacher): backbone and EMA
    start at the exported weights; an export of a different size is refused by name before training."""
    from lightning_modules.flow_matching import FlowMatchingModule
    from models.io import save_backbone
    from models.mmdit import MMDiT

    torch.manual_seed(0)
    source = MMDiT(size="tiny", config={"patch_size": (1, 4, 4)})
    save_backbone(source, tmp_path / "export")
    torch.manual_seed(1)
    module = FlowMatchingModule(MMDiT(size="tiny", config={"patch_size": (1, 4, 4)}), init_from=str(tmp_path / "export"))
    for name, value in source.state_dict().items():
        assert torch.equal(module.backbone.state_dict()[name], value), name
        assert torch.equal(module.ema.state_dict()[name], value), name
    with pytest.raises(ValueError, match="does not match the model config"):
        FlowMatchingModule(MMDiT(size="tiny", config={"patch_size": (1, 2, 2)}), init_from=str(tmp_path / "export"))


def test_resumable_csv_logger_keeps_earlier_rows_and_widens_the_header(tmp_path):
    from callbacks.csv_log import ResumableCSVLogger

    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="csv", version="")  # a resume from a checkpoint at step 3
    for step in range(4, 8):
        second.log_metrics({"loss": 10.0 + step, "lr": 0.1}, step=step)
    second.save()
    second.log_metrics({"loss": 20.0}, step=8)
    second.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == list(range(9))
    assert [float(r["loss"]) for r in rows] == [0, 1, 2, 3, 14, 15, 16, 17, 20]
    assert [r["lr"] for r in rows] == [""] * 4 + ["0.1"] * 4 + [""]
