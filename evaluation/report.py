"""Write an evaluation's results: results.csv / results.json, report.md (the paper's Table 2 and
Table 4 layouts), pareto.png, samples/<method>.gif and TensorBoard scalars, images and videos.

A result row is a flat dict with the keys in `COLUMNS`; the score definitions live here:

- semantic = mean(digit, colour, direction accuracy); all-correct is printed beside it;
- quality  = mean(temporal flickering, motion smoothness) (both in [0, 1]; FD-classifier and the
  motion magnitude are unbounded and shown on their own);
- total    = (semantic + 4 quality) / 5, VBench's 1:4 weighting of its semantic and quality scores.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

COLUMNS = (
    "name", "label", "kind", "cfg_distilled", "num_steps",
    "nfe_dit", "nfe_dit_effective", "nfe_predictor", "flops", "latency_s", "speedup", "theoretical_speedup",
    "theoretical_latency_s", "peak_memory_mb", "cache_mb", "memory_method",
    "digit_acc", "color_acc", "direction_acc", "all_correct", "semantic",
    "flicker", "smoothness", "motion", "fd_classifier", "quality", "total", "psnr", "ssim",
)
QUALITY_WEIGHT = 4.0  # VBench: total = (semantic + 4 quality) / 5


def semantic_score(digit_acc: float, color_acc: float, direction_acc: float) -> float:
    return (digit_acc + color_acc + direction_acc) / 3


def quality_score(flicker: float, smoothness: float) -> float:
    return (flicker + smoothness) / 2


def total_score(semantic: float, quality: float) -> float:
    return (semantic + QUALITY_WEIGHT * quality) / (1 + QUALITY_WEIGHT)


def add_scores(row: dict) -> dict:
    """Add semantic, quality and total to a row holding the accuracies, flicker and smoothness."""
    row["semantic"] = semantic_score(row["digit_acc"], row["color_acc"], row["direction_acc"])
    row["quality"] = quality_score(row["flicker"], row["smoothness"])
    row["total"] = total_score(row["semantic"], row["quality"])
    return row


# --- tables ------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float))


def _pct(value: float, ref: float | None) -> str:
    text = f"{100 * value:.1f}"
    if ref is None or ref == 0:
        return text
    return f"{text} ({100 * (value - ref) / abs(ref):+.1f}%)"


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def table2(rows: list[dict], bounds: dict[str, dict], reference: dict) -> str:
    """Method, CFG distilled, efficiency, semantic and quality scores (paper Table 2 layout), with the
    change relative to the reference method in parentheses, then the ground-truth and noise rows."""
    header = ["Method", "CFG distilled", "NFE (DiT + P)", "Latency (s) ↓", "Speed ↑", "Theor. speed ↑",
              "Peak mem (MB) ↓",
              "Digit ↑", "Colour ↑", "Direction ↑", "All-correct ↑", "Semantic ↑", "Flicker ↑",
              "Smoothness ↑",
              "Motion (px/f)", "FD-classifier ↓", "Quality ↑", "Total ↑"]
    body = []
    for r in rows:
        nfe = _num(r["nfe_dit_effective"], "{:.4g}") + (f" + {r['nfe_predictor']:.4g}" if r["nfe_predictor"] else "")
        body.append([r["label"], "✔" if r["cfg_distilled"] else "✘", nfe, _num(r["latency_s"], "{:.4g}"),
                     f"{r['speedup']:.2f}×", f"{r['theoretical_speedup']:.2f}×", _num(r["peak_memory_mb"], "{:.4g}"),
                     *(_pct(r[k], reference[k]) for k in ("digit_acc", "color_acc", "direction_acc", "all_correct",
                                                          "semantic", "flicker", "smoothness")),
                     _num(r["motion"], "{:.2f}"), _num(r["fd_classifier"], "{:.4g}"),
                     _pct(r["quality"], reference["quality"]), _pct(r["total"], reference["total"])])
    for name, b in bounds.items():
        body.append([f"*{name}*", "", "—", "—", "—", "—", "—",
                     *(_pct(b[k], None) for k in ("digit_acc", "color_acc", "direction_acc", "all_correct",
                                                  "semantic", "flicker", "smoothness")),
                     _num(b["motion"], "{:.2f}"), _num(b["fd_classifier"], "{:.4g}"), _pct(b["quality"], None),
                     _pct(b["total"], None)])
    return _table(header, body)


def table4(rows: list[dict]) -> str:
    """Theoretical (FLOPs) vs measured speedup (paper Table 4 layout); the theoretical latency is the
    reference latency divided by the theoretical speedup."""
    header = ["Method", "CFG distilled", "Peak mem (MB) ↓", "Cache (MB)", "FLOPs (G) ↓", "Theor. speed ↑",
              "Theor. latency (s)", "Latency (s) ↓", "Speed ↑"]
    body = [[r["label"], "✔" if r["cfg_distilled"] else "✘", _num(r["peak_memory_mb"], "{:.4g}"),
             _num(r["cache_mb"], "{:.3g}"), f"{r['flops'] / 1e9:.4g}", f"{r['theoretical_speedup']:.2f}×",
             _num(r["theoretical_latency_s"], "{:.4g}"), _num(r["latency_s"], "{:.4g}"), f"{r['speedup']:.2f}×"]
            for r in rows]
    return _table(header, body)


def table1(rows: list[dict], reference: dict) -> str:
    """The step-distillation rows (CFG teacher, CFG-distilled and MeanFlow samplers, no caches) in the
    layout of the paper's Table 1: NFE, theoretical and measured speedup, semantic scores (change
    relative to the reference) and PSNR to the reference's videos."""
    header = ["Method", "CFG distilled", "NFE", "Theor. speed", "Measured speed", "Digit", "Colour", "Direction",
              "All-correct", "Semantic", "PSNR (dB)"]
    body = [[r["label"], "✔" if r["cfg_distilled"] else "✘", _num(r["nfe_dit_effective"], "{:.4g}"),
             f"{r['theoretical_speedup']:.2f}×", f"{r['speedup']:.2f}×",
             *(_pct(r[k], reference[k]) for k in ("digit_acc", "color_acc", "direction_acc", "all_correct",
                                                  "semantic")),
             "—" if r is reference else f"{r['psnr']:.2f}"]
            for r in rows if r["kind"] in ("teacher_cfg", "cfg_distilled", "meanflow")]
    return _table(header, body)


