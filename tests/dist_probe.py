"""A callback the multi-process preset tests add on the command line
(`--trainer.callbacks+='{"class_path": "tests.dist_probe.Probe", "init_args": {"out_dir": ...}}'`):
each rank writes its per-batch losses, final step and the parameter elements it holds per network."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L

from distributed.memory import held_elements
from lightning_modules.common import reshard

NETWORKS = ("backbone", "teacher", "student", "ema", "model", "predictor", "discriminator")


class Probe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.losses: list[list[float]] = []  # [global_step after the batch, batch_idx, loss]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else trainer.callback_metrics.get("train/L_P")
        self.losses.append([trainer.global_step, batch_idx, float(loss)])

    def on_train_end(self, trainer, pl_module) -> None:
        held = {}
        for name in NETWORKS:
            module = getattr(pl_module, name, None)
            if module is not None:
                reshard(module)
                held[name] = held_elements(module)
        tag = "resume" if trainer.ckpt_path else "fresh"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{tag}_rank{trainer.global_rank}.json").write_text(json.dumps(
            {"world": trainer.world_size, "global_step": trainer.global_step, "losses": self.losses, "held": held}))
