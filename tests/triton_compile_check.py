"""Compile the JVP attention kernel for a CUDA target without a GPU (Triton's compiler and ptxas ship in its
wheel): catches what the interpreter does not check (constexpr-only globals, types, shared memory). Run
WITHOUT TRITON_INTERPRET; prints one JSON line per configuration (the launcher's own block sizes).

    python tests/triton_compile_check.py
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from models.jvp_triton import _jvp_attention_kernel, _pad, block_sizes  # noqa: E402

POINTERS = ("Q", "K", "V", "DQ", "DK", "DV", "O", "DO")
CONSTEXPRS = ("HAS_DQ", "HAS_DK", "HAS_DV", "HAS_DS", "MASK_KIND", "MASK_ROWS", "PRECISION", "BLOCK_M", "BLOCK_N",
              "PAD_QK", "PAD_V")
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_kernel(dtype: torch.dtype, head_dim: int, n: int = 16384, arch: int = 90) -> dict:
    names, ty = _jvp_attention_kernel.arg_names, TRITON_TYPE[dtype]
    pad = _pad(head_dim)
    bm, bn, warps, stages = block_sizes(n, n, pad, pad, dtype, interpreted=False)
    values = dict(HAS_DQ=True, HAS_DK=True, HAS_DV=True, HAS_DS=True, MASK_KIND=1, MASK_ROWS=False,
                  PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn, PAD_QK=pad, PAD_V=pad)
    signature = {name: (f"*{ty}" if name in POINTERS else "*u8" if name == "MASK" else "fp32" if name == "scale"
                        else "constexpr" if name in CONSTEXPRS else "i32") for name in names}
    source = ASTSource(fn=_jvp_attention_kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in values.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    return {"dtype": ty, "head_dim": head_dim, "arch": arch, "blocks": [bm, bn, warps, stages],
            "shared_bytes": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}


if __name__ == "__main__":  # default: the training path (bf16, D 128); `all` adds fp32 / fp16 / other head dims
    configs = ((torch.bfloat16, 128),) if sys.argv[1:] != ["all"] else (
        (torch.bfloat16, 128), (torch.float32, 128), (torch.float16, 64), (torch.bfloat16, 256), (torch.float32, 16))
    for dtype, head_dim in configs:
        print(json.dumps(compile_kernel(dtype, head_dim)))