def table3(rows: list[dict]) -> str:
    """The ablation rows (methods with `ablation` flags) in the layout of the paper's Table 3: which of
    Restricted MeanFlow / learnable predictor / GAN training each uses, and its semantic, quality and total
    scores with the change relative to the row that uses all three. Empty when there is no such row."""
    from evaluation.methods import ABLATION_KEYS

    ablations = [r for r in rows if r.get("ablation")]
    full = next((r for r in ablations if all(r["ablation"][k] for k in ABLATION_KEYS)), None)
    if full is None:
        return ""
    mark = {True: "✔", False: "✘", None: "—"}
    header = ["Method", "Restricted MeanFlow", "Learnable predictor", "GAN training", "Semantic ↑", "Quality ↑",
              "Total ↑", "FD-classifier ↓"]
    body = [[r["label"], *(mark[r["ablation"][k]] for k in ABLATION_KEYS),
             *(_pct(r[k], full[k]) for k in ("semantic", "quality", "total")), _num(r["fd_classifier"], "{:.4g}")]
            for r in sorted(ablations, key=lambda r: r is not full)]
    return _table(header, body)


def faithfulness_table(rows: list[dict]) -> str:
    header = ["Method", "PSNR (dB) ↑", "SSIM ↑"]
    return _table(header, [[r["label"], f"{r['psnr']:.2f}", f"{r['ssim']:.4f}"] for r in rows])


def markdown_report(rows: list[dict], bounds: dict[str, dict], skipped: dict[str, str], meta: dict) -> str:
    reference = next(r for r in rows if r["name"] == meta["reference"])
    parts = [
        "# Evaluation report",
        "",
        f"{meta['num_samples']} videos ({meta['num_videos']} held-out validation prompts × seeds "
        f"{meta['seeds']}), every method from the same noise and prompts; device `{meta['device']}`; "
        f"reference method for speedups, relative changes and faithfulness: **{reference['label']}**. "
        f"Evaluation took {meta['seconds']:.1f} s.",
        "",
        "## Quality and efficiency (layout of the paper's Table 2)",
        "",
        "Scores in %, change relative to the reference in parentheses. The ground-truth ceiling (real "
        "videos) and the noise floor (Gaussian noise) are scored by the same scorer.",
        "",
        table2(rows, bounds, reference),
        "",
        "## Step distillation (layout of the paper's Table 1)",
        "",
        table1(rows, reference),
        "",
    ]
    ablation = table3(rows)
    if ablation:
        parts += ["## Ablation (layout of the paper's Table 3)", "",
                  "Changes relative to the row that uses all three components.", "", ablation, ""]
    parts += [
        f"## Faithfulness to {reference['label']} (same noise and prompt)",
        "",
        faithfulness_table(rows),
        "",
        "## Theoretical vs measured speedup (layout of the paper's Table 4)",
        "",
        table4(rows),
        "",
    ]
    if skipped:
        parts += ["## Skipped methods", ""] + [f"- **{k}**: {v}" for k, v in skipped.items()] + [""]
    parts += [
        "## Definitions",
        "",
        "- Semantic = mean of digit, colour and direction accuracy (the in-project classifier and "
        "attribute scorers of `evaluation/semantic.py`); all-correct = all three right.",
        "- Flicker = VBench's temporal-flickering score (255 − mean |frame difference|) / 255; a frozen "
        "video scores 100, so read it with Motion (fitted centroid speed; the real world moves 1 px/frame).",
        "- Smoothness = 1 − sqrt(SS_res / SS_tot) of a constant-velocity fit of the intensity-weighted "
        "centroid track. Quality = mean(Flicker, Smoothness); Total = (Semantic + 4 Quality) / 5 (VBench's "
        "weighting).",
        "- FD-classifier = Fréchet distance between the digit classifier's features (frame-averaged) "
        "of generated and real videos of the same prompts (not FID/FVD).",
        "- NFE = full DiT evaluations (a CFG step costs 2; a cache's partial call counts its computed "
        "fraction of block updates) + predictor evaluations.",
        f"- FLOPs = counted by torch.utils.flop_counter over one whole sampling run of "
        f"{meta['timing_batch']} video(s) (matmul/attention ops); latency = median of {meta['repeats']} "
        f"runs after {meta['warmup']} warm-up run(s), synchronised on CUDA.",
        f"- Peak memory: {meta['memory_method']}. Cache = bytes held by the cache (peak over the run).",
        "",
    ]
    return "\n".join(parts)


