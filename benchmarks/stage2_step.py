"""Cost of one Restricted MeanFlow (stage-2) training step against a plain forward+backward.

    python benchmarks/stage2_step.py --size small --frames 6 --height 24 --width 24 --batch 8

Variants, all on the same student (an MMDiT with guidance and r embeddings):
  fwd+bwd         u = student(x_t, r, t); MSE to a fixed target; backward      (the reference)
  func+fwd+bwd    + du/dt by a no-grad torch.func.jvp (math attention) before it; v given (the first path)
  fwAD+fwd+bwd    the same with torch.autograd.forward_ad dual tensors and PyTorch's own forward-mode
                  rules (math attention; `explicit_rules=False`)
  rules+fwd+bwd   forward_ad with the explicit linear / attention rules of `models.jvp` (SDPA backend):
                  the stage-2 default (`jvp_method: forward_ad`, `jvp_attention: sdpa`), which also runs
                  under FSDP2 and ZeRO-3
  stage-2 step    RestrictedMeanFlowModule.loss_terms + backward: frozen teacher forward for v,
                  the default JVP, the student forward with grad, backward (what training runs)

Time: median of `--repeats` steps after `--warmup`, the variants interleaved so that background
load affects them alike; CUDA is synchronised around each step.

Peak memory of a step above what is live before it (models, inputs):
  CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the step.
  CPU:  torch keeps no CPU allocator statistics and tracemalloc sees only Python's own heap, not
        torch's tensor storage. Each variant therefore runs in a fresh process and reports the
        growth of the process high-water mark (getrusage ru_maxrss) over its steps. The child runs
        with MALLOC_MMAP_THRESHOLD_=65536, so glibc serves every tensor >= 64 KiB by mmap and
        returns it to the OS on free: RSS then follows live tensor memory instead of heap reuse.
        One-time costs (lazy imports of the JVP decompositions, thread pools) happen before the
        baseline is taken.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.meanflow import RestrictedMeanFlowModule  # noqa: E402
from losses.meanflow import meanflow_dudt, meanflow_target  # noqa: E402
from models.layers import attention_backend  # noqa: E402
from models.mmdit import MMDiT  # noqa: E402
from models.protocol import TextCond  # noqa: E402

VARIANTS = ("fwd+bwd", "func+fwd+bwd", "fwAD+fwd+bwd", "rules+fwd+bwd", "stage-2 step")


def build(args: argparse.Namespace) -> tuple[RestrictedMeanFlowModule, dict]:
    """A stage-2 module on a perturbed (non-trivial) guidance-distilled teacher, and one batch."""
    torch.manual_seed(0)
    teacher = MMDiT(size=args.size, config={"patch_size": (1, 4, 4), "guidance_embed": True})
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():  # adaLN-Zero and the zero head would make every output 0
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    module = RestrictedMeanFlowModule(teacher, r_embed="average", restrict=0.2).to(args.device)
    b, length = args.batch, 16
    batch = {"latents": torch.rand(b, 3, args.frames, args.height, args.width, generator=gen) * 2 - 1,
             "text_tokens": torch.randn(b, length, 384, generator=gen),
             "text_mask": torch.ones(b, length, dtype=torch.bool), "pooled": torch.randn(b, 384, generator=gen)}
    return module, {k: v.to(args.device) for k, v in batch.items()}


def make_step(variant: str, module: RestrictedMeanFlowModule, batch: dict):
    student = module.student
    text = TextCond(batch["text_tokens"], batch["text_mask"], batch["pooled"])
    s = module.sample_inputs(batch, torch.Generator(device=batch["latents"].device).manual_seed(0))
    x_t, t, r, g = s["x_t"], s["t"], s["r"], s["g"]
    v, target = torch.randn_like(x_t), torch.randn_like(x_t)

    def u_fn(x, r_, t_):
        return student.run(x, t_, text, r=r_, guidance=g).velocity

    def fwd_bwd() -> None:
        F.mse_loss(u_fn(x_t, r, t), target).backward()

    def jvp_fwd_bwd(method: str, explicit_rules: bool = False) -> None:
        with torch.no_grad(), attention_backend(student, "sdpa" if explicit_rules else "math"):
            _, dudt = meanflow_dudt(u_fn, x_t, r, t, v, method, explicit_rules=explicit_rules)
        F.mse_loss(u_fn(x_t, r, t), meanflow_target(v, dudt, t, r)).backward()

    def stage2() -> None:
        module.loss_terms(batch)["loss"].backward()

    fn = {"fwd+bwd": fwd_bwd, "func+fwd+bwd": lambda: jvp_fwd_bwd("func"),
          "fwAD+fwd+bwd": lambda: jvp_fwd_bwd("forward_ad"),
          "rules+fwd+bwd": lambda: jvp_fwd_bwd("forward_ad", explicit_rules=True), "stage-2 step": stage2}[variant]

    def step() -> None:
        student.zero_grad(set_to_none=True)
        fn()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(variant: str, args: argparse.Namespace, queue) -> None:
    """Child process: bytes above the pre-step level at the peak of `args.mem_steps` steps."""
    torch.set_num_threads(args.threads)
    module, batch = build(args)
    step = make_step(variant, module, batch)
    torch.func.jvp(torch.sin, (torch.ones(1),), (torch.ones(1),))  # one-time import before the baseline
    if args.device.startswith("cuda"):
        step()  # CUDA: allocate gradients and workspaces once; the peak is then per step
        sync(args.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.mem_steps):
            step()
        sync(args.device)
        queue.put(torch.cuda.max_memory_allocated() - base)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(args.mem_steps):
            step()
        queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)  # KiB on Linux


def measure_memory(variant: str, args: argparse.Namespace) -> int:
    ctx = mp.get_context("spawn")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the child at exec
    queue = ctx.Queue()
    proc = ctx.Process(target=peak_memory, args=(variant, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def measure_time(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    module, batch = build(args)
    steps = {v: make_step(v, module, batch) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.warmup + args.repeats):
        for v in VARIANTS:  # interleaved: background load hits all variants alike
            sync(args.device)
            start = time.perf_counter()
            steps[v]()
            sync(args.device)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="MMDiT size (models.mmdit.MMDIT_SIZES)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--height", type=int, default=24)
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mem_steps", type=int, default=2, help="steps in each memory-measuring process")
    args = parser.parse_args(argv)

    module, _ = build(args)
    n_params = sum(p.numel() for p in module.student.parameters())
    tokens = args.frames * (args.height // 4) * (args.width // 4)  # patch (1, 4, 4)
    print(f"MMDiT-{args.size} ({n_params / 1e6:.2f}M params), batch {args.batch}, video 3x{args.frames}x"
          f"{args.height}x{args.width} ({tokens} image tokens), device {args.device}, {args.threads} threads")
    del module
    memory = {v: measure_memory(v, args) for v in VARIANTS}
    times = measure_time(args)
    ref_t, ref_m = times["fwd+bwd"], memory["fwd+bwd"]
    print(f"{'variant':<14}{'time (s)':>10}{'x fwd+bwd':>11}{'peak (MiB)':>12}{'x fwd+bwd':>11}")
    for v in VARIANTS:
        mem_ratio = f"{memory[v] / ref_m:>11.2f}" if ref_m > 0 else f"{'-':>11}"  # below RSS resolution
        print(f"{v:<14}{times[v]:>10.3f}{times[v] / ref_t:>11.2f}{memory[v] / 2**20:>12.1f}{mem_ratio}")
    print("targets: rules+fwd+bwd (the default JVP) <= 2.0x time, <= 1.3x memory")


if __name__ == "__main__":
    main()
