"""Strategies the presets in `configs/strategy/` name, and the stage <-> strategy checks.

`DeepSpeedZeRO3` is Lightning's `DeepSpeedStrategy` made usable on CPU (gloo, DeepSpeed's CPU
accelerator) so the same preset runs in CI on 2 processes and on GPUs: Lightning refuses any
non-CUDA accelerator in `setup_environment` (SPEC §9.1); on CPU this class sets up the environment as
DDP does instead, and hands DeepSpeed the local rank as its device rank. Everything else (engine, ZeRO
partitioning, per-rank checkpoint directories, bf16 config from `trainer.precision`) is Lightning's.
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # must precede the first `import deepspeed` (it picks its accelerator once)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.pytorch.accelerators import CUDAAccelerator  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, Strategy  # noqa: E402

from callbacks.checkpointing import AtomicShardedSave  # noqa: E402


class DeepSpeedZeRO3(AtomicShardedSave, DeepSpeedStrategy):
    """`DeepSpeedStrategy(config=...)` that also runs on CPU. The ZeRO config lives in the preset
    (`configs/strategy/deepspeed_zero3.yaml`), not here. Its checkpoint directory is written atomically
    (`AtomicShardedSave`, callbacks/checkpointing.py)."""

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        if os.environ.get("DS_ACCELERATOR", "cpu") != "cpu":
            raise RuntimeError(f"DeepSpeed on a CPU accelerator needs DS_ACCELERATOR=cpu before deepspeed is imported, "
                               f"got DS_ACCELERATOR={os.environ['DS_ACCELERATOR']!r}")
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy's parent does, minus the CUDA check

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_distributed()
        # DeepSpeedStrategy.setup_distributed minus its CUDA device-index check (CPU devices have no index)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """Lightning's engine set-up, with two changes: on CPU DeepSpeed's device_rank is the local rank (a CPU
        device has no index); submodules named by the LightningModule's `modules_outside_zero()` are detached
        before the engine is built, so it neither partitions nor hooks nor steps them, and stay plain attributes
        of the module afterwards (ZeRO-3 walks every registered parameter at each step): the LightningModule
        checkpoints them itself. With --sequence_parallel_size S > 1 DeepSpeed's sequence-parallel groups go in
        as `mpu` (distributed/sequence_parallel_strategy.py), which Lightning's own call never passes."""
        kept = {name: model._modules.pop(name) for name in getattr(model, "modules_outside_zero", tuple)()}
        mpu = getattr(self, "sequence_parallel_mpu", None)
        try:
            if isinstance(self.accelerator, CUDAAccelerator) and mpu is None:
                return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
            import deepspeed

            cuda = isinstance(self.accelerator, CUDAAccelerator)
            engine, ds_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.root_device.index if cuda else self.local_rank),
                config=self.config, model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False, mpu=mpu)
            return engine, ds_optimizer
        finally:
            for name, module in kept.items():
                object.__setattr__(model, name, module.to(self.root_device))



class FSDP2(AtomicShardedSave, ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (FSDP2 `fully_shard` in `configure_model`, CPU and GPU) with
    every rank data-parallel by default: its own 'auto' puts the processes of a node on a tensor-parallel
    axis, which these stages do not use. Its distributed checkpoint directory is written atomically
    (`AtomicShardedSave`, callbacks/checkpointing.py)."""

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1, **kwargs):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs)

    def saves_directory(self) -> bool:
        return self._save_distributed_checkpoint

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes // self._tensor_parallel_size
        super().setup_environment()


def strategy_kind(strategy: Strategy | None) -> str:
    """'deepspeed' | 'fsdp2' | 'ddp' | 'single' (what the stage modules need to know)."""
    if isinstance(strategy, DeepSpeedStrategy):
        return "deepspeed"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    return "single"


def zero_stage(strategy: Strategy | None) -> int:
    """The ZeRO stage of a DeepSpeed strategy (0 for anything else)."""
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int(((strategy.config or {}).get("zero_optimization") or {}).get("stage", 0))


def check_zero_config_for_jvp(strategy: Strategy | None, needs_jvp: bool) -> None:
    """ZeRO-3 replaces `torch.nn.functional.linear` process-wide by an autograd Function without a
    forward-mode rule when `memory_efficient_linear` is true (DeepSpeed's default), so stage 2's JVP
    cannot run under it (SPEC §9.1). Fail before training, naming the setting and the fix."""
    if not needs_jvp or zero_stage(strategy) != 3:
        return
    zero = (strategy.config or {}).get("zero_optimization") or {}
    if zero.get("memory_efficient_linear", True):
        raise ValueError(
            "stage 2's JVP (forward-mode AD) does not run through DeepSpeed's memory-efficient linear: set "
            "zero_optimization.memory_efficient_linear: false in the DeepSpeed config "
            "(configs/strategy/deepspeed_zero3.yaml does), or use jvp_method: finite_difference")


def check_stage_host(stage: str, strategy: Strategy | None, backbone=None) -> None:
    """Fail before training when the strategy preset cannot run `stage` with this backbone, naming the
    preset and the fix. Stage 3's predictor calls the frozen DiT's `embed` / `condition` / `head` directly:
    under FSDP2 these are gathered only for backbones sharded per block with their root methods
    registered (`lightning_modules.common.fully_shard_backbone`), i.e. those with `shard_blocks()`: the
    built-in MMDiT and the HunyuanVideo and Wan adapters; any other backbone is refused."""
    kind = strategy_kind(strategy)
    if stage == "predictor_gan" and kind == "fsdp2" and not hasattr(backbone, "shard_blocks"):
        raise ValueError(f"strategy {type(strategy).__name__} (configs/strategy/fsdp2.yaml) cannot host stage 3 with "
                         f"the {type(backbone).__name__} backbone: it has no per-block sharding units (shard_blocks), "
                         f"so its embedders and head are not gathered for the predictor; use "
                         f"configs/strategy/deepspeed_zero3.yaml or ddp.yaml")


def close_process_group() -> None:
    """Close the (gloo/NCCL) process group a multi-process Lightning run opened; a no-op in one process.
    Left to interpreter shutdown, gloo can abort a rank ("terminate called without an active exception",
    pytorch/pytorch#190489) after the run has finished and saved. Call it after a finished run only."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
