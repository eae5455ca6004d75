"""Train any stage: `python train.py --config configs/<stage>.yaml [--a.b value ...] [--ckpt_path last]`.

Model and data are chosen in YAML by class_path/init_args (LightningCLI subclass mode). Configs
are parsed with omegaconf interpolation resolved after command-line overrides.
"""
from __future__ import annotations

import sys

from callbacks.run_lock import RunLock, is_launch_rank_zero, refuse_if_locked

if __name__ == "__main__":  # before the slow imports below: a run into a locked root stops within a second
    refuse_if_locked(sys.argv[1:])

import re  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
from jsonargparse import set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from callbacks.checkpointing import ExportOnTrainEnd, checkpoint_problem, find_resumable  # noqa: E402
from callbacks.divergence import DivergenceGuard  # noqa: E402
from distributed import sequence_parallel_strategy  # noqa: E402
from distributed.zero_init import builds_partitioned  # noqa: E402
from models.io import check_config_files, defer_init, deferred_loading  # noqa: E402
from models.mmdit import MMDiT  # noqa: E402

# argparse (Python < 3.13) takes `-1e-3` for an option name because its negative-number pattern has no
# exponent, so `--model.init_args.lr -1e-3` failed; this pattern (ints, decimals, exponents) fixes that.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class DisCaCLI(LightningCLI):
    parse_only = False
    run_lock: RunLock | None = None

    def before_instantiate_classes(self) -> None:
        if not self.parse_only and is_launch_rank_zero():  # one run per root directory (callbacks/run_lock.py)
            self.run_lock = RunLock(self.config.trainer.default_root_dir or Path.cwd()).acquire()
        # seed before the models are built, so that their initialisation is reproducible too
        if not self.parse_only:
            L.seed_everything(self.config.seed, workers=True)
        # a backbone built from scratch is deferred too under ZeRO-3 (models.io.defer_init)
        self.parser.add_instantiator(defer_init, MMDiT, subclasses=True)

    def instantiate_classes(self) -> None:
        """Under DeepSpeed ZeRO-3 the stage is built deferred: `load_backbone` leaves the blocks on the meta
        device, a new MMDiT all of its parameters, and `configure_model` builds them into the partitions
        (distributed/zero_init.py)."""
        if not self.parse_only:  # parse_config(): validate types and class paths, build nothing
            with deferred_loading(builds_partitioned(self.config.trainer.strategy)):
                super().instantiate_classes()

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own switch for "is this a value?"
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Every stage runs with a `DivergenceGuard`: the configured one, else a default one. It goes
        first, so it stops a diverged step before ModelCheckpoint/ExportOnTrainEnd save it."""
        trainer = super().instantiate_trainer(**kwargs)
        guards = [c for c in trainer.callbacks if isinstance(c, DivergenceGuard)]
        for guard in guards:
            trainer.callbacks.remove(guard)
        trainer.callbacks.insert(0, guards[0] if guards else DivergenceGuard())
        sequence_parallel_strategy.enable(trainer, self.model, self.config.sequence_parallel_size)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this Lightning checkpoint ('last' = the newest last.ckpt)")
        parser.add_argument("--seed", type=int, default=0, help="global seed (torch, numpy, python)")
        parser.add_argument("--sequence_parallel_size", type=int, default=1,
                            help="Ulysses sequence parallelism: S ranks share each sample's video tokens (S divides "
                                 "the number of processes; data parallel over the rest; any strategy preset)")
        parser.add_argument("--pipeline", type=str | None, default=None,
                            help="local diffusers pipeline directory (configs/hunyuan_video, configs/wan: ${pipeline})")


def build_cli(args: list[str] | None = None, parse_only: bool = False) -> DisCaCLI:
    check_config_files(sys.argv[1:] if args is None else args)  # a YAML syntax error names its file
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


def resolve_ckpt_path(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """`last` -> the newest complete `last*.ckpt` of the run's checkpoint directories. Lightning only warns
    and trains from scratch when there is none; resuming nothing is an error here. An incomplete sharded
    checkpoint directory (a kill while it was written) is passed over, saying so, for the newest complete
    one beside it (callbacks/checkpointing.py: find_resumable)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    elif Path(ckpt_path).is_dir() and checkpoint_problem(ckpt_path) is not None:
        dirs = [Path(ckpt_path).parent]
    else:
        return ckpt_path
    found, notes = find_resumable(dirs)
    if found is None:
        where = [str(d) for d in dirs] or "any checkpoint directory"
        exports = [cb.dirpath for cb in trainer.callbacks if isinstance(cb, ExportOnTrainEnd)]
        start = (f"delete the export {exports[0]} of the interrupted run (or set another --trainer.default_root_dir) "
                 "and drop --ckpt_path" if exports and Path(exports[0]).exists() else "drop --ckpt_path")
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no last*.ckpt in {where} is complete"
                                + (f" ({'; '.join(notes)})" if notes else "") + f"; nothing to resume. To start a new "
                                f"run, {start}.")
    if notes:
        print(f"--ckpt_path {ckpt_path}: a checkpoint write was interrupted ({'; '.join(notes)}); resuming from "
              f"{found}, the newest complete checkpoint", file=sys.stderr, flush=True)
    return str(found)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse, fit, and return the final logged metrics (so tests can call it)."""
    cli = build_cli(args)
    try:
        ckpt_path = resolve_ckpt_path(cli.trainer, cli.config.ckpt_path)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    finally:  # fit ended, however it ended: free the root directory (a crash before fit: RunLock's atexit)
        if cli.run_lock is not None:
            cli.run_lock.release()
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


if __name__ == "__main__":
    main()
    from distributed.strategies import close_process_group  # here, not at start-up (it sets up DeepSpeed's env)

    close_process_group()  # after a finished run only: a failed rank exits non-zero at once, never waiting on peers
