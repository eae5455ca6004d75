"""`make gpu-check`: every GPU measurement of the fused JVP attention kernel (issue 21) in one short run,
written to a JSON and printed as a table for BENCHMARKS.md. Nothing is downloaded and nothing is estimated:
a row appears only if it was measured on this device.

    python benchmarks/gpu_check.py --out results/gpu_check.json     # on a CUDA GPU (make gpu-check)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/g.json   # CPU, toy size

Rows:
  check      the kernel (`models.jvp.attention_jvp(..., backend="triton")`) against the float64 reference
             (`models.jvp_triton.reference_attention_jvp`) at `--check_tokens`, D = `--head_dim`, with padded
             keys, in values and tangents (max error / max |reference|), fp32 and bf16
  attention  one JVP attention call at each of `--tokens` (24 heads x 128, bf16; a length is skipped, and
             said so, when its inputs would not fit in free memory): the kernel, the blocked rule and, as the
             physical reference, SDPA's fused forward; time and peak memory above the inputs
             (targets: kernel <= 3.5x SDPA forward; >= 5x faster than the blocked rule at 67k; memory O(N):
             the kernel's peak extra memory <= 1.5x its outputs O and dO)
  stage2     the stage-2 step (teacher forward + forward-AD JVP with the kernel + student forward+backward)
             over a plain forward+backward, at the HunyuanVideo shape of benchmarks/gpu_scale.py
             (target <= 2.0x); the same step with the blocked rule beside it
  block      one sequence-parallel-free HunyuanVideo double block (24 heads x 128) at the stage-2 length:
             the bytes its forward saves for backward (every saved tensor's storage counted once) and, on a GPU,
             the allocated memory the forward leaves behind, beside the planner's estimate for one block
             (`distributed.planner.activation_bytes`: 34 s h bytes; Korthikanti et al. 2022)
  smoke      stages 0-3 smoke configs through train.py on CUDA in bf16-mixed (exit code and seconds)
  extra      measurements other work registers with `register_measurement(name, fn)`: fn(args) returns
             rows (dicts) for the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_scale import step_functions, timed  # noqa: E402
from models.jvp import attention_jvp  # noqa: E402
from models.jvp_triton import interpreter_active, reference_attention_jvp  # noqa: E402

SMOKE_STAGES = ("teacher_pretrain", "cfg_distill", "restricted_meanflow", "predictor_gan")
TARGETS = {"kernel_over_sdpa_forward": 3.5, "blocked_over_kernel_at_67k": 5.0, "stage2_over_fwd_bwd": 2.0,
           "kernel_memory_over_outputs": 1.5}  # peak extra memory of the kernel / its outputs' size: O(N)
_EXTRA: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}


def register_measurement(name: str, fn: Callable[[argparse.Namespace], list[dict]]) -> None:
    """Add a measurement to the run: `fn(args)` returns table rows (dicts with at least 'what')."""
    _EXTRA[name] = fn


def fitting_lengths(lengths: list[int], heads: int, head_dim: int, bytes_per_element: int,
                    free_bytes: int | None, tensors: int = 10) -> tuple[list[int], list[int]]:
    """(lengths whose `tensors` (1, heads, N, head_dim) buffers (6 inputs, 2 outputs each for kernel and SDPA)
    fit in 80 % of free memory, lengths skipped); free_bytes None = no limit (CPU)."""
    fits = [n for n in lengths if free_bytes is None or tensors * heads * n * head_dim * bytes_per_element
            <= 0.8 * free_bytes]
    return fits, [n for n in lengths if n not in fits]


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def peak_extra(fn, device: str) -> float | None:
    """Peak memory allocated by fn above what was allocated before it (GiB; None off CUDA)."""
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def check_rows(args) -> list[dict]:
    gen = torch.Generator(device=args.device).manual_seed(0)
    n, shape = args.check_tokens, (1, args.heads, args.check_tokens, args.head_dim)
    x = [torch.randn(shape, generator=gen, device=args.device) for _ in range(6)]
    mask = (torch.arange(n, device=args.device) < n - n // 7)[None, None, None, :]  # padded keys
    rows = []
    for dtype, target in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        cast = [t.to(dtype) for t in x]
        out, tan = attention_jvp(*cast, mask, backend="triton")
        ref, ref_t = reference_attention_jvp(*cast, mask)
        err = max(relative(out, ref), relative(tan, ref_t))
        rows.append({"what": f"kernel vs float64 reference, {n} tokens, D {args.head_dim}, {dtype}".replace("torch.", ""),
                     "value_rel": relative(out, ref), "tangent_rel": relative(tan, ref_t),
                     "target": f"<= {target:g}", "ok": err <= target})
    return rows


def attention_rows(args) -> list[dict]:
    dtype = torch.float32 if args.tiny else torch.bfloat16
    free = torch.cuda.mem_get_info()[0] if args.device.startswith("cuda") else None
    lengths, skipped = fitting_lengths(args.tokens, args.heads, args.head_dim, dtype.itemsize, free)
    rows = [{"what": f"attention at {n} tokens skipped", "reason": "inputs would not fit in free memory"}
            for n in skipped]
    for n in lengths:
        full = [torch.randn(1, args.heads, n, args.head_dim, device=args.device, dtype=dtype) for _ in range(6)]
        kernel = lambda: attention_jvp(*full, backend="triton")  # noqa: E731
        blocked = lambda: attention_jvp(*full, backend="blocked")  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(*full[:3])  # noqa: E731
        t = {name: timed(fn, args.device, args.warmup, args.repeats)
             for name, fn in (("kernel", kernel), ("blocked", blocked), ("sdpa_forward", sdpa))}
        mem = {name: peak_extra(fn, args.device) for name, fn in (("kernel", kernel), ("blocked", blocked),
                                                                   ("sdpa_forward", sdpa))}
        outputs_gib = 2 * full[0].numel() * dtype.itemsize / 2 ** 30  # O and dO: what O(N) memory means
        row = {"what": f"JVP attention, {n} tokens, {args.heads} heads x {args.head_dim}, {dtype}".replace("torch.", ""),
               "tokens": n, **{f"{k}_s": v for k, v in t.items()}, **{f"{k}_peak_extra_gib": v for k, v in mem.items()},
               "kernel_over_sdpa_forward": t["kernel"] / t["sdpa_forward"],
               "blocked_over_kernel": t["blocked"] / t["kernel"],
               "kernel_memory_over_outputs": None if mem["kernel"] is None else mem["kernel"] / outputs_gib}
        row["ok"] = row["kernel_over_sdpa_forward"] <= TARGETS["kernel_over_sdpa_forward"] and (
            n < 60000 or row["blocked_over_kernel"] >= TARGETS["blocked_over_kernel_at_67k"]) and (
            mem["kernel"] is None or row["kernel_memory_over_outputs"] <= TARGETS["kernel_memory_over_outputs"])
        rows.append(row)
        del full
    return rows


def stage2_rows(args) -> list[dict]:
    steps = step_functions(args)
    x_t, fwd_bwd, stage2 = steps.x_t, steps.fwd_bwd, steps.stage2
    t_fb = timed(fwd_bwd, args.device, args.warmup, args.repeats)
    t_kernel = timed(stage2("triton"), args.device, args.warmup, args.repeats)
    t_blocked = timed(stage2("blocked"), args.device, args.warmup, args.repeats)
    n = x_t[0, 0].numel() // 4 + args.text_tokens
    return [{"what": f"stage-2 step over forward+backward, HunyuanVideo-shaped ({args.double}+{args.single} blocks, "
                     f"~{n} tokens)", "fwd_bwd_s": t_fb, "stage2_kernel_s": t_kernel, "stage2_blocked_s": t_blocked,
             "stage2_over_fwd_bwd": t_kernel / t_fb, "stage2_blocked_over_fwd_bwd": t_blocked / t_fb,
             "target": f"<= {TARGETS['stage2_over_fwd_bwd']}", "ok": t_kernel / t_fb <= TARGETS["stage2_over_fwd_bwd"]}]


def block_rows(args) -> list[dict]:
    """One SP-free block's activation memory beside the planner's estimate (module docstring, `block`)."""
    from distributed.planner import activation_bytes

    steps = step_functions(argparse.Namespace(**{**vars(args), "double": 1, "single": 0}))
    saved: dict[int, int] = {}  # storage -> bytes: a tensor saved twice is held once
    weights = {p.untyped_storage().data_ptr() for p in steps.student.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:  # activations only (bf16 weight casts do count)
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = steps.forward()
    left = torch.cuda.memory_allocated() - before - out.untyped_storage().nbytes() if cuda else None
    del out
    tokens = steps.x_t[0, 0].numel() // 4 + args.text_tokens
    planner = activation_bytes([steps.student], tokens, args.batch, checkpointing=False)  # one block: 34 s h
    ratio = sum(saved.values()) / planner
    return [{"what": f"one SP-free HunyuanVideo double block, {tokens} tokens: saved for backward vs the planner",
             "saved_bytes": sum(saved.values()), "forward_left_bytes": left, "planner_bytes": planner,
             "saved_over_planner": ratio}]


def smoke_rows(args) -> list[dict]:
    rows = []
    for stage in SMOKE_STAGES:
        root = Path(args.smoke_dir) / stage
        cmd = [sys.executable, "train.py", "--config", f"configs/smoke/{stage}.yaml", "--trainer.accelerator", "gpu",
               "--trainer.devices", "1", "--trainer.precision", "bf16-mixed", "--trainer.default_root_dir", str(root)]
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        rows.append({"what": f"smoke {stage} on CUDA, bf16-mixed", "rc": rc.returncode,
                     "seconds": time.perf_counter() - start, "ok": rc.returncode == 0,
                     **({"stderr_tail": rc.stderr[-2000:]} if rc.returncode else {})})
    return rows


def table(rows: list[dict]) -> str:
    """A markdown table: one line per row, its numbers as 'key value' pairs."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| measurement | result | ok |", "|---|---|---|"]
    for row in rows:
        rest = ", ".join(f"{k} {cell(v)}" for k, v in row.items() if k not in ("what", "ok", "section", "stderr_tail")
                         and v is not None)
        lines.append(f"| {row['what']} | {rest} | {'' if 'ok' not in row else 'yes' if row['ok'] else 'NO'} |")
    return "\n".join(lines)


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/gpu_check.json", help="the JSON written")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 67576],
                        help="sequence lengths of the attention timing (67,576 = 540p x 129 frames)")
    parser.add_argument("--check_tokens", type=int, default=4096, help="sequence of the float64 check")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks of the stage-2 model")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks of the stage-2 model")
    parser.add_argument("--stage2_tokens", type=int, default=16384, help="video tokens of the stage-2 step")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--text_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke_dir", default="outputs/gpu_check/smoke")
    parser.add_argument("--no_smoke", action="store_true", help="skip the stages 0-3 smoke runs")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, fp32, no smoke runs: a CPU run under "
                                                            "TRITON_INTERPRET=1 of the same code")
    args = parser.parse_args(argv)
    args.heads, args.head_dim = (2, 16) if args.tiny else (24, 128)
    if args.tiny:
        args.tokens, args.check_tokens, args.stage2_tokens = [40, 100], 50, 64
        args.height, args.width, args.text_tokens, args.warmup, args.repeats = 8, 8, 8, 0, 1
        args.no_smoke = True
    if args.stage2_tokens % (args.height // 2 * args.width // 2):
        raise ValueError(f"--stage2_tokens {args.stage2_tokens} must be a multiple of the tokens per latent frame "
                         f"({args.height // 2} x {args.width // 2} at patch 2)")
    if min(args.tokens + [args.check_tokens]) < 1:
        raise ValueError(f"--tokens and --check_tokens must be >= 1, got {args.tokens} and {args.check_tokens}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.device == "cpu" and not interpreter_active():
        raise ValueError("gpu_check --device cpu runs the Triton kernel in its interpreter, which is off: start it "
                         "with TRITON_INTERPRET=1 in the environment (or run it on a CUDA GPU)")
    import triton
    record = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "args": vars(args), "rows": []}
    build_args = argparse.Namespace(**{**vars(args), "tokens": args.stage2_tokens})
    sections = [("check", check_rows, args), ("attention", attention_rows, args), ("stage2", stage2_rows, build_args),
                ("block", block_rows, build_args)]
    if not args.no_smoke:
        sections.append(("smoke", smoke_rows, args))
    sections += [(name, fn, args) for name, fn in _EXTRA.items()]
    for name, fn, section_args in sections:
        rows = fn(section_args)
        record["rows"] += [{"section": name, **row} for row in rows]
        write_json(Path(args.out), record)  # after every section: a later failure keeps what was measured
    print(f"{record['device']}, torch {record['torch']}, triton {record['triton']}")
    print(table(record["rows"]))
    return record


if __name__ == "__main__":
    main()
