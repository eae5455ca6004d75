"""Per-block sharding of the diffusers adapters (HunyuanVideo, Wan), as for the built-in MMDiT.

2 CPU processes (gloo), FSDP2 through `lightning_modules.common.fully_shard_backbone`: every block of
each adapter is its own FSDP unit, each rank holds about half of every block; `run` and its gradients
(also with per-block activation checkpointing) equal the unsharded model's; stage 2's forward-AD JVP
(math attention) through the sharded adapter equals the unsharded one; stage 3's predictor, which calls
the frozen backbone's embedders, conditioning and head (Wan: also its shared block modulation), runs on
it unchanged; at any moment of the forward and of the backward one block's weights at most are
registered gathered besides the root's. DeepSpeed ZeRO-3 with the blocks as leaf modules: the same
outputs, gradients and du/dt. 1 process: activation checkpointing per block gives the same gradients
while keeping fewer tensors for backward; the block routing survives `copy.deepcopy` and leaves the
state-dict keys and diffusers' own forward alone."""
from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import Tensor, nn

from distributed.memory import full_numel, local_numel
from lightning_modules.common import checkpoint_blocks, fully_shard_backbone, full_value
from losses.meanflow import meanflow_dudt
from models.hunyuan_video import HunyuanVideoBackbone
from models.layers import attention_backend
from models.predictor import Predictor
from models.protocol import TextCond
from models.wan import WanBackbone
from tests.conftest import perturb
from tests.test_stage2_distributed import free_port

WORLD = 2
TXT_DIM, POOL_DIM, L = 12, 10, 5
KINDS = ("hunyuan_video", "wan")


def build(kind: str) -> nn.Module:
    """A tiny random adapter with 2 blocks of each kind it has, a guidance (HunyuanVideo) and an r embedder."""
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    torch.manual_seed(0)
    if kind == "hunyuan_video":
        model = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            text_embed_dim=TXT_DIM, pooled_projection_dim=POOL_DIM, rope_axes_dim=(2, 2, 4), guidance_embeds=True)
        backbone = HunyuanVideoBackbone(model, r_embed="average")
    else:
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=4, out_channels=4, text_dim=TXT_DIM, freq_dim=16, ffn_dim=24,
                                      num_layers=2, rope_max_seq_len=32)
        backbone = WanBackbone(model, r_embed="interval")
    return perturb(backbone, std=0.1, seed=1)


def inputs(kind: str) -> dict:
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, 3:] = False  # right padding on sample 1
    return dict(x=torch.randn(2, 4, 2, 4, 4, generator=gen),  # 2 x 2 x 2 = 8 image tokens
                t=torch.tensor([0.7, 0.4]), r=torch.tensor([0.2, 0.3]), v=torch.randn(2, 4, 2, 4, 4, generator=gen),
                text=TextCond(torch.randn(2, L, TXT_DIM, generator=gen), mask, torch.randn(2, POOL_DIM, generator=gen)),
                guidance=torch.tensor([3.0, 5.0]) if kind == "hunyuan_video" else None)


def run(model: nn.Module, inp: dict, x: Tensor | None = None, t: Tensor | None = None) -> Tensor:
    x = inp["x"] if x is None else x
    t = inp["t"] if t is None else t
    return model.run(x, t, inp["text"], r=inp["r"], guidance=inp["guidance"]).velocity


