"""Every YAML in configs/ parses: train configs through train.py's LightningCLI parser (types and
class paths checked, nothing built), evaluation configs through evaluate.py's parser, and the demo
config names only configs that exist."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import evaluate
import train
from evaluation import claims
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
    if keys == {"claims"}:
        return "claims"  # the paper's claims for evaluation/claims.py (methods checked in tests/test_claims.py)
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
    elif k == "claims":
        assert claims.load_config(path)
    elif k == "strategy":  # composes with a stage config (every stage x preset: tests/test_strategy_errors.py)
        cfg = train.parse_config(["--config", str(ROOT / "configs/smoke/cfg_distill.yaml"), "--config", str(path),
                                  "--trainer.default_root_dir", str(tmp_path)])
        assert cfg.trainer.strategy.class_path.split(".")[-1] in ("DDPStrategy", "FSDP2", "DeepSpeedZeRO3")
    else:  # a pipeline of scripts/demo.py (make demo, make reproduce), interpolations resolved
        demo = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        for stage in demo["stages"]:  # the pipeline's overrides are valid for the stage's config
            overrides = [*map(str, stage["overrides"]), *map(str, stage.get("extra", []))]
            cfg = train.parse_config(["--config", str(ROOT / stage["config"]), *overrides,
                                      "--trainer.default_root_dir", str(tmp_path)])
            own = yaml.safe_load((ROOT / stage["config"]).read_text())["trainer"]["max_steps"]
            given = overrides[overrides.index("--trainer.max_steps") + 1] if "--trainer.max_steps" in overrides else own
            assert cfg.trainer.max_steps == int(given)
        for ev in [demo["evaluate"], *demo.get("extra_evaluations", [])]:
            cfg = evaluate.build_parser().parse_args(["--config", str(ROOT / ev["config"]), *map(str, ev["overrides"])])
            assert cfg.methods


def test_reproduce_runs_every_stage_at_its_own_budget_on_its_own_outputs():
    """make reproduce: no step overrides, and every stage reads its inputs from the run's own root."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/reproduce.yaml"), resolve=True)
    root = cfg["output_root"]
    for stage in cfg["stages"]:
        overrides = [str(a) for a in stage["overrides"]]
        assert "--trainer.max_steps" not in overrides and "--trainer.max_time" not in overrides, stage["name"]
        dirs = [overrides[i + 1] for i, a in enumerate(overrides) if a.endswith(".init_args.directory")]
        assert all(d.startswith(root + "/") for d in dirs), stage["name"]
        assert stage["name"] == "cfg_distill" or dirs, stage["name"]
    ev = evaluate.build_parser().parse_args(["--config", str(ROOT / cfg["evaluate"]["config"]),
                                             *map(str, cfg["evaluate"]["overrides"])])
    assert ev.num_videos >= 512 and len(ev.seeds) >= 2
    assert all(m.model.startswith(root) or m.model == ev.teacher for m in ev.methods)


def test_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/smoke/teacher_pretrain.yaml").read_text().replace("lr: 1.0e-3", "lrr: 1.0e-3"))
    with pytest.raises(SystemExit):
        train.parse_config(["--config", str(bad)])
