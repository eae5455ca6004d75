"""Helpers shared by the stage modules, and the base class of the EMA-student stages (1 and 2)."""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from distributed.sequence_parallel import data_parallel
from models.io import build_backbone, save_backbone
from models.protocol import TextCond


def drop_prompts(text: TextCond, null: TextCond, p: float, generator: torch.Generator | None = None) -> TextCond:
    """Replace each sample's prompt by the null prompt with probability p (for classifier-free guidance)."""
    if p <= 0:
        return text
    drop = torch.rand(text.batch_size, generator=generator, device=text.tokens.device) < p  # (B,)
    null = expand_null(null, text)
    return TextCond(torch.where(drop[:, None, None], null.tokens, text.tokens),
                    torch.where(drop[:, None], null.mask, text.mask),
                    torch.where(drop[:, None], null.pooled, text.pooled))


def expand_null(null: TextCond, text: TextCond) -> TextCond:
    """The (1-prompt) null prompt broadcast to `text`'s batch, after checking the token lengths agree."""
    if null.tokens.shape[1] != text.tokens.shape[1]:
        raise ValueError(f"null prompt length {null.tokens.shape[1]} != prompt length {text.tokens.shape[1]}")
    return TextCond(null.tokens.expand_as(text.tokens), null.mask.expand_as(text.mask),
                    null.pooled.expand_as(text.pooled))


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by (seed, step): a run resumed at step k draws exactly the noise, times and
    prompt dropout that the uninterrupted run drew at step k (the global RNG is not checkpointed)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay with warm-up, min(decay, (1 + n) / (10 + n)): early averages do not stay tied to the
    initial weights (with a fixed 0.999, 300 steps would still weigh the init by 0.74)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied). Sharded
    copies are updated shard by shard on each rank, with no communication: both networks have the same
    shapes, so ZeRO-3 / FSDP2 give each rank the same slice of `ema` and `model`."""
    reshard(ema)
    reshard(model)
    for e, p in zip(ema.parameters(), model.parameters()):
        if zero3_partitioned(e):
            e.ds_tensor.lerp_(p.ds_tensor.to(e.ds_tensor.dtype), 1.0 - decay)
        else:
            e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of `module` back in its sharded state (an FSDP2 root whose forward ran
    without a backward, e.g. under no_grad, can stay gathered; its registered parameters are then the
    full tensors, not the DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def optimizer_stepped(module: L.LightningModule, batch_idx: int) -> bool:
    """Whether the batch that just ended closed an optimizer step (with gradient accumulation only every
    `accumulate_grad_batches`-th does): the EMA follows optimizer steps, so 1 process accumulating k
    micro-batches and k ranks with one each update it identically."""
    return (batch_idx + 1) % module.trainer.accumulate_grad_batches == 0


def warmup_cosine(step: int, warmup: int, total: int | None, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio` at `total` (constant if total is None)."""
    if step < warmup:
        return (step + 1) / warmup
    if not total or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(params, lr: float, betas, weight_decay: float, warmup_steps: int,
                        decay_steps: int | None) -> dict:
    """AdamW with a per-step linear warm-up then cosine schedule, as Lightning's
    `configure_optimizers` return value (every stage with one optimizer uses it)."""
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, decay_steps))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def freeze(module: nn.Module) -> nn.Module:
    """The frozen network of stages 1-3 (teacher, DiT), in eval mode. A random network deferred by train.py
    under ZeRO-3 (`models.io.defer_init`) is built whole here, as without ZeRO-3: the stages derive their
    students and predictors from it at construction. (Exports, `load_backbone`, stay deferred.)"""
    from models.io import DEFERRED_INIT, DEFERRED_WEIGHTS

    if DEFERRED_INIT in module.__dict__ and DEFERRED_WEIGHTS not in module.__dict__:
        from distributed.zero_init import materialize_in_place

        materialize_in_place(module)
    module.requires_grad_(False)
    return module.eval()


