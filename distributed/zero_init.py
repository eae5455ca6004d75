"""ZeRO-3 start-up without a full model on any rank: deferred backbones materialised into partitions.

Under the DeepSpeed ZeRO-3 preset train.py builds the stage inside `models.io.deferred_loading()`, so
`load_backbone` returns a backbone whose transformer blocks are on the meta device (the embedders and
head, a small share, are loaded; the stages' student = copy of the teacher + new embedder works on it).
Lightning calls the stage's `configure_model` inside `deepspeed.zero.Init` (its
`DeepSpeedStrategy.model_sharded_context`); there `materialize` rebuilds each deferred network from its
config, so zero.Init partitions every parameter as its submodule is constructed, and writes into each
rank's partition (`param.ds_tensor`: elements [rank * n, (rank + 1) * n) of the flattened tensor, zero
padded; DeepSpeed's `partition_parameters.py` `_partition_param`) its slice of the export, read with
`safe_open(...).get_slice(name)[rows]`: only the rows that cover the rank's elements, so no rank reads or
holds a whole tensor of the blocks. The loaded parts (and layers a stage added, e.g. `time_r_in`) are
sliced from the deferred module's own tensors. No communication beyond zero.Init's own.
"""
from __future__ import annotations

import math

import torch
from safetensors import safe_open
from torch import Tensor, nn

from models.io import DEFERRED_WEIGHTS, build_backbone


def is_deferred(module: nn.Module) -> bool:
    return DEFERRED_WEIGHTS in module.__dict__


def builds_partitioned(strategy) -> bool:
    """Whether a trainer `strategy` as configured (an instance, a class_path/init_args namespace or dict,
    or a registry name) is DeepSpeed ZeRO stage 3, i.e. the stage should be built deferred."""
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
        import importlib

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
    """The deferred `module` as a real network with its weights (see the module docstring).

    partitioned=True must run inside `deepspeed.zero.Init` (a ZeRO-3 strategy's `configure_model`): every
    parameter is partitioned on construction and each rank reads its slice only. partitioned=False (any
    other strategy) builds the network whole and loads it. Returns it with this rank's counts: elements
    read from the file (`read_elements`), elements of the file-backed parameters (`file_elements`) and
    elements the deferred module held before (`held_elements`: its loaded, non-meta parameters).
    requires_grad, buffers and train/eval mode are the deferred module's."""
    path = module.__dict__[DEFERRED_WEIGHTS]
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the global RNG
        built = build_backbone(module.config)
    source = dict(module.named_parameters())
    names = dict(built.named_parameters())
    if set(source) != set(names):
        raise ValueError(f"rebuilding the deferred {type(module).__name__} from its config gives parameters "
                         f"{sorted(set(names) ^ set(source))[:5]} that differ from the deferred module's")
    if partitioned and not all(hasattr(p, "ds_tensor") for p in names.values()):
        raise RuntimeError("materialize(partitioned=True) must run inside deepspeed.zero.Init (the configure_model "
                           "of a DeepSpeed ZeRO-3 strategy); the rebuilt parameters are not partitioned")
    stats = {"read_elements": 0, "file_elements": 0,
             "held_elements": sum(p.numel() for p in source.values() if not p.is_meta)}
    with torch.no_grad(), safe_open(path, framework="pt") as f:
        for name, p in names.items():
            src = source[name]
            if src.is_meta:
                stats["file_elements"] += src.numel()
            if partitioned:
                stats["read_elements"] += _fill_partition(p, src, f, name)
            else:
                p.copy_(f.get_tensor(name) if src.is_meta else src)
                stats["read_elements"] += src.numel() if src.is_meta else 0
            p.requires_grad_(src.requires_grad)
        for name, b in module.named_buffers():
            built.get_buffer(name).copy_(b)
    return built.train(module.training), stats


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
