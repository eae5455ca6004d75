"""The checks of tests/test_triton_jvp_attention.py that run the Triton kernel, in one process started with
TRITON_INTERPRET=1 (Triton reads it when it is imported, and the pytest process has imported it already
through Lightning, without it): the kernel against the float64 reference over a grid of shapes, masks,
tangents and dtypes; stage 2's du/dt with the kernel against the blocked rule on the tiny MMDiT, HunyuanVideo
and Wan; and benchmarks/gpu_check.py at toy size. Writes one JSON of measured errors for the tests to judge.

    TRITON_INTERPRET=1 python tests/triton_interpreted_checks.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from models.jvp import attention_jvp, merge_key_padding  # noqa: E402
from models.jvp_triton import interpreter_active, reference_attention_jvp, unsupported_reason  # noqa: E402

# name: (B, H, N_q, N_k, D, mask kind, tangents given, dtype, block_m, block_n); blocks None = the launcher's
CASES = {
    "n1": (1, 2, 1, 1, 16, None, "qkv", torch.float32, None, None),
    "n1_query_many_keys": (2, 1, 1, 70, 32, "key_padding", "qkv", torch.float32, None, None),
    "tail_100_blocks_32": (2, 3, 100, 100, 32, None, "qkv", torch.float32, 32, 32),
    "tail_37_53_blocks_16": (1, 2, 37, 53, 64, None, "qkv", torch.float32, 16, 16),
    "nq_ne_nk_key_padding": (2, 2, 45, 77, 24, "key_padding", "qkv", torch.float32, 16, 32),
    "padded_keys_head_dim_128": (2, 2, 100, 100, 128, "key_padding", "qkv", torch.float32, None, None),
    "key_padding_mask_argument": (3, 2, 100, 100, 128, "key_padding_2d", "qkv", torch.float32, None, None),
    "bool_full_mask": (1, 2, 20, 30, 8, "bool_full", "qkv", torch.float32, None, None),
    "additive_mask": (2, 2, 33, 40, 40, "additive", "qkv", torch.float32, 16, 16),
    "tangent_q_only": (2, 2, 50, 50, 16, "key_padding", "q", torch.float32, None, None),
    "tangent_k_only": (1, 2, 50, 19, 16, None, "k", torch.float32, None, None),
    "tangent_v_only": (1, 2, 19, 50, 16, None, "v", torch.float32, None, None),
    "absent_tangents": (1, 2, 30, 30, 16, "key_padding", "", torch.float32, None, None),
    "zero_tangents": (1, 2, 30, 30, 16, "key_padding", "zero", torch.float32, None, None),
    "float16": (2, 2, 70, 70, 64, "key_padding", "qkv", torch.float16, None, None),
    "bfloat16": (2, 2, 70, 70, 64, "key_padding", "qkv", torch.bfloat16, None, None),
}
RANDOM_SHAPES = 4  # drawn from a seeded generator: lengths 1..160, head dims of the backbones and odd ones


def make_inputs(b, h, n_q, n_k, d, mask_kind, tangents, gen):
    q, dq = (torch.randn(b, h, n_q, d, generator=gen) for _ in range(2))
    k, v, dk, dv = (torch.randn(b, h, n_k, d, generator=gen) for _ in range(4))
    if tangents == "zero":
        dq, dk, dv = torch.zeros_like(dq), torch.zeros_like(dk), torch.zeros_like(dv)
    else:
        dq, dk, dv = (x if name in tangents else None for x, name in ((dq, "q"), (dk, "k"), (dv, "v")))
    valid = torch.randint(1, n_k + 1, (b,), generator=gen)
    valid[0] = max(1, n_k // 2)  # at least one row with padded keys
    mask = {None: None,
            "key_padding": (torch.arange(n_k)[None] < valid[:, None])[:, None, None, :],
            "key_padding_2d": torch.arange(n_k)[None] < valid[:, None],  # attention_jvp's key_padding_mask
            "bool_full": torch.rand(b, h, n_q, n_k, generator=gen) > 0.3,
            "additive": torch.randn(b, 1, n_q, n_k, generator=gen)}[mask_kind]
    if mask_kind == "bool_full":
        mask[..., 0] = True
    return q, k, v, dq, dk, dv, mask


def relative(x: Tensor, ref: Tensor) -> float:
    scale = ref.abs().max().item()
    err = (x.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def kernel_case(name, b, h, n_q, n_k, d, mask_kind, tangents, dtype, bm, bn, gen) -> dict:
    q, k, v, dq, dk, dv, mask = make_inputs(b, h, n_q, n_k, d, mask_kind, tangents, gen)
    cast = [None if x is None else x.to(dtype) for x in (q, k, v, dq, dk, dv)]
    if mask_kind == "key_padding_2d":
        out, tan = attention_jvp(*cast, backend="triton", key_padding_mask=mask)
        mask = merge_key_padding(None, mask)
    elif bm is None:
        out, tan = attention_jvp(*cast, mask, backend="triton")  # the dispatch, the launcher's own blocks
    else:
        from models.jvp_triton import triton_attention_jvp
        out, tan = triton_attention_jvp(*cast, mask, block_m=bm, block_n=bn)
    assert unsupported_reason(*cast, mask) is None, (name, unsupported_reason(*cast, mask))  # no fallback
    ref, ref_t = reference_attention_jvp(*(None if x is None else x.to(dtype) for x in (q, k, v, dq, dk, dv)),
                                         mask)
    return {"shape": [b, h, n_q, n_k, d], "mask": mask_kind, "tangents": tangents, "dtype": str(dtype),
            "value_rel": relative(out, ref), "tangent_rel": relative(tan, ref_t),
            "tangent_ref_max": ref_t.abs().max().item(), "tangent_max": tan.abs().max().item(),
            "out_dtype": str(out.dtype), "out_shape": list(out.shape), "tangent_shape": list(tan.shape)}


def kernel_checks() -> dict:
    gen = torch.Generator().manual_seed(0)
    results = {name: kernel_case(name, *spec, gen) for name, spec in CASES.items()}
    draw = torch.Generator().manual_seed(2026)
    for i in range(RANDOM_SHAPES):
        n_q, n_k = (int(torch.randint(1, 161, (1,), generator=draw)) for _ in range(2))
        d = [8, 16, 24, 64, 72, 128][int(torch.randint(0, 6, (1,), generator=draw))]
        results[f"random_{i}"] = kernel_case(f"random_{i}", 1, 2, n_q, n_k, d, "key_padding", "qkv",
                                             torch.float32, None, None, gen)
    return results


def stage2_dudt(family: str) -> dict:
    """du/dt of stage 2 (forward-AD JVP with the explicit rules, fp32) with the kernel vs the blocked rule."""
    from losses.meanflow import meanflow_dudt
    from models.layers import attention_backend
    from models.protocol import TextCond
    from tests.conftest import perturb, tiny_text

    gen = torch.Generator().manual_seed(3)
    if family == "mmdit":
        from models.mmdit import MMDiT
        torch.manual_seed(0)
        model = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4), "guidance_embed": True,
                                                    "r_embed": "average"})).eval()
        text, shape, kw = tiny_text(), (2, 3, 2, 8, 8), {"guidance": torch.tensor([2.0, 5.0])}
    else:
        from models.hunyuan_video import HunyuanVideoBackbone
        from models.wan import WanBackbone
        from tests.test_diffusers_adapters import L, POOL_DIM, TXT_DIM, _hv_model, _wan_model
        model = (HunyuanVideoBackbone(_hv_model(guidance_embeds=False)) if family == "hunyuan_video"
                 else WanBackbone(_wan_model())).eval()
        mask = torch.ones(2, L, dtype=torch.bool)
        mask[1, 4:] = False
        text = TextCond(torch.randn(2, L, TXT_DIM, generator=gen), mask, torch.randn(2, POOL_DIM, generator=gen))
        shape, kw = (2, 4, 3, 8, 8), {}
    x, v = (torch.randn(shape, generator=gen) for _ in range(2))
    t, r = torch.tensor([0.5, 0.75]), torch.tensor([0.25, 0.625])

    def u_fn(x_: Tensor, r_: Tensor, t_: Tensor) -> Tensor:
        return model.run(x_, t_, text, r=r_, **kw).velocity if family == "mmdit" else model.run(x_, t_, text).velocity

    out = {}
    with torch.no_grad():
        for name in ("sdpa", "triton"):
            with attention_backend(model, name):
                out[name] = meanflow_dudt(u_fn, x, r, t, v, "forward_ad",
                                          attention="triton" if name == "triton" else "blocked")
    (u_s, d_s), (u_t, d_t) = out["sdpa"], out["triton"]
    return {"dudt_rel": relative(d_t, d_s.double()), "u_rel": relative(u_t, u_s.double()),
            "dudt_max": d_s.abs().max().item()}


def main(out_dir: Path) -> None:
    if not interpreter_active():
        raise SystemExit("run with TRITON_INTERPRET=1 (Triton's interpreter runs the kernel on CPU tensors)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"interpreter_active": interpreter_active(), "kernel": kernel_checks(),
               "stage2": {f: stage2_dudt(f) for f in ("mmdit", "hunyuan_video", "wan")}}
    from models.jvp import _fallbacks_logged
    results["fallbacks"] = sorted(_fallbacks_logged)  # the kernel took every call above
    from benchmarks.gpu_check import main as gpu_check, register_measurement
    register_measurement("probe", lambda args: [{"what": "registered probe", "check_tokens": args.check_tokens}])
    gpu_check(["--tiny", "--device", "cpu", "--out", str(out_dir / "gpu_check.json")])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