def finite_or_raise(name: str, value: Tensor, step: int) -> Tensor:
    """Stop with a clear message when a loss term is NaN/Inf instead of training on garbage."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"non-finite {name} at global step {step}: {value.detach().flatten()[:4].tolist()}")
    return value


def sample_guidance(batch: int, g_min: float, g_max: float, generator: torch.Generator | None = None,
                    device=None) -> Tensor:
    """g ~ U(g_min, g_max), float32 (B,) (DisCa Algorithm 1 line 2; the paper uses 1..8)."""
    return g_min + (g_max - g_min) * torch.rand(batch, generator=generator, device=device, dtype=torch.float32)


def shard_generator(module: L.LightningModule, seed: int, batch_idx: int, step: int | None = None) -> torch.Generator:
    """The generator for one training micro-batch, keyed by (seed, optimizer step, slice of the global
    batch = rank * accumulation + micro-batch): a run resumed at step k redraws step k's noise, times
    and guidance, and 2 ranks draw what 1 process accumulating 2 micro-batches draws. `step` replaces
    the optimizer step where that is not one per batch (stage 3's GAN steps two optimizers)."""
    trainer = module.trainer
    acc = trainer.accumulate_grad_batches
    replicas, rank = data_parallel(trainer)  # the S ranks of a sequence-parallel group draw alike
    shards = replicas * acc
    step = trainer.global_step if step is None else step
    index = step * shards + rank * acc + batch_idx % acc
    return step_generator(seed, index, module.device)


def check_guidance_range(g_min: float, g_max: float) -> None:
    if not 0.0 <= g_min <= g_max:
        raise ValueError(f"need 0 <= guidance_min <= guidance_max, got guidance_min={g_min}, guidance_max={g_max}")


ROOT_METHODS = ("embed", "condition", "head")


def fully_shard_backbone(module: nn.Module, mesh) -> nn.Module:
    """FSDP2-shard a backbone on `mesh` per transformer block plus the root. Each block is its own unit,
    gathered around that block's call and freed after it (the diffusers adapters run their block
    functions inside the diffusers block's call: `models.hunyuan_video.route_block`); the root unit holds
    the embedders (HunyuanVideo's token refiner included) and the output head and is gathered around each
    of its forward methods, `embed`, `condition` and `head` (plus what the backbone adds in `root_methods`,
    e.g. Wan's shared block modulation): the stages and the stage-3 predictor call these parts, never
    `forward`. Peak memory is the root plus one block's full weights. Backbones list their blocks in
    `shard_blocks()`; one without it is refused. A module that is already sharded is left alone."""
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

    if isinstance(module, FSDPModule):
        return module
    if not hasattr(module, "shard_blocks"):
        raise TypeError(f"cannot FSDP2-shard a {type(module).__name__}: it lists no per-block sharding units "
                        f"(a `shard_blocks()` method, as models.mmdit.MMDiT and the diffusers adapters have)")
    for block in shard_blocks(module):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in getattr(module, "root_methods", ROOT_METHODS):
        register_fsdp_forward_method(module, name)
    return module


def shard_blocks(module: nn.Module) -> list[nn.Module]:
    """The backbone's transformer blocks that are safe per-block sharding units (see `fully_shard_backbone`)."""
    return list(module.shard_blocks()) if hasattr(module, "shard_blocks") else []


def zero3_leaf_blocks(module: nn.Module) -> None:
    """ZeRO-3 gathers a parameter in the pre-forward hook of the module that owns it; blocks that slice
    a child's weight (the fused single-stream linears of the MMDiT and of HunyuanVideo) or read their
    own parameters (Wan's `scale_shift_table`) are marked ZeRO-3 leaves, so the whole block is gathered
    on entry and released after it (per-block, as with FSDP2)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(b) for b in shard_blocks(module)}, key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(module, classes)


def checkpoint_blocks(module: nn.Module) -> None:
    """Activation checkpointing per transformer block: a block keeps only its inputs for backward and
    recomputes the rest (torch's composable `checkpoint`, non-reentrant: it leaves parameter names alone
    and composes with FSDP2's and ZeRO-3's per-block gathering). Idempotent."""
    from torch.distributed._composable import checkpoint

    for block in shard_blocks(module):
        if not block.__dict__.get("_checkpointed", False):
            checkpoint(block)
            block.__dict__["_checkpointed"] = True


def shard_modules(pl_module: L.LightningModule, modules: list[nn.Module],
                  checkpointed: list[nn.Module] = ()) -> None:
    """Shard a stage's large networks for the strategy in use (called from `configure_model`):
    FSDP2 (ModelParallelStrategy): per block + root; DeepSpeed ZeRO-3: the engine partitions every
    parameter of the LightningModule (frozen ones included), here only the per-block gathering units are
    set; DDP / one device: nothing. `checkpointed`: the networks whose blocks recompute activations in
    backward (`checkpoint_blocks`), on any strategy."""
    from distributed.strategies import strategy_kind, zero_stage

    for module in checkpointed:
        checkpoint_blocks(module)
    strategy = pl_module.trainer.strategy if pl_module._trainer is not None else None
    kind = strategy_kind(strategy)
    if kind == "fsdp2" and pl_module.device_mesh is not None:
        mesh = pl_module.device_mesh["data_parallel"]
        for module in modules:
            fully_shard_backbone(module, mesh)
    elif kind == "deepspeed" and zero_stage(strategy) == 3:
        for module in modules:
            zero3_leaf_blocks(module)


def materialize_deferred(pl_module: L.LightningModule, names: tuple[str, ...]) -> None:
    """Replace each deferred network `pl_module.<name>` (built inside `models.io.deferred_loading()`, as
    train.py does for DeepSpeed ZeRO-3) by the real one (`distributed.zero_init.materialize`): under ZeRO-3
    partitioned at construction with each rank reading only its slice of the export (call from
    `configure_model`, which Lightning runs inside `deepspeed.zero.Init`), under any other strategy whole.
    Networks that are not deferred are left alone. Each rank's read counts are kept in
    `pl_module.zero_init_stats[name]`."""
    from distributed.zero_init import builds_partitioned, is_deferred, materialize

    partitioned = pl_module._trainer is not None and builds_partitioned(pl_module.trainer.strategy)
    for name in names:
        module = getattr(pl_module, name)
        if is_deferred(module):
            built, stats = materialize(module, partitioned)
            setattr(pl_module, name, built)
            pl_module.__dict__.setdefault("zero_init_stats", {})[name] = stats


def is_deepspeed(pl_module: L.LightningModule) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return pl_module._trainer is not None and isinstance(pl_module.trainer.strategy, DeepSpeedStrategy)


def deepspeed_gradient_clipping(pl_module: L.LightningModule, grad_clip: float) -> None:
    """DeepSpeed owns the gradients (partitioned under ZeRO), so it clips them itself: hand it the
    module's `grad_clip` (global norm) unless the DeepSpeed config sets its own."""
    if is_deepspeed(pl_module):
        config = pl_module.trainer.strategy.config
        if not config.get("gradient_clipping"):
            config["gradient_clipping"] = float(grad_clip or 0.0)


def zero3_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def full_value(x: Tensor) -> Tensor:
    """A DTensor's full value (e.g. a grad norm under FSDP2), a plain tensor unchanged."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def gathered_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full, unsharded state dict on CPU. FSDP2: DTensors gathered (collective). ZeRO-3: gathered one
    submodule at a time (collective), so no rank ever holds more than one submodule's full weights on
    the accelerator. Plain modules: their state dict."""
    if any(zero3_partitioned(p) for p in module.parameters()):
        import deepspeed

        state: dict[str, Tensor] = {}
        for prefix, sub in module.named_modules():
            params = list(sub.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                for name, p in sub.named_parameters(recurse=False):
                    state[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
        for name, b in module.named_buffers():
            state[name] = b.detach().cpu().clone()
        return {k: state[k] for k in module.state_dict()}  # state-dict order and keys
    return {k: full_value(v).detach().cpu() for k, v in module.state_dict().items()}


def export_backbone(module: nn.Module, directory: str | Path, write: bool = True) -> Path:
    """`save_backbone`, also for a sharded (FSDP2 or ZeRO-3) backbone: its parameters are gathered into
    a fresh unsharded copy first. Gathering is collective, so with sharding every rank must call this;
    only ranks with `write=True` write files."""
    sharded = any(hasattr(p, "full_tensor") or zero3_partitioned(p) for p in module.parameters())
    if not sharded:
        return save_backbone(module, directory) if write else Path(directory)
    state = gathered_state_dict(module)
    if not write:
        return Path(directory)
    plain = build_backbone(module.config)
    plain.load_state_dict(state)
    return save_backbone(plain, directory)


class EMAStudentModule(L.LightningModule):
    """What stages 1 and 2 share: a frozen `self.teacher`, one trained `self.student` with an EMA copy
    `self.ema` (the exported network), FSDP2 sharding, gradient clipping, AdamW with warm-up then cosine, and an FSDP2-aware export. Subclasses
    build `student`/`ema` and keep `lr, betas, weight_decay, warmup_steps, decay_steps, ema_decay,
    grad_clip, activation_checkpointing` in `hparams`."""

    teacher: nn.Module
    student: nn.Module
    ema: nn.Module

    def configure_model(self) -> None:
        """Materialise deferred networks (DeepSpeed ZeRO-3: partitioned at construction,
        `materialize_deferred`), shard teacher, student and EMA for the strategy in use (`shard_modules`);
        per-block activation checkpointing of the student when `activation_checkpointing` is set."""
        materialize_deferred(self, ("teacher", "student", "ema"))
        checkpointed = [self.student] if self.hparams.get("activation_checkpointing") else []
        shard_modules(self, [self.teacher, self.student, self.ema], checkpointed)
        deepspeed_gradient_clipping(self, self.hparams.grad_clip)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.grad_clip and not is_deepspeed(self):
            norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.hparams.grad_clip)
            self.log("train/grad_norm", full_value(norm))

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The step, then the EMA update: here, not in `on_train_batch_end`, which Lightning runs after the
        callbacks' (ModelCheckpoint saves in theirs), so that a checkpoint holds its own step's EMA and a
        resumed run exports the weights of an uninterrupted one. Lightning counts the step (`global_step`)
        only after this hook returns."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if optimizer_stepped(self, batch_idx):
            ema_update(self.ema, self.student, ema_decay_at(self.global_step + 1, self.hparams.ema_decay))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.student.parameters(), hp.lr, hp.betas, hp.weight_decay, hp.warmup_steps,
                                   hp.decay_steps)

    def export(self, directory: str | Path) -> Path:
        """Write the EMA student (safetensors + config.json). Sharded (FSDP2): call on every rank."""
        return export_backbone(self.ema, directory, write=self.global_rank == 0)
