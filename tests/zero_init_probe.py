"""A callback tests/test_zero_init.py adds on the command line: each rank records, before
`configure_model`, how much of each large network (`networks`) it holds for real (the rest is on the meta
device); after it, the read counts of `materialize_deferred`; and, once the engine exists, the largest
difference between the gathered frozen network (`frozen`) and its export file."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from safetensors.torch import load_file

from lightning_modules.common import gathered_state_dict


class ZeroInitProbe(L.Callback):
    def __init__(self, out_dir: str, export: str, networks: list[str], frozen: str):
        self.out_dir = Path(out_dir)
        self.export = export
        self.networks = networks
        self.frozen = frozen
        self.record: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:  # runs before configure_model
        self.record["before"] = {name: [sum(p.numel() for p in getattr(pl_module, name).parameters() if not p.is_meta),
                                        sum(p.numel() for p in getattr(pl_module, name).parameters())]
                                 for name in self.networks}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record["stats"] = pl_module.__dict__.get("zero_init_stats", {})
        self.record["partitioned"] = {name: all(hasattr(p, "ds_tensor") for p in getattr(pl_module, name).parameters())
                                      for name in self.networks}
        gathered = gathered_state_dict(getattr(pl_module, self.frozen))  # collective: every rank
        export = load_file(str(Path(self.export) / "model.safetensors"))
        self.record["frozen_keys_equal"] = sorted(gathered) == sorted(export)
        self.record["frozen_max_diff"] = max(float((gathered[k] - export[k]).abs().max()) for k in export)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
