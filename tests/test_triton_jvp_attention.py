"""The fused JVP flash-attention kernel (models/jvp_triton.py, issue 21) on CPU in Triton's interpreter.

Triton decides at import whether kernels are interpreted, and this pytest process has imported it already
(Lightning does) without TRITON_INTERPRET: so the kernel runs in child processes started with
TRITON_INTERPRET=1 (tests/triton_interpreted_checks.py for the numerics, train.py for the smoke run), and the
rest of the suite never sees the variable. Checked: values and tangents = the float64 reference (fp32 rel
1e-4) over shapes with N = 1, tails, N_q != N_k, padded keys, full and additive masks, absent and zero
tangents, random lengths; stage 2's du/dt with the kernel = the blocked rule on the tiny MMDiT, HunyuanVideo
and Wan (rel 1e-5); the smoke run with `jvp_attention: triton` exports the `sdpa` run's weights; fallback,
bad settings and benchmarks/gpu_check.py's CPU-side parts."""
from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models.jvp
from benchmarks.gpu_check import fitting_lengths, parse, table
from models.jvp import attention_jvp
from tests.triton_interpreted_checks import CASES, RANDOM_SHAPES

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
PLAIN = {k: v for k, v in INTERPRETED.items() if k != "TRITON_INTERPRET"}
FP32_CASES = [n for n, spec in CASES.items() if spec[7] is torch.float32] + [f"random_{i}" for i in range(RANDOM_SHAPES)]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("triton_interpreted")
    proc = subprocess.run([sys.executable, "tests/triton_interpreted_checks.py", str(out)], cwd=ROOT,
                          env=INTERPRETED, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {**json.loads((out / "results.json").read_text()),
            "gpu_check": json.loads((out / "gpu_check.json").read_text()), "stdout": proc.stdout}


def test_triton_kernel_ran_interpreted_without_fallback(interpreted):
    assert interpreted["interpreter_active"] is True
    assert interpreted["fallbacks"] == []  # every call of the checks took the kernel


@pytest.mark.parametrize("case", FP32_CASES)
def test_triton_kernel_equals_float64_reference(interpreted, case):
    r = interpreted["kernel"][case]
    assert r["value_rel"] < 1e-4 and r["tangent_rel"] < 1e-4, r
    b, h, n_q, n_k, d = r["shape"]
    assert r["out_shape"] == r["tangent_shape"] == [b, h, n_q, d] and r["out_dtype"] == "torch.float32"
    if r["tangents"] not in ("", "zero"):
        assert r["tangent_ref_max"] > 1e-2  # a non-trivial tangent was compared


def test_triton_kernel_zero_and_absent_tangents_give_zero(interpreted):
    for case in ("absent_tangents", "zero_tangents"):
        r = interpreted["kernel"][case]
        assert r["tangent_max"] == 0.0 and r["value_rel"] < 1e-4, r


@pytest.mark.parametrize("case,tol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_triton_kernel_half_precision(interpreted, case, tol):
    r = interpreted["kernel"][case]
    assert r["out_dtype"] == f"torch.{case}"
    assert r["value_rel"] < tol and r["tangent_rel"] < tol, r


@pytest.mark.parametrize("family", ["mmdit", "hunyuan_video", "wan"])
def test_triton_stage2_dudt_equals_sdpa_rule(interpreted, family):
    r = interpreted["stage2"][family]
    assert r["dudt_rel"] < 1e-5 and r["u_rel"] < 1e-5 and r["dudt_max"] > 1e-2, r


def test_triton_gpu_check_runs_at_toy_size(interpreted):
    record = interpreted["gpu_check"]
    sections = [row["section"] for row in record["rows"]]
    assert sections == ["check", "check", "attention", "attention", "stage2", "block", "probe"]  # probe: the hook
    block = record["rows"][5]  # one SP-free block's activations beside the planner's 34 s h (fp32 here, no GPU)
    assert block["saved_bytes"] > 0 and block["planner_bytes"] == 34 * (64 + 8) * 32 and block["saved_over_planner"] > 0
    assert all(row["ok"] for row in record["rows"] if row["section"] == "check")
    attention = [row for row in record["rows"] if row["section"] == "attention"]
    assert [row["tokens"] for row in attention] == [40, 100] and all(row["kernel_s"] > 0 for row in attention)
    assert record["rows"][-1] == {"section": "probe", "what": "registered probe", "check_tokens": 50}
    assert record["rows"][4]["stage2_over_fwd_bwd"] > 0
    assert "| measurement | result | ok |" in interpreted["stdout"] and "registered probe" in interpreted["stdout"]


def test_triton_gpu_check_shape_logic_and_arguments():
    gib = 2 ** 30
    # 10 bf16 buffers of 24 heads x 128: 16,384 tokens = 0.94 GiB, 67,576 = 3.9 GiB
    assert fitting_lengths([16384, 67576], 24, 128, 2, 2 * gib) == ([16384], [67576])
    assert fitting_lengths([16384, 67576], 24, 128, 2, 80 * gib) == ([16384, 67576], [])
    assert fitting_lengths([16384, 67576], 24, 128, 2, None) == ([16384, 67576], [])
    args = parse(["--device", "cuda"])
    assert (args.heads, args.head_dim, args.tokens, args.no_smoke) == (24, 128, [16384, 67576], False)
    with pytest.raises(ValueError, match="--stage2_tokens 100 must be a multiple"):
        parse(["--stage2_tokens", "100"])
    text = table([{"what": "a", "x": 1.234567, "ok": True}, {"what": "b", "y": None, "ok": False}, {"what": "c"}])
    assert text.splitlines()[2:] == ["| a | x 1.235 | yes |", "| b |  | NO |", "| c |  |  |"]


def test_triton_kernel_compiles_for_a_cuda_target(tmp_path):
    """The GPU build (sm_90, bf16, D 128, the launcher's blocks) compiles to a cubin here, without a GPU."""
    proc = subprocess.run([sys.executable, "tests/triton_compile_check.py"], cwd=ROOT, capture_output=True, text=True,
                          env={**PLAIN, "TRITON_CACHE_DIR": str(tmp_path)}, timeout=600)  # a fresh compile
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "bf16" and result["head_dim"] == 128 and result["cubin_bytes"] > 0
    assert result["shared_bytes"] <= 100 * 1024  # fits every CUDA GPU's shared memory per block


def test_triton_unsupported_inputs_fall_back_to_the_blocked_rule(monkeypatch, caplog):
    monkeypatch.setattr(models.jvp, "_fallbacks_logged", set())
    gen = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 9, 300, generator=gen) for _ in range(6))  # head dim 300 > 256
    with caplog.at_level(logging.WARNING, logger="models.jvp"):
        out, tan = attention_jvp(q, k, v, dq, dk, dv, backend="triton")
        attention_jvp(q, k, v, dq, dk, dv, backend="triton")
    ref, ref_t = attention_jvp(q, k, v, dq, dk, dv, backend="blocked")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(tan, ref_t, rtol=0, atol=0)
    assert len(caplog.records) == 1 and "using the blocked rule" in caplog.records[0].getMessage()
    auto = attention_jvp(q, k, v, dq, dk, dv, backend="auto")  # CPU: the blocked rule, silently
    torch.testing.assert_close(auto[1], ref_t, rtol=0, atol=0)


