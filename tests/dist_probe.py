"""A callback the multi-process preset tests add on the command line
(`--trainer.callbacks+='{"class_path": "tests.dist_probe.Probe", "init_args": {"out_dir": ...}}'`):
each rank writes its per-batch losses, final step and the parameter elements it holds per network; under
manual optimization (stage 3) also every logged `train/` scalar per batch and the discriminator's full weights."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L

import torch
from safetensors.torch import save_file

from distributed.memory import held_elements, local_numel
from lightning_modules.common import gathered_state_dict, reshard

NETWORKS = ("backbone", "teacher", "student", "ema", "model", "predictor", "discriminator")


class Probe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.losses: list[list[float]] = []  # [global_step after the batch, batch_idx, loss]
        self.metrics: list[dict[str, float]] = []  # manual optimization: the `train/` scalars after each batch
        self.grad_norms: list[float | None] = []  # the trained network's gradient norm before clipping, per batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if loss is None:  # manual optimization (stage 3) returns nothing: its logged P loss
            loss = trainer.callback_metrics["train/L_P"]
            self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})
        self.losses.append([trainer.global_step, batch_idx, float(loss)])
        engine = getattr(trainer.strategy, "deepspeed_engine", None)  # DeepSpeed clips, so it has the norm
        norm = engine.get_global_grad_norm() if engine is not None else trainer.callback_metrics.get("train/grad_norm")
        self.grad_norms.append(None if norm is None else float(norm))

    def on_train_end(self, trainer, pl_module) -> None:
        held = {}
        for name in NETWORKS:
            module = getattr(pl_module, name, None)
            if module is not None:
                reshard(module)
                held[name] = held_elements(module)
        tag = "resume" if trainer.ckpt_path else "fresh"
        optimizers = trainer.optimizers
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:  # the ZeRO optimizer wraps the torch one, which holds the fp32 partitions' state
            optimizers = [engine.optimizer.optimizer]
            if hasattr(pl_module, "replicated_opt_d"):  # stage 3: D's optimizer, outside the engine
                optimizers.append(pl_module.replicated_opt_d.optimizer)
        opt_elements = sum(local_numel(v) for opt in optimizers for state in opt.state.values()
                           for v in state.values() if torch.is_tensor(v) and v.ndim > 0)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(pl_module, "discriminator"):  # not exported: its full weights here (gathering is collective)
            state = gathered_state_dict(pl_module.discriminator)
            if trainer.global_rank == 0:
                save_file(state, self.out_dir / f"{tag}_discriminator.safetensors")
        sp_state = getattr(trainer.strategy, "sequence_parallel_state", None)  # --sequence_parallel_size > 1
        layout = None if sp_state is None or sp_state.layout is None else [sp_state.layout.local, sp_state.layout.total]
        (self.out_dir / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(
            {"world": trainer.world_size, "global_step": trainer.global_step, "losses": self.losses, "held": held,
             "optimizer_elements": opt_elements, "metrics": self.metrics, "sequence_parallel_layout": layout,
             "grad_norms": self.grad_norms}))
