"""ZeRO-3 start-up without a full model on any rank: deferred backbones materialised into partitions.

Under the DeepSpeed ZeRO-3 preset train.py builds the stage inside `models.io.deferred_loading()`:
`load_backbone` returns a backbone whose transformer blocks are on the meta device (the embedders and
head, a small share, are loaded, so the stages' student = copy of the teacher + new embedder works on
it), and a new `models.mmdit.MMDiT` (stage 0) is built with every parameter on meta and its call and RNG
state recorded (`models.io.defer_init`). Lightning calls the stage's `configure_model` inside
`deepspeed.zero.Init` (its `DeepSpeedStrategy.model_sharded_context`); there `materialize` rebuilds each
deferred network, so zero.Init partitions every parameter as its submodule is constructed, and then
- from an export: writes into each rank's partition (`param.ds_tensor`: elements [rank * n, (rank + 1) * n)
  of the flattened tensor, zero padded; DeepSpeed's `partition_parameters.py` `_partition_param`) its slice,
  read with `safe_open(...).get_slice(name)[rows]`: only the rows that cover the rank's elements, so no rank
  reads or holds a whole block tensor. The loaded parts (and layers a stage added, e.g. `time_r_in`) are
  sliced from the deferred module's own tensors. No communication beyond zero.Init's own.
- random: replays the constructor from the recorded CPU RNG state; `InitGathered` gathers one parameter at
  a time where the constructor writes weights that zero.Init has already partitioned, so the values are
  the eager ones (on CPU; on a GPU zero.Init allocates on the device, whose generator is another one).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from models.io import DEFERRED_INIT, DEFERRED_WEIGHTS, build_backbone


def is_deferred(module: nn.Module) -> bool:
    return DEFERRED_WEIGHTS in module.__dict__ or DEFERRED_INIT in module.__dict__


def builds_partitioned(strategy) -> bool:
    """Whether a trainer `strategy` as configured (an instance, a class_path/init_args namespace or dict,
    or a registry name) is DeepSpeed ZeRO stage 3, i.e. the stage should be built deferred. A DeepSpeed
    config given as a file path is not read: such a stage is built whole, as before."""
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from jsonargparse import Namespace

    if isinstance(strategy, str):
        return strategy.startswith("deepspeed_stage_3")
    if isinstance(strategy, DeepSpeedStrategy):
        return strategy.zero_stage_3
    if isinstance(strategy, Namespace):
        strategy = strategy.as_dict()
    if not isinstance(strategy, dict) or not isinstance(strategy.get("class_path"), str):
        return False
    module_name, _, class_name = strategy["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "lightning.pytorch.strategies"), class_name)
    except (ImportError, AttributeError):
        return False
    if not (isinstance(cls, type) and issubclass(cls, DeepSpeedStrategy)):
        return False
    init_args = strategy.get("init_args") or {}
    config = init_args.get("config")
    if isinstance(config, dict):
        return int((config.get("zero_optimization") or {}).get("stage", 0)) == 3
    return config is None and int(init_args.get("stage", 2)) == 3  # DeepSpeedStrategy's default stage is 2


def read_flat_range(f, name: str, start: int, stop: int) -> tuple[Tensor, int]:
    """Elements [start, stop) of tensor `name` flattened, reading only the rows that hold them; and the
    number of elements read."""
    view = f.get_slice(name)
    shape = view.get_shape()
    if len(shape) == 0:
        return f.get_tensor(name).reshape(1)[start:stop], 1
    row = math.prod(shape[1:])
    first, last = start // row, -(-stop // row)
    rows = view[first:last].reshape(-1)
    return rows[start - first * row:stop - first * row], rows.numel()


def materialize(module: nn.Module, partitioned: bool) -> tuple[nn.Module, dict[str, int]]:
    """The deferred `module` as a real network (see the module docstring).

    partitioned=True must run inside `deepspeed.zero.Init` (a ZeRO-3 strategy's `configure_model`): every
    parameter is partitioned on construction and each rank reads its slice only. partitioned=False (any
    other strategy) builds the network whole. A network with a weights file (`load_backbone`, `load_state`)
    is rebuilt from its config and filled from the file (its meta parameters) and from its own loaded
    tensors (the others); a random one (`defer_init`) replays its construction from the recorded RNG state,
    so its values are the eager ones. Returns it with this rank's counts: elements read from the file
    (`read_elements`), elements of the file-backed parameters (`file_elements`) and elements the deferred
    module held before (`held_elements`: its non-meta parameters). requires_grad, buffers and train/eval
    mode are the deferred module's."""
    path = module.__dict__.get(DEFERRED_WEIGHTS)
    with torch.random.fork_rng(devices=[]):  # the build's random init must not move the global RNG
        if path is None:
            cls, args, kwargs, rng = module.__dict__[DEFERRED_INIT]
            torch.set_rng_state(rng)
            with InitGathered():
                built = cls(*copy.deepcopy(args), **copy.deepcopy(kwargs))
        else:
            built = build_backbone(module.config)
    source = dict(module.named_parameters())
    names = dict(built.named_parameters())
    if set(source) != set(names):
        raise ValueError(f"rebuilding the deferred {type(module).__name__} gives parameters "
                         f"{sorted(set(names) ^ set(source))[:5]} that differ from the deferred module's (a deferred "
                         f"random network cannot be extended before it is materialised)")
    if partitioned and not all(hasattr(p, "ds_tensor") for p in names.values()):
        raise RuntimeError("materialize(partitioned=True) must run inside deepspeed.zero.Init (the configure_model "
                           "of a DeepSpeed ZeRO-3 strategy); the rebuilt parameters are not partitioned")
    stats = {"read_elements": 0, "file_elements": 0,
             "held_elements": sum(p.numel() for p in source.values() if not p.is_meta)}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        f = stack.enter_context(safe_open(path, framework="pt")) if path else None
        for name, p in names.items():
            src = source[name]
            if src.is_meta and f is None:  # replayed random init: already the eager value
                pass
            elif partitioned:
                stats["read_elements"] += _fill_partition(p, src, f, name)
            else:
                p.copy_(f.get_tensor(name) if src.is_meta else src)
                stats["read_elements"] += src.numel() if src.is_meta else 0
            stats["file_elements"] += src.numel() if src.is_meta and f is not None else 0
            p.requires_grad_(src.requires_grad)
        for name, b in module.named_buffers():
            built.get_buffer(name).copy_(b)
    return built.train(module.training), stats


def materialize_in_place(module: nn.Module) -> nn.Module:
    """`materialize(module, partitioned=False)` into `module` itself (its meta parameters replaced): for
    callers that keep references to it. It is no longer deferred afterwards."""
    built, _ = materialize(module, partitioned=False)
    module.load_state_dict(built.state_dict(), assign=True)
    module.__dict__.pop(DEFERRED_INIT, None)
    module.__dict__.pop(DEFERRED_WEIGHTS, None)
    return module


# the in-place tensor methods torch.nn.init writes with
INIT_METHODS = ("uniform_", "normal_", "zero_", "fill_", "bernoulli_", "exponential_", "random_")


class InitGathered(TorchFunctionMode):
    """In-place initialisation of a parameter that zero.Init has already partitioned (a parent's `__init__`
    writing its children's weights, e.g. `MMDiT.initialize_weights`' `nn.init.normal_` / `zeros_` calls;
    DeepSpeed gathers around `Module.apply` itself, not around these) runs on that one parameter gathered:
    `torch.nn.init` functions and in-place tensor methods (`uniform_`, `zero_`, ...). Rank 0's result is
    kept; every rank draws the same numbers from the same RNG state. Outside zero.Init nothing is
    partitioned and the mode changes nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensor = kwargs.get("tensor", args[0] if args else None)  # torch.nn.init dispatches with tensor=...
        in_place = getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in INIT_METHODS
        if in_place and _partitioned_away(tensor):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _partitioned_away(p) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return hasattr(p, "ds_id") and p.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _fill_partition(p: nn.Parameter, src: Tensor, f, name: str) -> int:
    """Write this rank's slice of the value (`src`, or the file when `src` is meta) into `p.ds_tensor`;
    returns the elements read from the file."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    part = p.ds_tensor
    start = part.ds_numel * torch.distributed.get_rank(group=p.ds_process_group)
    stop = min(start + part.ds_numel, p.ds_numel)
    read = 0
    if stop > start:
        if src.is_meta:
            value, read = read_flat_range(f, name, start, stop)
        else:
            value = src.reshape(-1)[start:stop]
        part.data[:stop - start].copy_(value)
    if p.ds_status == ZeroParamStatus.AVAILABLE:  # below the persistence threshold: kept whole on every rank
        full = f.get_tensor(name) if src.is_meta else src
        p.data.copy_(full.reshape(p.ds_shape))
        read += full.numel() if src.is_meta else 0
    return read