def dudt(model: nn.Module, inp: dict) -> tuple[Tensor, Tensor]:
    """Stage 2's du/dt: forward-mode AD along (v, 0, 1) with explicit 'math' attention."""
    def u_fn(x_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return run(model, inp, x_, t_)

    with attention_backend(model, "math"), torch.no_grad():
        return meanflow_dudt(u_fn, inp["x"], inp["r"], inp["t"], inp["v"], method="forward_ad")


def loss_and_grads(model: nn.Module, inp: dict) -> tuple[Tensor, dict[str, Tensor], list[int]]:
    """A training-like forward + backward; also the number of gathered blocks sampled at every tensor
    autograd saves (forward) and unpacks (backward)."""
    gathered: list[int] = []
    sample = gathered_blocks(model)

    def pack(x: Tensor) -> Tensor:
        gathered.append(sample())
        return x

    def unpack(x: Tensor) -> Tensor:
        gathered.append(-sample())  # negative: sampled in backward
        return x

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = run(model, inp).square().mean()
        loss.backward()
    grads = {n: full_value(p.grad).detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, gathered


def gathered_blocks(model: nn.Module):
    """A function counting the blocks whose full weights are registered right now: FSDP2 registers a
    unit's unsharded tensors while it is gathered and its DTensor shards otherwise (the root unit, which
    FSDP2 keeps gathered from the first root call to the backward, is not counted)."""
    from torch.distributed.tensor import DTensor

    blocks = model.shard_blocks()
    names = [next(n for n, _ in b.named_parameters()) for b in blocks]

    def count() -> int:
        return sum(not isinstance(b.get_parameter(name), DTensor) for b, name in zip(blocks, names))

    return count


def predictor(backbone: nn.Module) -> Predictor:
    """Stage 3's predictor at the backbone's width: its blocks (Wan: sharing the backbone's block modulation)
    and the backbone's embedders and head, which it calls directly."""
    torch.manual_seed(5)
    return perturb(Predictor(backbone, num_blocks=1), std=0.1, seed=6)


def predicted(backbone: nn.Module, pred: Predictor, inp: dict) -> Tensor:
    n = inp["x"].shape[2] * inp["x"].shape[3] * inp["x"].shape[4] // 4 + L  # image tokens (patch 1x2x2) + text
    cache = torch.randn(2, n, backbone.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return pred(backbone, inp["x"], inp["t"], inp["r"], inp["text"], cache, inp["guidance"])


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {}
        for kind in KINDS:
            inp = inputs(kind)
            ref_model = build(kind)
            ref_out = run(ref_model, inp).detach()
            ref_u, ref_dudt = dudt(ref_model, inp)
            ref_loss, ref_grads, ref_gathered = loss_and_grads(ref_model, inp)

            ref_pred = predicted(ref_model, predictor(ref_model), inp)

            model = build(kind)
            pred = predictor(model)  # built on the unsharded backbone, sharded as stage 3 does (configure_model)
            fully_shard_backbone(model, mesh)
            fully_shard(pred, mesh=mesh)
            blocks = model.shard_blocks()
            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            with torch.no_grad():
                out = run(model, inp)
            u, du = dudt(model, inp)
            loss, grads, gathered = loss_and_grads(model, inp)
            ckpt_model = build(kind)
            checkpoint_blocks(ckpt_model)  # as `shard_modules` does: checkpointing first, then the FSDP2 units
            _, ckpt_grads, _ = loss_and_grads(fully_shard_backbone(ckpt_model, mesh), inp)
            results[kind] = dict(
                n_blocks=len(blocks), units_are_blocks_and_root=(units == [model, *blocks]),
                held=[(sum(local_numel(p) for p in b.parameters()), sum(full_numel(p) for p in b.parameters()))
                      for b in blocks],
                out=(out, ref_out), u=(u, ref_u), dudt=(du, ref_dudt), loss=(loss, ref_loss),
                grads=(grads, ref_grads), ckpt_grads=(ckpt_grads, ref_grads), gathered=gathered,
                unsharded_gathered=max(ref_gathered), predictor=(predicted(model, pred, inp), ref_pred))
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, out_dir: Path, what: str) -> list[dict]:
    ctx = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 150
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            raise TimeoutError(f"the 2-process {what} run did not finish in 150 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_fsdp2_per_block_units_on_two_processes(tmp_path: Path):
    ranks = spawn(_worker, tmp_path, "FSDP2")
    for kind in KINDS:
        for rank, res in enumerate(ranks):
            r = res[kind]
            where = f"{kind} rank {rank}"
            assert r["n_blocks"] == 4 if kind == "hunyuan_video" else r["n_blocks"] == 2, where
            assert r["units_are_blocks_and_root"], where  # one FSDP unit per block, plus the root
            for b, (held, full) in enumerate(r["held"]):
                assert 0.35 * full <= held <= 0.65 * full, (where, b, held, full)  # about half of every block
            for key in ("out", "u", "dudt", "loss", "predictor"):
                got, want = r[key]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} {key}: {m}")
            assert r["dudt"][1].abs().max() > 1e-2, where  # a non-trivial tangent
            for key in ("grads", "ckpt_grads"):  # sharded; sharded with per-block activation checkpointing
                grads, ref = r[key]
                assert grads.keys() == ref.keys()
                for name, g in ref.items():
                    torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7,
                                               msg=lambda m: f"{where} {key} {name}: {m}")
            fwd = [n for n in r["gathered"] if n >= 0]
            bwd = [-n for n in r["gathered"] if n <= 0]
            assert r["unsharded_gathered"] == r["n_blocks"], where  # the probe sees every block of an unsharded model
            assert fwd and bwd and max(fwd) == 1, (where, max(fwd))  # forward: one block at a time
            assert max(bwd) == 1, (where, max(bwd))  # backward too (a prefetched all-gather is not registered yet)
        held = [sum(h for h, _ in ranks[rank][kind]["held"]) for rank in range(WORLD)]
        assert sum(held) == sum(f for _, f in ranks[0][kind]["held"]), (kind, held)  # the ranks split every block


class EngineModule(nn.Module):
    """What DeepSpeed's engine wraps (in training, the LightningModule): the loss, or stage 2's du/dt, of a
    backbone, computed inside the engine's forward as `training_step` is."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, inp: dict, jvp: bool = False):
        return dudt(self.backbone, inp) if jvp else run(self.backbone, inp).square().mean()


def _zero3_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import argparse

    import deepspeed
    from deepspeed.utils import safe_get_full_grad, z3_leaf_module

    from distributed.zero_jvp import enable_forward_ad_through_zero_hooks
    from lightning_modules.common import zero3_leaf_blocks

    deepspeed.init_distributed("gloo")
    try:
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                        "memory_efficient_linear": False}}
        results = {}
        for kind in KINDS:
            inp = inputs(kind)
            ref = build(kind)
            ref_loss = run(ref, inp).square().mean()
            ref_loss.backward()
            ref_u, ref_dudt = dudt(ref, inp)

            module = EngineModule(build(kind))
            zero3_leaf_blocks(module.backbone)
            engine, *_ = deepspeed.initialize(args=argparse.Namespace(device_rank=rank), model=module,
                                              model_parameters=module.parameters(), config=config)
            blocks = module.backbone.shard_blocks()
            held = [(sum(local_numel(p) for p in b.parameters()), sum(full_numel(p) for p in b.parameters()))
                    for b in blocks]
            loss = engine(inp)
            engine.backward(loss)
            grads = [(safe_get_full_grad(p).clone(), q.grad) for p, q in zip(module.parameters(), ref.parameters())]
            enable_forward_ad_through_zero_hooks(module)
            u, du = engine(inp, jvp=True)
            results[kind] = dict(leaves=all(z3_leaf_module(b) for b in blocks), held=held,
                                 loss=(loss.detach(), ref_loss), u=(u, ref_u), dudt=(du, ref_dudt), grads=grads)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:  # closed while the interpreter is alive (pytorch/pytorch#190489: gloo can abort at exit)
        torch.distributed.destroy_process_group()


def test_zero3_leaf_blocks_on_two_processes(tmp_path: Path):
    """DeepSpeed ZeRO-3 (raw engine, 2 CPU processes): each adapter block is a ZeRO-3 leaf, partitioned
    about half per rank; loss, gradients and the forward-AD du/dt equal the unsharded model's."""
    ranks = spawn(_zero3_worker, tmp_path, "ZeRO-3")
    for kind in KINDS:
        for rank, res in enumerate(ranks):
            r, where = res[kind], f"{kind} rank {rank}"
            assert r["leaves"], where
            for b, (held, full) in enumerate(r["held"]):
                assert 0.35 * full <= held <= 0.65 * full, (where, b, held, full)
            for key in ("loss", "u", "dudt"):
                got, want = r[key]
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where} {key}: {m}")
            for i, (got, want) in enumerate(r["grads"]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{where} grad {i}: {m}")


def test_activation_checkpointing_per_block_keeps_gradients():
    for kind in KINDS:
        inp = inputs(kind)
        results = []
        for checkpointed in (False, True):
            model = build(kind)
            keys = list(model.state_dict())
            if checkpointed:
                checkpoint_blocks(model)
            saved = 0

            def pack(t: Tensor) -> Tensor:
                nonlocal saved
                saved += t.numel()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = run(model, inp).square().mean()
            loss.backward()
            assert list(model.state_dict()) == keys  # checkpointing renames nothing
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, saved))
        (loss, grads, saved), (loss_c, grads_c, saved_c) = results
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-6, atol=1e-8, msg=lambda m: f"{kind} {name}: {m}")
        assert saved_c < 0.5 * saved, (kind, saved_c, saved)  # the blocks recompute instead of keeping tensors


