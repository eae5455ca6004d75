"""`python train.py --model.help <Module>` documents every init argument of every stage module (issue 13
item 7): LightningCLI/jsonargparse take the descriptions from the Google-style "Args:" sections."""
from __future__ import annotations

import importlib
import inspect
import re

import pytest

import train

STAGE_MODULES = ["lightning_modules.flow_matching.FlowMatchingModule",
                 "lightning_modules.cfg_distill.CFGDistillModule",
                 "lightning_modules.meanflow.RestrictedMeanFlowModule",
                 "lightning_modules.predictor_gan.PredictorGANModule"]


def help_text(capsys, option: str, class_path: str) -> str:
    with pytest.raises(SystemExit):
        train.build_cli([option, class_path])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("class_path", STAGE_MODULES + ["datamodules.latent_video.LatentVideoDataModule"])
def test_every_init_argument_has_a_description(capsys, class_path):
    import docstring_parser

    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__init__.__doc__).params}
    assert sorted(documented) == sorted(params), f"{class_path}: undocumented {sorted(set(params) - set(documented))}"
    option = "--data.help" if "datamodules" in class_path else "--model.help"
    text = help_text(capsys, option, class_path)
    prefix = option.split(".")[0]
    for param, description in documented.items():
        words = " ".join(description.split()[:3])
        assert re.search(rf"{re.escape(prefix)}\.{param} \S+ {re.escape(words)}", text), (param, words)


def test_documented_stage_commands_build_every_export_evaluate_yaml_needs():
    """Issue 13 item 8: after the stage commands of docs/stages.md ("Running the stages by hand"),
    `evaluate.py --config configs/evaluate.yaml` finds every export and calibration file it needs (it used to stop
    at once on four missing runs)."""
    from omegaconf import OmegaConf

    import evaluate
    from tests.conftest import ROOT

    stages = (ROOT / "docs" / "stages.md").read_text()
    quick = stages.split("## Running the stages by hand")[1].split("\n## ")[0].replace("\\\n", " ")
    produced = set()
    for config in re.findall(r"^python train\.py --config (\S+)", quick, flags=re.M):
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / config), resolve=True)
        produced |= {c["init_args"]["dirpath"] for c in cfg["trainer"]["callbacks"]
                     if c["class_path"].endswith("ExportOnTrainEnd")}
    for line in re.findall(r"^python calibrate_teacache\.py .*$", quick, flags=re.M):
        args = line.split()
        model, steps, mode = (args[args.index(k) + 1] for k in ("--model_dir", "--num_steps", "--mode"))
        produced.add(f"{model}/teacache_{mode}_{steps}.json")
    parser = evaluate.build_parser()
    init = parser.instantiate(parser.parse_args(["--config", str(ROOT / "configs/evaluate.yaml")]))
    needed = set()
    for spec in init["methods"]:
        needed |= {p for p in (spec.model, spec.predictor, spec.cache_kwargs.get("calibration")) if p}
    needed = {p for p in needed if p.startswith("outputs/")}
    assert needed and needed <= produced, sorted(needed - produced)
