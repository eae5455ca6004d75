"""How many GPUs do I need? Bytes per GPU of each stage's networks, built on the meta device.

    python -m distributed.planner plan --config configs/restricted_meanflow.yaml \
        --backbone hunyuan_video_13b --gpus 8 --strategy deepspeed_zero3 --seq_tokens 16384

For every stage (0-3) it builds the stage's networks as the stage modules do (stage 1: student = teacher
+ guidance embedder; stage 2: + r embedder; stage 3: frozen DiT + predictor + discriminator) on the meta
device (nothing is allocated, the 13B model included) and prints, for the rank holding the most:
parameters of the trained network(s), their gradients, the optimizer state (AdamW), the EMA copy, the
frozen teacher / DiT, and an activation estimate. The stage named by `--config` takes its
hyperparameters from that file (r embedding, predictor and discriminator sizes); the other stages use
their defaults.

Bytes per element (what the strategies keep):
- precision 32: parameters 4, gradients 4, AdamW state 8 (exp_avg, exp_avg_sq);
- bf16-mixed under DeepSpeed: parameters 2, gradients 2, optimizer 12 (fp32 master copy + AdamW state);
  frozen networks and the EMA are bf16 (2);
- bf16-mixed under DDP / FSDP2 (Lightning autocast): parameters stay fp32, as with precision 32.
Sharding (per parameter, as the libraries split it): ZeRO-3 gives every rank ceil(numel / gpus)
elements; FSDP2 splits dim 0 into chunks of ceil(rows / gpus) (rank 0 holds the largest); DDP holds
everything on every rank. The parameter / optimizer element counts per rank are checked against what
2-process CPU runs hold (tests/test_strategy_presets.py).

Activations (an estimate, batch `--batch_per_gpu`): per transformer block of the trained network,
34 * s * h bytes in bf16 without attention scores (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Eq. 1 with a fused attention: the 5 a s^2 term dropped);
with activation checkpointing per block, 2 * s * h per block (the block inputs) plus one block's full
34 * s * h. Stage 3 back-propagates through the frozen DiT's features (counted like a trained network).

Sequence parallelism (`--sequence_parallel_size S`, Ulysses, distributed/sequence_parallel.py): each rank of a
group of S holds s / S of the tokens, so the activation estimate uses ceil(s / S); the all-to-all buffers are
added (`sp_buffers`): around one attention call the send and receive buffers of the stacked q, k, v and of the
output (2 x 4 x s / S x h), twice in stage 2 (its JVP sends tangents beside values), plus the whole hidden state
gathered at each network's output (S copies of the shard sent, the sequence received, the result: 3 x s x h),
in bf16 (2 bytes). Parameters, gradients and optimizer state are sharded over all GPUs as without S.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

HUNYUAN_VIDEO_13B = dict(num_layers=20, num_single_layers=40, num_attention_heads=24, attention_head_dim=128,
                         num_refiner_layers=2, mlp_ratio=4.0, in_channels=16, out_channels=16, patch_size=2,
                         patch_size_t=1, text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=[16, 56, 56],
                         guidance_embeds=False)
# name -> (backbone config for models.io.build_backbone, predictor preset name)
BACKBONES: dict[str, tuple[dict, str]] = {
    "hunyuan_video_13b": ({"type": "hunyuan_video", "diffusers_config": HUNYUAN_VIDEO_13B}, "hunyuan_video"),
    **{f"mmdit_{s}": ({"type": "mmdit", **__import__("models.mmdit", fromlist=["MMDIT_SIZES"]).MMDIT_SIZES[s]}, s)
       for s in ("tiny", "small", "base", "large")},
    # the tiny MMDiT of the smoke configs (patch (2, 4, 4), MiniLM text): what the 2-process tests run
    "mmdit_tiny_smoke": ({"type": "mmdit", **__import__("models.mmdit", fromlist=["MMDIT_SIZES"]).MMDIT_SIZES["tiny"],
                          "patch_size": [2, 4, 4], "text_dim": 384, "pooled_dim": 384}, "tiny"),
}
STAGES = ("flow_matching", "cfg_distill", "restricted_meanflow", "predictor_gan")
STAGE_CLASSES = {"lightning_modules.flow_matching.FlowMatchingModule": "flow_matching",
                 "lightning_modules.cfg_distill.CFGDistillModule": "cfg_distill",
                 "lightning_modules.meanflow.RestrictedMeanFlowModule": "restricted_meanflow",
                 "lightning_modules.predictor_gan.PredictorGANModule": "predictor_gan"}
STRATEGIES = ("ddp", "fsdp2", "deepspeed_zero3")
PRECISIONS = ("32", "bf16-mixed")
MAX_GPUS = 16384  # the largest single training jobs reported (Llama 3: 16k H100s); beyond it the plan means nothing


@dataclass
class StageNetworks:
    trained: dict[str, nn.Module]  # name -> trained network (gradients + optimizer state)
    ema: nn.Module | None
    frozen: nn.Module | None
    grad_through: list[nn.Module]  # networks whose activations are kept for backward


def build_networks(stage: str, backbone: str, init_args: dict | None = None) -> StageNetworks:
    """The stage's networks on the meta device (`init_args`: the stage's config init_args, optional)."""
    from models.discriminator import Discriminator
    from models.io import build_backbone
    from models.predictor import PREDICTOR_PRESETS, Predictor

    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; the planner knows {sorted(BACKBONES)}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    cfg, preset = BACKBONES[backbone]
    args = dict(init_args or {})
    with torch.device("meta"):
        base = build_backbone(cfg)
        if stage == "flow_matching":
            return StageNetworks({"backbone": base}, copy.deepcopy(base), None, [base])
        base.enable_guidance_embedding()  # the teacher of stage 2, and stage 3's M, are stage-1 models
        if stage == "cfg_distill":
            teacher = build_backbone(cfg)
            return StageNetworks({"student": base}, copy.deepcopy(base), teacher, [base])
        if stage == "restricted_meanflow":
            student = copy.deepcopy(base)
            student.enable_r_embedding(args.get("r_embed", "average"))
            return StageNetworks({"student": student}, copy.deepcopy(student), base, [student])
        base.enable_r_embedding("average")
        pred_cfg = args.get("predictor") or PREDICTOR_PRESETS[preset]
        d_cfg = dict(args.get("discriminator") or {})
        layers = d_cfg.pop("feature_layers", [base.num_blocks - 1])
        predictor = Predictor(base, **pred_cfg)
        disc = Discriminator(base.hidden_size, len(layers), **d_cfg)
        return StageNetworks({"predictor": predictor, "discriminator": disc}, None, base, [predictor, base])


def rank0_elements(module: nn.Module, strategy: str, gpus: int) -> int:
    """Parameter elements of `module` on the rank holding the most (see the module docstring)."""
    total = 0
    for p in module.parameters():
        n = p.numel()
        if strategy == "deepspeed_zero3":
            total += math.ceil(n / gpus)
        elif strategy == "fsdp2":
            rows = p.shape[0] if p.ndim else 1
            total += math.ceil(rows / gpus) * (n // max(rows, 1))
        else:
            total += n
    return total


def activation_bytes(networks: list[nn.Module], seq_tokens: int, batch: int, checkpointing: bool) -> int:
    total = 0
    for net in networks:
        blocks = getattr(net, "num_blocks", None) or len(getattr(net, "blocks", ())) or 1
        h = getattr(net, "hidden_size", None) or net.cfg.hidden_size
        per_block = 34 * seq_tokens * h * batch
        total += (blocks * 2 * seq_tokens * h * batch + per_block) if checkpointing else blocks * per_block
    return total


def sequence_parallel_bytes(networks: list[nn.Module], seq_tokens: int, batch: int, sp: int, jvp: bool) -> int:
    """Ulysses all-to-all buffers per GPU (module docstring); 0 without sequence parallelism."""
    if sp == 1:
        return 0
    widths = [getattr(net, "hidden_size", None) or net.cfg.hidden_size for net in networks]
    local = math.ceil(seq_tokens / sp)
    one_call = max(2 * 4 * local * h for h in widths) * (2 if jvp else 1)
    gathered = sum(3 * seq_tokens * h for h in widths)
    return 2 * batch * (one_call + gathered)


def plan_stage(stage: str, backbone: str, gpus: int, strategy: str, seq_tokens: int, precision: str = "bf16-mixed",
               batch_per_gpu: int = 1, activation_checkpointing: bool = True, init_args: dict | None = None,
               sequence_parallel_size: int = 1) -> dict:
    """Per-GPU bytes and elements of one stage (rank holding the most)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if gpus < 1 or seq_tokens < 1 or batch_per_gpu < 1:
        raise ValueError(f"gpus, seq_tokens and batch_per_gpu must be >= 1, got {gpus}, {seq_tokens}, {batch_per_gpu}")
    sp = sequence_parallel_size
    if sp < 1 or gpus % sp:
        raise ValueError(f"--sequence_parallel_size {sp} must be >= 1 and divide --gpus {gpus}")
    nets = build_networks(stage, backbone, init_args)
    ds_bf16 = strategy == "deepspeed_zero3" and precision == "bf16-mixed"
    param_b, grad_b, opt_b, frozen_b = (2, 2, 12, 2) if ds_bf16 else (4, 4, 8, 4)
    # under ZeRO-3 stage 3's discriminator stays outside the engine, replicated (PredictorGANModule)
    trained = sum(rank0_elements(m, "ddp" if (strategy, name) == ("deepspeed_zero3", "discriminator") else strategy,
                                 gpus) for name, m in nets.trained.items())
    ema = rank0_elements(nets.ema, strategy, gpus) if nets.ema is not None else 0
    frozen = rank0_elements(nets.frozen, strategy, gpus) if nets.frozen is not None else 0
    out = {"stage": stage, "trained_elements": trained, "ema_elements": ema, "frozen_elements": frozen,
           "optimizer_elements": 2 * trained,
           "params": trained * param_b, "grads": trained * grad_b, "optimizer": trained * opt_b,
           "ema": ema * frozen_b, "frozen": frozen * frozen_b,
           "activations": activation_bytes(nets.grad_through, math.ceil(seq_tokens / sp), batch_per_gpu,
                                           activation_checkpointing),
           "sp_buffers": sequence_parallel_bytes(nets.grad_through, seq_tokens, batch_per_gpu, sp,
                                                 stage == "restricted_meanflow")}
    out["total"] = sum(out[k] for k in ("params", "grads", "optimizer", "ema", "frozen", "activations", "sp_buffers"))
    return out