def test_block_routing_keeps_keys_copies_and_diffusers_forward():
    from diffusers import HunyuanVideoTransformer3DModel

    model = build("hunyuan_video")
    plain = HunyuanVideoTransformer3DModel.from_config(model.model.config)
    # the adapter's keys are diffusers' own under `model.` plus its r embedder
    assert {k for k in model.state_dict() if k.startswith("model.")} == {f"model.{k}" for k in plain.state_dict()}
    for block in model.shard_blocks():  # the class is diffusers' own (its cache hooks look blocks up by class)
        assert type(block).__module__.startswith("diffusers."), type(block)
    twin = copy.deepcopy(model)
    for a, b in zip(model.shard_blocks(), twin.shard_blocks()):
        assert a.forward.__self__ is a and b.forward.__self__ is b  # a copy's blocks run their own weights
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        inp = inputs("hunyuan_video")
        assert not torch.allclose(run(twin, inp), run(model, inp))
        # diffusers' own block forward still serves native_forward (a model without the r embedder)
        native = HunyuanVideoBackbone(copy.deepcopy(model.model))
        torch.testing.assert_close(native.native_forward(inp["x"], inp["t"], inp["text"], inp["guidance"]),
                                   run(native, {**inp, "r": None}), rtol=1e-5, atol=1e-5)


def test_backbones_without_blocks_are_refused_and_adapters_host_stage3():
    import pytest

    from distributed.strategies import FSDP2, check_stage_host

    with pytest.raises(TypeError, match="cannot FSDP2-shard a Linear: it lists no per-block sharding units"):
        fully_shard_backbone(nn.Linear(2, 2), mesh=None)
    for kind in KINDS:  # stage 3 under FSDP2 is no longer refused for the adapters
        check_stage_host("predictor_gan", FSDP2(), build(kind))