# --- figures ------------------------------------------------------------------------------------------
def pareto_figure(rows: list[dict], bounds: dict[str, dict] | None = None):
    """Semantic score vs measured speedup, one labelled point per method (a pyplot-free Agg figure);
    the ground-truth ceiling and noise floor as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["speedup"], 100 * r["semantic"], s=30, color="tab:red" if r["kind"] == "disca" else "tab:blue")
        ax.annotate(r["label"], (r["speedup"], 100 * r["semantic"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    for (name, b), color in zip((bounds or {}).items(), ("tab:green", "tab:gray")):
        ax.axhline(100 * b["semantic"], color=color, linestyle="--", linewidth=1, label=name)
    if bounds:
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("measured speedup (×, vs reference)")
    ax.set_ylabel("semantic score (%)")
    ax.set_title("Semantic score vs speedup")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def grid_layout(n: int) -> tuple[int, int]:
    """(rows, cols) of a near-square grid of n cells."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def grid_frames(videos: Tensor, scale: int = 4, pad: int = 1) -> np.ndarray:
    """(N, 3, F, H, W) in [-1, 1] -> (F, rows*(H*scale+pad), cols*(W*scale+pad), 3) uint8, a near-square grid."""
    n = videos.shape[0]
    rows, cols = grid_layout(n)
    x = ((videos.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=255)  # white separators
    blank = torch.full((rows * cols - n, *x.shape[1:]), 255, dtype=torch.uint8)
    x = torch.cat([x, blank])
    return rearrange(x, "(r c) ch f h w -> f (r h) (c w) ch", r=rows, c=cols).numpy()


def gif_bytes(videos: Tensor, fps: float = 4.0, scale: int = 4) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", grid_frames(videos, scale), extension=".gif", duration=1000 / fps, loop=0)


def write_tensorboard(logdir: Path, rows: list[dict], samples: dict[str, Tensor], gifs: dict[str, bytes],
                      report_md: str, figure, scale: int = 4) -> None:
    """Scalars `<method>/<metric>`, a frames-as-columns image and the animated GIF (`gifs`, already
    encoded) per method, the Pareto figure and the markdown report as text. TensorBoard's add_video
    needs moviepy, so the GIF is written as an image summary, which TensorBoard plays."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    try:
        for r in rows:
            for key in COLUMNS:
                value = r[key]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f"{r['name']}/{key}", float(value), 0)
        for name, videos in samples.items():
            frames = rearrange((videos.float().clamp(-1, 1) + 1) / 2, "n c f h w -> c (n h) (f w)")
            writer.add_image(f"{name}/frames", frames, 0)
            rows_, cols = grid_layout(videos.shape[0])  # the GIF's size, as grid_frames lays it out
            image = Summary.Image(height=rows_ * (videos.shape[-2] * scale + 1),
                                  width=cols * (videos.shape[-1] * scale + 1), colorspace=3,
                                  encoded_image_string=gifs[name])
            writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=f"{name}/video", image=image)]), 0)
        writer.add_figure("pareto", figure, 0, close=False)
        writer.add_text("report", report_md, 0)
    finally:
        writer.close()


def write_all(output_dir: Path, rows: list[dict], bounds: dict[str, dict], skipped: dict[str, str], meta: dict,
              samples: dict[str, Tensor], fps: float = 4.0, scale: int = 4,
              tensorboard: bool = True) -> dict[str, Path]:
    """Every output file; returns their paths by name."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "samples").mkdir(exist_ok=True)
    paths = {"csv": output_dir / "results.csv", "json": output_dir / "results.json",
             "report": output_dir / "report.md", "pareto": output_dir / "pareto.png"}
    write_csv(rows, paths["csv"])
    write_json({"meta": meta, "methods": rows, "bounds": bounds, "skipped": skipped}, paths["json"])
    report_md = markdown_report(rows, bounds, skipped, meta)
    paths["report"].write_text(report_md)
    figure = pareto_figure(rows, bounds)
    figure.savefig(paths["pareto"])
    gifs = {name: gif_bytes(videos, fps, scale) for name, videos in samples.items()}
    for name, data in gifs.items():
        paths[f"gif/{name}"] = output_dir / "samples" / f"{name}.gif"
        paths[f"gif/{name}"].write_bytes(data)
    if tensorboard:
        paths["tb"] = output_dir / "tb"
        write_tensorboard(paths["tb"], rows, samples, gifs, report_md, figure, scale)
    return paths
