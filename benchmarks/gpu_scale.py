"""Scale benchmarks on one GPU (issue 10, item 7), on a HunyuanVideo-shaped transformer: width 3072
(24 heads x 128), `--double` double-stream and `--single` single-stream blocks, 4096-wide text tokens,
bf16 autocast over float32 weights (what `--trainer.precision bf16-mixed` runs), >= 16k video tokens.

    python benchmarks/gpu_scale.py                       # the GPU run (defaults: 16,384 video tokens)
    python benchmarks/gpu_scale.py --tiny                # a CPU smoke run of the same code at toy size

Prints three measurements:
  1. the JVP attention rule (`models.jvp.attention_jvp`, query blocks) against float64 `torch.func.jvp` of
     math attention at `--check_tokens`, values and tangents (max error / max reference), in float32 and bf16;
     and its time at the full sequence beside a fused SDPA forward;
  2. the stage-2 step (no-grad forward-AD JVP with the explicit rules, then the student's forward+backward)
     over a plain forward+backward of the same student (target <= 2.0x);
  3. stage-1 MFU: FLOPs of the CFG-distillation student's forward+backward (torch.utils.flop_counter)
     divided by its median time and by `--peak_tflops` (dense bf16 peak of the GPU; H100/H200 SXM: 989).
Times: median of `--repeats` after `--warmup`, synchronised. Nothing is estimated: a figure is printed
only if it was measured.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distributed.planner import HUNYUAN_VIDEO_13B  # noqa: E402
from losses.meanflow import meanflow_dudt, meanflow_target  # noqa: E402
from models.io import build_backbone  # noqa: E402
from models.jvp import attention_jvp  # noqa: E402
from models.layers import attention  # noqa: E402
from models.protocol import TextCond  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, text_embed_dim=32, pooled_projection_dim=16,
            rope_axes_dim=[4, 6, 6], in_channels=4, out_channels=4, num_refiner_layers=1)


def timed(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_attention(args) -> None:
    gen = torch.Generator(device=args.device).manual_seed(0)
    heads, dim = args.heads, args.head_dim
    shape = (1, heads, args.check_tokens, dim)
    q, k, v, dq, dk, dv = (torch.randn(shape, generator=gen, device=args.device, dtype=torch.float64) for _ in range(6))
    ref, ref_t = torch.func.jvp(lambda *qkv: attention(*qkv, None, "math"), (q, k, v), (dq, dk, dv))
    for dtype in (torch.float32, torch.bfloat16):
        out, tan = attention_jvp(*(x.to(dtype) for x in (q, k, v, dq, dk, dv)))
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        err_t = ((tan.double() - ref_t).abs().max() / ref_t.abs().max()).item()
        print(f"attention rule vs float64 torch.func.jvp (math), {args.check_tokens} tokens, {dtype}: "
              f"value {err:.2e}, tangent {err_t:.2e} (max error / max |reference|)")
    n = args.tokens + args.text_tokens
    full = [torch.randn(1, heads, n, dim, device=args.device, dtype=torch.bfloat16) for _ in range(6)]
    t_rule = timed(lambda: attention_jvp(*full), args.device, args.warmup, args.repeats)
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(*full[:3]), args.device, args.warmup, args.repeats)
    print(f"attention at {n} tokens, bf16: JVP rule (value + tangent) {t_rule * 1e3:.1f} ms, fused SDPA forward "
          f"{t_sdpa * 1e3:.1f} ms ({t_rule / t_sdpa:.2f}x)")


def build(args):
    dcfg = dict(HUNYUAN_VIDEO_13B, num_layers=args.double, num_single_layers=args.single, guidance_embeds=True,
                **(TINY if args.tiny else {}))
    torch.manual_seed(0)
    with torch.device(args.device):
        teacher = build_backbone({"type": "hunyuan_video", "diffusers_config": dcfg}).requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student.enable_r_embedding("average")
    gen = torch.Generator(device=args.device).manual_seed(0)
    c, p = dcfg["in_channels"], dcfg["patch_size"]
    frames = args.tokens // (args.height // p * args.width // p)
    x0 = torch.randn(args.batch, c, frames, args.height, args.width, generator=gen, device=args.device)
    text = TextCond(torch.randn(args.batch, args.text_tokens, dcfg["text_embed_dim"], generator=gen, device=args.device),
                    torch.ones(args.batch, args.text_tokens, dtype=torch.bool, device=args.device),
                    torch.randn(args.batch, dcfg["pooled_projection_dim"], generator=gen, device=args.device))
    t = torch.full((args.batch,), 0.7, device=args.device)
    r = torch.full((args.batch,), 0.6, device=args.device)
    g = torch.full((args.batch,), 6.0, device=args.device)
    n_params = sum(x.numel() for x in student.parameters())
    print(f"HunyuanVideo-shaped: width {dcfg['num_attention_heads'] * dcfg['attention_head_dim']}, {args.double} double + "
          f"{args.single} single blocks, {n_params / 1e9:.3f}B parameters; batch {args.batch}, latent {c}x{frames}x"
          f"{args.height}x{args.width} = {frames * (args.height // p) * (args.width // p)} video + {args.text_tokens} "
          f"text tokens; device {args.device}")
    return teacher, student, x0, text, t, r, g


def step_functions(args) -> SimpleNamespace:
    """The benchmark's steps at its shape, shared with gpu_check.py: `forward()` = the student's velocity with
    autograd (bf16 autocast on GPUs), `fwd_bwd()` = one plain forward+backward, `stage2(attention)` = one
    stage-2 step (teacher forward, no-grad forward-AD JVP with the `models.jvp` rules and that attention JVP
    backend, student forward+backward); also `student` and `x_t`."""
    teacher, student, x_t, text, t, r, g = build(args)
    amp = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=not args.tiny)
    target = torch.randn_like(x_t)

    def u_fn(x, r_, t_):
        return student.run(x, t_, text, r=r_, guidance=g).velocity

    def forward():
        with amp:
            return u_fn(x_t, r, t)

    def fwd_bwd():
        student.zero_grad(set_to_none=True)
        F.mse_loss(forward().float(), target).backward()

    def stage2(attention: str = "auto"):
        def step():
            student.zero_grad(set_to_none=True)
            with amp:
                with torch.no_grad():
                    v = teacher.run(x_t, t, text, guidance=g).velocity
                    _, dudt = meanflow_dudt(u_fn, x_t, r, t, v.to(x_t.dtype), "forward_ad", attention=attention)
                    u_tgt = meanflow_target(v.float(), dudt.float(), t, r)
                loss = F.mse_loss(u_fn(x_t, r, t).float(), u_tgt)
            loss.backward()
        return step

    return SimpleNamespace(student=student, x_t=x_t, forward=forward, fwd_bwd=fwd_bwd, stage2=stage2)


def step_benchmarks(args) -> None:
    steps = step_functions(args)
    fwd_bwd, stage2 = steps.fwd_bwd, steps.stage2("auto")  # what training uses: the fused kernel on CUDA, the blocked rule on CPU
    t_fb = timed(fwd_bwd, args.device, args.warmup, args.repeats)
    t_s2 = timed(stage2, args.device, args.warmup, args.repeats)
    print(f"student forward+backward {t_fb:.3f} s; stage-2 step (teacher forward + forward-AD JVP with "
          f"models.jvp rules, jvp_attention auto + forward+backward) {t_s2:.3f} s = {t_s2 / t_fb:.2f}x (target <= 2.0x)")

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fwd_bwd()
    flops = counter.get_total_flops()
    achieved = flops / t_fb
    line = f"stage-1 student forward+backward: {flops / 1e12:.1f} TFLOP per step, {achieved / 1e12:.1f} TFLOP/s"
    if args.peak_tflops:
        line += f", MFU {100 * achieved / (args.peak_tflops * 1e12):.1f} % of {args.peak_tflops:g} TFLOP/s (target >= 40 %)"
    print(line)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks")
    parser.add_argument("--tokens", type=int, default=16384, help="video tokens (latent frames x H/2 x W/2)")
    parser.add_argument("--height", type=int, default=64, help="latent height")
    parser.add_argument("--width", type=int, default=64, help="latent width")
    parser.add_argument("--text_tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--check_tokens", type=int, default=4096, help="sequence of the float64 attention check")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (0: no MFU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="toy sizes, float32, for a CPU smoke run")
    args = parser.parse_args(argv)
    args.heads, args.head_dim = (2, 16) if args.tiny else (24, 128)
    if args.tiny:
        args.tokens, args.height, args.width, args.text_tokens, args.check_tokens = 64, 8, 8, 8, 32
        args.warmup, args.repeats, args.peak_tflops = 1, 2, 0.0
    if args.tokens % (args.height // 2 * args.width // 2):
        raise ValueError(f"--tokens {args.tokens} must be a multiple of the tokens per latent frame "
                         f"({args.height // 2} x {args.width // 2} at patch 2)")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    check_attention(args)
    step_benchmarks(args)


if __name__ == "__main__":
    main()
