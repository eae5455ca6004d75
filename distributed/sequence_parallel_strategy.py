"""`--sequence_parallel_size S` for every strategy preset (train.py): Ulysses groups of S ranks, data parallel
over world / S (distributed/sequence_parallel.py has the collective and the gradient argument).

`enable(trainer, S)` checks the setting and the model before anything is built on the ranks, then gives the
configured strategy (DDP, `FSDP2`, `DeepSpeedZeRO3` of distributed/strategies.py, or Lightning's own DDP / ModelParallel
/ DeepSpeed classes) the behaviour of `sequence_parallel_class` below:
- creates the groups once the process group exists: a (dp, sp) `DeviceMesh` (torch's `init_device_mesh`); FSDP2
  shards over that same mesh flattened to one `data_parallel` dimension (all ranks); DeepSpeed gets its own
  sequence-parallel groups (`deepspeed.runtime.sequence_parallel.parallel_state_sp`), passed to
  `deepspeed.initialize(mpu=...)` by `DeepSpeedZeRO3`, so ZeRO-3 partitions and reduces over all ranks;
- gives every rank of an SP group the same samples (`distributed_sampler_kwargs`; the stages key their noise by
  `sequence_parallel.data_parallel`, so the S ranks draw the same noise, times and guidance);
- activates the SP state around the training / validation steps and the backward (activation checkpointing
  recomputes blocks there), so samplers and callbacks outside these run unsplit.
DDP, FSDP2 and ZeRO-3's reduce-scatter (its default; `check_deepspeed_reduce_scatter`) average gradients over all
ranks, which is the data-parallel average (every rank of an SP group backpropagates the whole, identical loss).
"""
from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info

from distributed import sequence_parallel as sp

SPLITTABLE = "models.mmdit.MMDiT, models.hunyuan_video.HunyuanVideoBackbone, models.wan.WanBackbone"


def sequence_parallel_class(cls: type) -> type:
    """`cls` (a Lightning strategy class) with the sequence-parallel behaviour of the module docstring. A direct
    subclass, built here, so that `enable` can switch an existing strategy object to it (`__class__` assignment
    needs the same instance layout, which a mixin base in front of the strategies' own mixins breaks)."""
    if getattr(cls, "is_sequence_parallel", False):
        return cls

    def setup_environment(self) -> None:
        super(new, self).setup_environment()
        s = self.sequence_parallel_size
        sp.check_size(s, self.world_size)
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        if isinstance(self, DeepSpeedStrategy):
            from deepspeed.runtime.sequence_parallel import parallel_state_sp

            check_deepspeed_reduce_scatter(self.config, s)

            parallel_state_sp.initialize_sequence_parallel(s)
            self.sequence_parallel_mpu = parallel_state_sp
            group = parallel_state_sp.get_sequence_parallel_group()
        else:
            mesh = sp.groups(s, self.root_device.type)
            if isinstance(self, ModelParallelStrategy):  # one mesh: FSDP2 shards over (dp, sp) flattened
                mesh["dp", "sp"]._flatten("data_parallel")
                self._device_mesh = mesh
                self.lightning_module._device_mesh = mesh
            group = mesh["sp"].get_group()
        self.sequence_parallel_state = sp.SequenceParallel(group)
        rank_zero_info(f"sequence parallel: {self.world_size // s} data-parallel group(s) of {s} ranks (Ulysses)")

    def distributed_sampler_kwargs(self) -> dict:
        s = self.sequence_parallel_size
        return {**super(new, self).distributed_sampler_kwargs, "num_replicas": self.world_size // s,
                "rank": self.global_rank // s}

    def training_step(self, *args, **kwargs):
        with sp.activate(self.sequence_parallel_state):
            return super(new, self).training_step(*args, **kwargs)

    def validation_step(self, *args, **kwargs):
        with sp.activate(self.sequence_parallel_state):
            return super(new, self).validation_step(*args, **kwargs)

    def backward(self, closure_loss, *args, **kwargs):
        with sp.activate(self.sequence_parallel_state):
            return super(new, self).backward(closure_loss, *args, **kwargs)

    new = type(f"SequenceParallel{cls.__name__}", (cls,), {
        "__module__": __name__, "__doc__": cls.__doc__, "is_sequence_parallel": True,
        "sequence_parallel_size": 1, "sequence_parallel_state": None, "sequence_parallel_mpu": None,
        "setup_environment": setup_environment, "distributed_sampler_kwargs": property(distributed_sampler_kwargs),
        "training_step": training_step, "validation_step": validation_step, "backward": backward})
    return new


def check_deepspeed_reduce_scatter(config: dict | None, s: int) -> None:
    """ZeRO-3 with a sequence-parallel `mpu` averages gradients over all ranks on its reduce-scatter path
    (`reduce_scatter: true`, the default; stage3.py `__avg_scatter_grads`), which is the data-parallel average
    here (module docstring), but over world / S ranks on its all-reduce path (`reduce_scatter: false`,
    `__avg_scatter_contiguous_grads`, only for buckets under `reduce_bucket_size`): refuse that one."""
    zero = (config or {}).get("zero_optimization") or {}
    if zero.get("reduce_scatter", True) is False:
        raise ValueError(f"--sequence_parallel_size {s} under DeepSpeed needs zero_optimization.reduce_scatter: true "
                         f"(its default): with false, ZeRO-3 scales sequence-parallel gradients by S for some buckets "
                         f"only; remove reduce_scatter: false from the DeepSpeed config")


def check_model(module, s: int) -> None:
    """Fail before training when a network of `module` cannot run with S > 1: a backbone whose blocks do not
    mark their attention for sequence parallelism (no `splits_sequence`), or an attention module whose head
    count S does not divide."""
    if s == 1:
        return
    for name, m in module.named_modules():
        where = name or type(module).__name__
        is_backbone = callable(getattr(m, "embed", None)) and callable(getattr(m, "transformer", None))
        if is_backbone and not getattr(m, "splits_sequence", False):
            raise ValueError(f"--sequence_parallel_size {s}: {where} ({type(m).__name__}) has no sequence-parallel "
                             f"attention path (its blocks do not mark their attention calls with sharded_tokens; "
                             f"distributed/sequence_parallel.py): use one of {SPLITTABLE}, or "
                             f"--sequence_parallel_size 1")
        if hasattr(m, "attention_backend"):
            heads = getattr(m, "num_heads", None) or getattr(m, "heads", None)
            if heads:
                sp.check_heads(f"{where} ({type(m).__name__})", int(heads), s)


def enable(trainer, model, s: int) -> None:
    """Check `--sequence_parallel_size s` against the trainer and the model and switch the trainer's strategy to
    its sequence-parallel form (no-op for s = 1)."""
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"--sequence_parallel_size must be a positive integer, got {s!r}")
    if s == 1:
        return
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, (DDPStrategy, ModelParallelStrategy)):
        raise ValueError(f"--sequence_parallel_size {s} needs a multi-process strategy, got "
                         f"{type(strategy).__name__}: add --config configs/strategy/ddp.yaml (or fsdp2.yaml, "
                         f"deepspeed_zero3.yaml) and --trainer.devices N with N a multiple of {s}")
    sp.check_size(s, trainer.world_size)
    check_model(model, s)
    strategy.__class__ = sequence_parallel_class(type(strategy))
    strategy.sequence_parallel_size = s
