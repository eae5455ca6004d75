"""Train any stage: `python train.py --config configs/<stage>.yaml [--a.b value ...] [--ckpt_path last]`.

Model and data are chosen in YAML by class_path/init_args (LightningCLI subclass mode). Configs
are parsed with omegaconf interpolation resolved after command-line overrides.
"""
from __future__ import annotations

from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI



class DisCaCLI(LightningCLI):
    parse_only = False

    def before_instantiate_classes(self) -> None:
        # seed before the models are built, so that their initialisation is reproducible too
        if not self.parse_only:
            L.seed_everything(self.config.seed, workers=True)

    def instantiate_classes(self) -> None:
        if not self.parse_only:  # parse_config(): validate types and class paths, build nothing
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this Lightning checkpoint ('last' = the newest last.ckpt)")
        parser.add_argument("--seed", type=int, default=0, help="global seed (torch, numpy, python)")
        parser.add_argument("--pipeline", type=str | None, default=None,
                            help="local diffusers pipeline directory (configs/hunyuan_video, configs/wan: ${pipeline})")


def build_cli(args: list[str] | None = None, parse_only: bool = False) -> DisCaCLI:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cls = type("ParseOnlyCLI", (DisCaCLI,), {"parse_only": True}) if parse_only else DisCaCLI
    return cls(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        run=False, args=args, seed_everything_default=False,
        parser_kwargs={"parser_mode": "omegaconf+", "default_env": False},
        trainer_defaults={"plugins": [{"class_path": "callbacks.checkpointing.SafeCheckpointIO"}]},
        save_config_kwargs={"overwrite": True},
    )


def parse_config(args: list[str]):
    """The fully resolved, type-checked config namespace, without building models or loading weights."""
    return build_cli(args, parse_only=True).config


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, fit, and return the final logged metrics (so tests can call it)."""
    cli = build_cli(args)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.ckpt_path)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
