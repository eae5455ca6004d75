"""Ulysses sequence parallelism (distributed/sequence_parallel.py) on 2 gloo CPU processes (one SP group of 2).

One spawn runs every check (process start-up dominates): each rank computes the unsplit reference itself and
the sequence-parallel result, in float64 where the check is exactness. Gradients: every rank backpropagates the
same loss, so the ranks' gradients sum to 2x the unsplit gradient (module docstring of sequence_parallel.py).
"""
from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _attention_checks(state) -> dict[str, float]:
    """Ulysses attention with text tokens and an odd image length (padding) against math attention."""
    import torch.autograd.forward_ad as fwAD

    from distributed import sequence_parallel as sp
    from models.layers import attention
    from models.protocol import Tokens

    gen = torch.Generator().manual_seed(0)
    b, h, d, n_img, n_txt = 2, 4, 8, 7, 3
    img = torch.randn(b, n_img, 3, h, d, generator=gen, dtype=torch.float64)  # q, k, v of the image tokens
    txt = torch.randn(b, n_txt, 3, h, d, generator=gen, dtype=torch.float64)
    txt_mask = torch.tensor([[True, True, False], [True, True, True]])
    w = torch.randn(b, h, n_img + n_txt, d, generator=gen, dtype=torch.float64)
    t_img, t_txt = torch.randn(img.shape, generator=gen, dtype=img.dtype), torch.randn(txt.shape, generator=gen, dtype=txt.dtype)

    def run(img_: torch.Tensor, txt_: torch.Tensor, split: bool) -> torch.Tensor:
        with sp.activate(state if split else None):
            tokens = sp.shard(Tokens(img=img_, txt=txt_, txt_mask=txt_mask, grid=(1, 1, n_img)))
            n = tokens.num_img
            qkv = torch.cat([tokens.img, tokens.txt], 1).permute(2, 0, 3, 1, 4)  # (3, B, h, n + L, D)
            key_mask = torch.cat([torch.ones(b, n, dtype=torch.bool), txt_mask], 1)
            out = attention(*qkv, key_mask, "math", sharded_tokens=n)  # (B, h, n + L, D)
            hidden, _ = sp.gather(out.transpose(1, 2).flatten(2))
            return hidden.unflatten(2, (h, d)).transpose(1, 2)

    checks = {}
    ref, got = run(img, txt, False), run(img, txt, True)
    checks["attention_value"] = rel(got, ref)
    # backward: the ranks' gradients sum to S x the unsplit gradient
    grads = []
    for split in (False, True):
        x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
        (run(x, y, split) * w).sum().backward()
        grads.append(torch.cat([x.grad.flatten(), y.grad.flatten()]))
    summed = grads[1].clone()
    dist.all_reduce(summed)
    checks["attention_grad"] = rel(summed / state.size, grads[0])
    # forward-mode AD through the Function's jvp
    tangents = []
    for split in (False, True):
        with fwAD.dual_level():
            out = run(fwAD.make_dual(img, t_img), fwAD.make_dual(txt, t_txt), split)
            tangents.append(fwAD.unpack_dual(out).tangent.clone())
    checks["attention_jvp_forward_ad"] = rel(tangents[1], tangents[0])
    _, func_tangent = torch.func.jvp(lambda x, y: run(x, y, True), (img, txt), (t_img, t_txt))
    checks["attention_jvp_func"] = rel(func_tangent, tangents[0])
    return checks


def _backbones() -> dict:
    from models.hunyuan_video import HunyuanVideoBackbone
    from models.mmdit import MMDiT
    from models.wan import WanBackbone
    from tests.conftest import perturb
    from tests.tiny_pipelines import tiny_hunyuan_transformer_config, tiny_wan_transformer_config

    torch.manual_seed(0)
    mmdit = MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True, "r_embed": "average"})
    hunyuan = HunyuanVideoBackbone.from_config({"diffusers_config": tiny_hunyuan_transformer_config(),
                                                "r_embed": "average"})
    wan = WanBackbone.from_config({"diffusers_config": tiny_wan_transformer_config(), "guidance_embed": True,
                                   "r_embed": "average"})
    # (model, video shape, text dim): MMDiT 3 image tokens, HunyuanVideo 2 x 3 x 1 = 6 and 5 tokens, Wan 1 x 3 x 2 = 6
    return {"mmdit": (perturb(mmdit, seed=1), (3, 1, 12, 4), 384),
            "mmdit_even": (perturb(mmdit, seed=1), (3, 2, 8, 4), 384),
            "hunyuan_video": (perturb(hunyuan, seed=2), (4, 1, 5, 1), 16),
            "hunyuan_video_even": (perturb(hunyuan, seed=2), (4, 2, 3, 1), 16),
            "wan": (perturb(wan, seed=3), (4, 1, 6, 2), 16)}