def test_triton_key_padding_mask_merges_with_sdpa_masks():
    gen = torch.Generator().manual_seed(1)
    q, k, v, dq, dk, dv = (torch.randn(2, 2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(6))
    keys = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    additive = torch.randn(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    pairs = [(dict(key_padding_mask=keys), keys[:, None, None, :]),
             (dict(mask=additive, key_padding_mask=keys), additive.masked_fill(~keys[:, None, None, :], -1e300)),
             (dict(mask=keys[:, None, :, None].expand(2, 1, 6, 6), key_padding_mask=keys),
              keys[:, None, :, None] & keys[:, None, None, :])]
    for given, merged in pairs:
        for backend in ("blocked", "triton"):  # triton on CPU without the interpreter: the logged fallback
            out, tan = attention_jvp(q, k, v, dq, dk, dv, backend=backend, **given)
            ref, ref_t = attention_jvp(q, k, v, dq, dk, dv, merged, backend="blocked")
            torch.testing.assert_close((out, tan), (ref, ref_t), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(B, N_k\) bool"):
        attention_jvp(q, k, v, dq, dk, dv, key_padding_mask=keys.float())


def test_triton_unknown_backend_is_refused(tiny_mmdit):
    from lightning_modules.meanflow import RestrictedMeanFlowModule

    assert inspect.signature(RestrictedMeanFlowModule).parameters["jvp_attention"].default == "auto"  # stage 2's
    settings = [line.split("#")[0].split(":")[1].strip() for path in sorted((ROOT / "configs").rglob("*.yaml"))
                for line in path.read_text().splitlines() if line.strip().startswith("jvp_attention:")]
    assert settings and set(settings) == {"auto"}  # every stage-2 config that sets it
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unknown JVP attention backend 'flash'; expected one of"):
        attention_jvp(q, q, q, q, None, None, backend="flash")
    with pytest.raises(ValueError, match=r"jvp_attention 'flash' is not one of \('sdpa', 'math', 'triton', 'auto'\)"
                                         ".*set model.init_args.jvp_attention"):
        RestrictedMeanFlowModule(tiny_mmdit, jvp_attention="flash")
    with pytest.raises(ValueError, match="jvp_attention: auto.*set jvp_attention: math"):
        RestrictedMeanFlowModule(tiny_mmdit, jvp_attention="auto", jvp_method="func")


def smoke(tmp_path: Path, backend: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "--config", "configs/smoke/restricted_meanflow.yaml",
                           "--model.init_args.jvp_attention", backend, "--trainer.default_root_dir",
                           str(tmp_path / backend)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_triton_on_cpu_without_the_interpreter_is_refused_before_training(tmp_path):
    proc = smoke(tmp_path, "triton", PLAIN)
    assert proc.returncode != 0
    assert "jvp_attention: triton on CPU" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "triton" / "checkpoints").exists()


def test_triton_smoke_run_exports_the_sdpa_weights(tmp_path):
    """`TRITON_INTERPRET=1 python train.py --config configs/smoke/restricted_meanflow.yaml
    --model.init_args.jvp_attention triton` trains 20 steps and exports the weights of the `sdpa` run."""
    weights = {}
    for backend in ("sdpa", "triton"):
        proc = smoke(tmp_path, backend, INTERPRETED)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "using the blocked rule" not in proc.stderr  # the kernel took every attention call
        weights[backend] = load_file(tmp_path / backend / "export" / "model.safetensors")
    assert weights["sdpa"].keys() == weights["triton"].keys()
    scale = max(w.abs().max().item() for w in weights["sdpa"].values())
    err = max((weights["triton"][k].double() - w.double()).abs().max().item() for k, w in weights["sdpa"].items())
    assert err / scale < 1e-4, err / scale