def stage_of_config(path: str) -> tuple[str, dict]:
    """(stage, its init_args) of a stage config file (YAML with model.class_path / init_args)."""
    import yaml

    with open(path) as f:
        model = (yaml.safe_load(f) or {}).get("model") or {}
    cls = model.get("class_path")
    if cls not in STAGE_CLASSES:
        raise ValueError(f"{path}: model.class_path {cls!r} is not a stage the planner knows "
                         f"({sorted(STAGE_CLASSES)})")
    return STAGE_CLASSES[cls], dict(model.get("init_args") or {})


def format_table(rows: list[dict], header: str) -> str:
    gib = 2.0 ** 30
    cols = ("params", "grads", "optimizer", "ema", "frozen", "activations",
            *(("sp_buffers",) if any(row.get("sp_buffers") for row in rows) else ()), "total")
    lines = [header, "| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in rows:
        lines.append(f"| {row['stage']} | " + " | ".join(f"{row[c] / gib:.2f} GiB" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distributed.planner", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="bytes per GPU of each stage")
    p.add_argument("--config", required=True, help="a stage config (its stage's hyperparameters are used)")
    p.add_argument("--backbone", required=True, help=f"one of {sorted(BACKBONES)}")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--strategy", required=True, help=f"one of {STRATEGIES}")
    p.add_argument("--seq_tokens", type=int, required=True, help="video + text tokens per sample")
    p.add_argument("--precision", default="bf16-mixed", help=f"one of {PRECISIONS}")
    p.add_argument("--batch_per_gpu", type=int, default=1)
    p.add_argument("--no_activation_checkpointing", action="store_true")
    p.add_argument("--sequence_parallel_size", type=int, default=1,
                   help="Ulysses sequence parallelism: GPUs sharing each sample's tokens (divides --gpus)")
    args = parser.parse_args(argv)
    for name, value, high in (("gpus", args.gpus, MAX_GPUS), ("seq_tokens", args.seq_tokens, None),
                              ("batch_per_gpu", args.batch_per_gpu, None)):
        if value < 1 or (high is not None and value > high):
            p.error(f"--{name} {value} is out of range: give an integer from 1" + (f" to {high}" if high else ""))
    try:
        config_stage, init_args = stage_of_config(args.config)
        rows = [plan_stage(stage, args.backbone, args.gpus, args.strategy, args.seq_tokens, args.precision,
                           args.batch_per_gpu, not args.no_activation_checkpointing,
                           init_args if stage == config_stage else None, args.sequence_parallel_size)
                for stage in STAGES]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(rows, f"{args.backbone} on {args.gpus} GPUs, {args.strategy}, {args.precision}, "
                             f"{args.seq_tokens} tokens x {args.batch_per_gpu} per GPU, sequence parallel "
                             f"{args.sequence_parallel_size}, activation checkpointing "
                             f"{'off' if args.no_activation_checkpointing else 'on'} (per GPU, rank holding the most)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
