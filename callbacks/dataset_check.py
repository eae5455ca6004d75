"""Refuse, before the first step, a dataset whose text condition was made for another backbone.

A HunyuanVideo stage needs prompts encoded by its own pipeline's LLaMA + CLIP, a Wan stage its UMT5;
a MiniLM dataset (or one of the other family) would otherwise fail deep inside the first forward,
or silently train on the wrong embedding space when the widths happen to agree.
"""
from __future__ import annotations

import lightning as L

from datamodules.video_source import check_dataset_matches

BACKBONE_ATTRIBUTES = ("teacher", "model", "backbone")  # where the stage modules keep their frozen/base model


class DatasetMatchesBackbone(L.Callback):
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        backbone = next((getattr(pl_module, a) for a in BACKBONE_ATTRIBUTES if hasattr(pl_module, a)), None)
        if not self.enabled or dm is None or backbone is None or not hasattr(dm, "metadata"):
            return
        check_dataset_matches(dm.metadata, backbone.config, dm.data_dir)
