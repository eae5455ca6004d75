"""DisCa inside a diffusers pipeline: the denoising loop with and without the cache, measured and counted.

    python benchmarks/pipeline_speed.py --pipeline /models/HunyuanVideo --transformer outputs/hunyuan_video/transformer \
        --predictor outputs/hunyuan_video/predictor_gan/export --height 544 --width 960 --frames 61 --device cuda
    python benchmarks/pipeline_speed.py --random      # a random HunyuanVideo-shaped pipeline sized for a CPU

Both runs use the same stage-2 transformer, 20 steps, the same noise and precomputed prompt embeddings (so
only the denoising loop is timed: `output_type="latent"`, no text encoding, no VAE decode). "without" = every
step runs the transformer; "with" = `apply_disca(..., schedule)` (default disca_n4: 8 full + 12 predicted).
The two are interleaved (A B B A ...) so a noisy machine slows both alike; latency is the median of the
repeats after a warm-up; the theoretical speedup is the ratio of FLOPs counted by torch.utils.flop_counter
over one whole call of each. PSNR of the cached latents against the uncached ones is printed too.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from integration.attach import apply_disca, remove_disca  # noqa: E402

RANDOM_TRANSFORMER = dict(in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=64, num_layers=2,
                          num_single_layers=14, num_refiner_layers=1, patch_size=1, patch_size_t=1,
                          guidance_embeds=True, rope_axes_dim=(16, 24, 24))


def random_setup(work: Path):
    """A random pipeline (tiny VAE and text encoders from tests/tiny_pipelines.py, a wider 16-block transformer),
    its stage-2 diffusers export and a random official-design predictor."""
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusers import HunyuanVideoTransformer3DModel
    from tiny_pipelines import POOLED_DIM, TEXT_DIM, build_tiny_pipeline

    from integration.transformer import export_diffusers
    from models.hunyuan_video import HunyuanVideoBackbone
    from models.predictor import Predictor, save_predictor

    pipe = build_tiny_pipeline("hunyuan_video")
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**RANDOM_TRANSFORMER, text_embed_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM)
    backbone = HunyuanVideoBackbone(model, r_embed="average")
    export_diffusers(backbone, work / "transformer")
    save_predictor(Predictor(backbone), work / "predictor")
    return pipe, work / "transformer", work / "predictor"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    peak = b.abs().max().clamp(min=1e-8)
    return float(10 * torch.log10(peak ** 2 / torch.mean((a - b) ** 2).clamp(min=1e-20)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", action="store_true", help="build a random pipeline instead of loading one")
    p.add_argument("--pipeline"), p.add_argument("--transformer"), p.add_argument("--predictor")
    p.add_argument("--schedule", default="disca_n4")
    p.add_argument("--height", type=int, default=64), p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=5), p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3), p.add_argument("--device", default="cpu")
    p.add_argument("--prompt", default="a red ball rolls on the grass")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)

    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            pipe, transformer_dir, predictor_dir = random_setup(Path(tmp))
        else:
            if not (args.pipeline and args.transformer and args.predictor):
                p.error("give --pipeline, --transformer and --predictor (or --random)")
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(args.pipeline)
            transformer_dir, predictor_dir = args.transformer, args.predictor
        hook = apply_disca(pipe, predictor_dir, transformer_dir=transformer_dir, schedule=args.schedule)
        pipe.to(args.device)
        pipe.set_progress_bar_config(disable=True)
        tokens, pooled, mask = pipe.encode_prompt(args.prompt, device=args.device)
        c = pipe.transformer.config
        vae = pipe.vae.config
        shape = (1, c.in_channels, (args.frames - 1) // vae.temporal_compression_ratio + 1,
                 args.height // vae.spatial_compression_ratio, args.width // vae.spatial_compression_ratio)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(args.device)

        def call(cached: bool) -> torch.Tensor:
            hook.schedule = full_schedule if not cached else disca_schedule
            out = pipe(prompt_embeds=tokens, pooled_prompt_embeds=pooled, prompt_attention_mask=mask,
                       latents=noise.clone(), height=args.height, width=args.width, num_frames=args.frames,
                       num_inference_steps=args.steps, output_type="latent").frames
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        disca_schedule, full_schedule = list(hook.schedule), list(range(args.steps))
        flops = {}
        for cached in (False, True):
            with FlopCounterMode(display=False) as fc:
                call(cached)
            flops[cached] = fc.get_total_flops()
        ref, ours = call(False), call(True)  # warm-up, and the outputs compared
        times = {False: [], True: []}
        for i in range(args.repeats):
            for cached in ((False, True) if i % 2 == 0 else (True, False)):
                start = time.perf_counter()
                call(cached)
                times[cached].append(time.perf_counter() - start)
        remove_disca(pipe)
    base, disca = statistics.median(times[False]), statistics.median(times[True])
    result = {"transformer_calls_full": len(disca_schedule), "predictor_calls": args.steps - len(disca_schedule),
              "latency_without_s": base, "latency_with_s": disca, "measured_speedup": base / disca,
              "theoretical_speedup": flops[False] / flops[True], "gflops_without": flops[False] / 1e9,
              "gflops_with": flops[True] / 1e9, "psnr_vs_uncached_db": psnr(ours, ref), "repeats": args.repeats,
              "tokens": int(torch.tensor(shape[2:]).prod()), "device": args.device}
    result["measured_over_theoretical"] = result["measured_speedup"] / result["theoretical_speedup"]
    print(f"{args.steps} steps, schedule {args.schedule}: {result['transformer_calls_full']} full + "
          f"{result['predictor_calls']} predicted, {result['tokens']} latent positions, {args.device}")
    print(f"  without DisCa  {base:8.3f} s   {result['gflops_without']:9.2f} GFLOP")
    print(f"  with DisCa     {disca:8.3f} s   {result['gflops_with']:9.2f} GFLOP")
    print(f"  speedup: measured {result['measured_speedup']:.2f}x, theoretical (FLOPs) "
          f"{result['theoretical_speedup']:.2f}x, ratio {result['measured_over_theoretical']:.2f}; "
          f"PSNR vs uncached {result['psnr_vs_uncached_db']:.1f} dB (random predictor when --random)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
