"""Every YAML in configs/ parses: train configs through train.py's LightningCLI parser (types and
class paths checked, nothing built), evaluation configs through evaluate.py's parser, and the demo
config names only configs that exist."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import evaluate
import train
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def kind(path: Path) -> str:
    keys = set(yaml.safe_load(path.read_text()) or {})
    if {"model", "data", "trainer"} <= keys:
        return "train"
    if "methods" in keys:
        return "evaluate"
    if "stages" in keys:
        return "demo"
    if path.parent.name == "strategy" and keys == {"trainer"}:
        return "strategy"  # a preset added as a second --config (tests/test_strategy_errors.py parses them)
    return "unknown"


def test_configs_found():
    assert len(CONFIGS) >= 10 and all(kind(p) != "unknown" for p in CONFIGS), [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path: Path, tmp_path):
    k = kind(path)
    if k == "train":
        cfg = train.parse_config(["--config", str(path), "--trainer.default_root_dir", str(tmp_path)])
        assert cfg.model.class_path.startswith("lightning_modules.")
        assert cfg.data.class_path == "datamodules.latent_video.LatentVideoDataModule"
        # interpolations follow command-line overrides
        dirs = [c.init_args.dirpath for c in cfg.trainer.callbacks if "dirpath" in c.get("init_args", {})]
        assert dirs and all(d.startswith(str(tmp_path)) for d in dirs)
    elif k == "evaluate":
        cfg = evaluate.build_parser().parse_args(["--config", str(path), "--output_dir", str(tmp_path)])
        assert cfg.methods
        # the teacher rows follow --teacher (how `make demo DEVICE=cuda` points them at its own teacher)
        moved = evaluate.build_parser().parse_args(["--config", str(path), "--teacher", str(tmp_path / "t")])
        for before, after in zip(cfg.methods, moved.methods):
            assert after.model == (str(tmp_path / "t") if before.model == cfg.teacher else before.model)
    elif k == "strategy":  # composes with a stage config (every stage x preset: tests/test_strategy_errors.py)
        cfg = train.parse_config(["--config", str(ROOT / "configs/smoke/cfg_distill.yaml"), "--config", str(path),
                                  "--trainer.default_root_dir", str(tmp_path)])
        assert cfg.trainer.strategy.class_path.split(".")[-1] in ("DDPStrategy", "FSDP2", "DeepSpeedZeRO3")
    else:
        demo = yaml.safe_load(path.read_text())
        for stage in demo["stages"]:  # the demo's overrides are valid for the stage's config
            overrides = [*map(str, stage["overrides"]), *map(str, stage.get("extra", []))]
            cfg = train.parse_config(["--config", str(ROOT / stage["config"]), *overrides,
                                      "--trainer.default_root_dir", str(tmp_path)])
            assert cfg.trainer.max_steps == int(overrides[overrides.index("--trainer.max_steps") + 1])
        assert (ROOT / demo["evaluate"]["config"]).is_file()


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/smoke/teacher_pretrain.yaml").read_text().replace("lr: 1.0e-3", "lrr: 1.0e-3"))
    with pytest.raises(SystemExit):
        train.parse_config(["--config", str(bad)])
