"""One stage-2 step with FSDP2 (Lightning's ModelParallelStrategy, `fully_shard` in `configure_model`)
on 2 CPU processes (gloo) gives the same gradients as one process on the same global batch.

The single-process reference runs the global batch as 2 micro-batches (gradient accumulation). The
modules key their draws by the slice of the global batch (`shard_generator`: rank * accumulation +
micro-batch), so micro-batch k draws the noise, times and guidance of rank k and both runs compute the
same per-sample losses; FSDP averages the ranks' gradients, accumulation averages the micro-batches'."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from distributed.strategies import close_process_group
from lightning_modules.common import full_value
from lightning_modules.meanflow import RestrictedMeanFlowModule
from models.io import load_backbone
from models.mmdit import MMDiT
from tests.conftest import perturb, tiny_text

WORLD = 2
PER_RANK = 2


def build_module() -> RestrictedMeanFlowModule:
    torch.manual_seed(0)
    teacher = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True}), seed=3)
    return RestrictedMeanFlowModule(teacher, r_embed="average", restrict=0.4, equal_fraction=0.25,
                                    lr=1e-3, warmup_steps=1, grad_clip=0.0, ema_decay=0.9)


def global_samples() -> list[dict]:
    """WORLD * PER_RANK samples; rank k holds samples [k * PER_RANK, (k + 1) * PER_RANK)."""
    n = WORLD * PER_RANK
    text = tiny_text(batch=n, seed=7)
    latents = torch.randn(n, 3, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    return [{"latents": latents[i], "text_tokens": text.tokens[i], "text_mask": text.mask[i], "pooled": text.pooled[i]}
            for i in range(n)]


class RecordGrads(L.Callback):
    """Save the student's full (gathered) gradients right before the optimizer step."""

    def __init__(self, path: str):
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = dict(pl_module.student.named_parameters())
        grads = {name: full_value(p.grad).detach().clone() for name, p in params.items()}
        sharded = all(isinstance(p, DTensor) for p in params.values())
        if trainer.is_global_zero:
            torch.save({"grads": grads, "sharded": sharded, "world": trainer.world_size}, self.path)


def trainer_kwargs(grads_path: str) -> dict:
    return dict(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, callbacks=[RecordGrads(grads_path)])


def _worker(rank: int, port: int, grads_path: str, export_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    samples = global_samples()[rank * PER_RANK:(rank + 1) * PER_RANK]
    trainer = L.Trainer(devices=WORLD, num_nodes=1, use_distributed_sampler=False,
                        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
                        **trainer_kwargs(grads_path))
    module = build_module()
    try:
        trainer.fit(module, train_dataloaders=DataLoader(samples, batch_size=PER_RANK, shuffle=False))
        module.export(export_dir)  # gathers the sharded EMA: every rank takes part, rank 0 writes
    finally:
        close_process_group()  # as train.py does: gloo can abort a rank at interpreter shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_process_step_matches_single_process(tmp_path: Path):
    dist_path, single_path = str(tmp_path / "grads_fsdp.pt"), str(tmp_path / "grads_single.pt")
    ctx = mp.spawn(_worker, args=(free_port(), dist_path, str(tmp_path / "export_fsdp")), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise TimeoutError("the 2-process FSDP2 run did not finish in 150 s")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = L.Trainer(devices=1, accumulate_grad_batches=WORLD, **trainer_kwargs(single_path))
        module = build_module()
        trainer.fit(module, train_dataloaders=DataLoader(global_samples(), batch_size=PER_RANK, shuffle=False))
        module.export(tmp_path / "export_single")
    finally:
        torch.set_num_threads(threads)

    fsdp_run, single_run = torch.load(dist_path, weights_only=True), torch.load(single_path, weights_only=True)
    assert fsdp_run["sharded"] and fsdp_run["world"] == WORLD  # FSDP2 DTensor parameters on 2 ranks
    assert not single_run["sharded"] and single_run["world"] == 1
    fsdp, single = fsdp_run["grads"], single_run["grads"]
    assert fsdp.keys() == single.keys() and len(single) > 0
    assert any("time_r_in" in k for k in single)  # the new r embedder is trained too
    for name, grad in single.items():
        assert fsdp[name].shape == grad.shape, name
        torch.testing.assert_close(fsdp[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert sum(g.abs().sum() for g in single.values()) > 0
    # the exported EMA students (after one optimizer step and one EMA update) agree too
    fsdp_export, single_export = load_backbone(tmp_path / "export_fsdp"), load_backbone(tmp_path / "export_single")
    assert fsdp_export.config == single_export.config and fsdp_export.config["r_embed"] == "average"
    for (name, a), (_, b) in zip(fsdp_export.state_dict().items(), single_export.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