def _dudt_checks(state) -> dict[str, float]:
    """Stage 2's du/dt (forward-mode AD with the explicit JVP rules) under S = 2 against the unsplit one."""
    from distributed import sequence_parallel as sp
    from losses.meanflow import meanflow_dudt
    from models.protocol import TextCond

    checks = {}
    for name, (model, shape, text_dim) in _backbones().items():
        gen = torch.Generator().manual_seed(5)
        b = 2
        x = torch.randn(b, *shape, generator=gen)
        v = torch.randn(b, *shape, generator=gen)
        mask = torch.ones(b, 4, dtype=torch.bool)
        mask[0, 3:] = False
        text = TextCond(torch.randn(b, 4, text_dim, generator=gen), mask, torch.randn(b, 8 if text_dim == 16 else 384,
                                                                                         generator=gen))
        t = torch.tensor([0.7, 0.4])
        r, g = t - torch.tensor([0.2, 0.1]), torch.tensor([2.0, 5.0])

        def u_fn(x_, r_, t_):
            return model.run(x_, t_, text, r=r_, guidance=g).velocity

        outs = []
        for split in (False, True):
            with torch.no_grad(), sp.activate(state if split else None):
                outs.append(meanflow_dudt(u_fn, x, r, t, v, "forward_ad"))
        checks[f"{name}_u"] = rel(outs[1][0], outs[0][0])
        checks[f"{name}_dudt"] = rel(outs[1][1], outs[0][1])
        if name == "mmdit":  # parameter gradients of an ordinary training forward
            grads = []
            for split in (False, True):
                model.zero_grad()
                with sp.activate(state if split else None):
                    (u_fn(x, r, t) * v).sum().backward()
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            dist.all_reduce(grads[1])
            checks["mmdit_param_grad"] = rel(grads[1] / state.size, grads[0])
    return checks


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from distributed import sequence_parallel as sp

        mesh = sp.groups(WORLD)
        state = sp.SequenceParallel(mesh["sp"].get_group())
        checks = {**_attention_checks(state), **_dudt_checks(state)}
        if rank == 0:
            torch.save(checks, out)
    except Exception:
        if rank == 0:
            torch.save({"error": traceback.format_exc()}, out)
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sp") / "checks.pt"
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    result = torch.load(out)
    assert "error" not in result, result.get("error")
    return result


def test_all_to_all_attention_matches_unsplit_value_gradient_and_jvp(checks):
    """Text tokens whole, 7 image tokens over 2 ranks (one padded), float64: value, gradient and both JVPs."""
    for key in ("attention_value", "attention_grad", "attention_jvp_forward_ad", "attention_jvp_func"):
        assert checks[key] < 1e-12, (key, checks[key])


@pytest.mark.parametrize("backbone", ["mmdit", "mmdit_even", "hunyuan_video", "hunyuan_video_even", "wan"])
def test_stage2_dudt_under_sequence_parallel_matches_unsplit(checks, backbone):
    """du/dt (and u) of the MMDiT, the HunyuanVideo and the Wan adapters with S = 2, odd and even lengths."""
    assert checks[f"{backbone}_u"] < 1e-5, checks[f"{backbone}_u"]
    assert checks[f"{backbone}_dudt"] < 1e-5, checks[f"{backbone}_dudt"]


def test_parameter_gradients_under_sequence_parallel_sum_to_unsplit(checks):
    assert checks["mmdit_param_grad"] < 1e-5, checks["mmdit_param_grad"]
