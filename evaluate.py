"""Benchmark samplers and caches: `python evaluate.py --config configs/evaluate.yaml [--output_dir DIR] [--a.b value]`.

Every method samples the same held-out validation prompts from the same noise; the evaluator
writes results.csv/json, report.md (the paper's Table 2 and Table 4 layouts), pareto.png,
samples/<method>.gif and TensorBoard logs (output_dir/tb). See SPEC §7 and evaluation/*.py for the
metric definitions.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evaluation import efficiency, metrics, report  # noqa: E402
from evaluation.methods import (MethodSpec, MissingExport, ModelStore, PromptSet, benchmark,  # noqa: E402
                                check_available, generate, load_prompt_set)


@dataclass
class DataConfig:
    """The prompt set: the first `num_videos` samples of the validation split."""

    data_dir: str = "data/digits"
    """dataset written by prepare.py"""
    prepare_if_missing: dict | None = None
    """{num_train, num_val, shard_size}: build a moving-digits set if absent"""
    verify_checksums: bool = True
    """hash every shard at setup (LatentVideoDataModule)"""


@dataclass
class SemanticConfig:
    """The semantic scorer (evaluation/semantic.py) and its ceiling/floor rows."""

    classifier_dir: str = "outputs/digit_classifier"
    """trained on first use if missing"""
    train_steps: int = 1200
    """steps when the classifier has to be trained"""
    num_bounds: int = 1000
    """videos scored for the ground-truth ceiling and the noise floor"""
    bounds_seed: int = 1234
    """seed of the ceiling/floor videos"""


@dataclass
class TimingConfig:
    """Latency, FLOPs and memory are measured on sampling runs of the first `batch_size` prompts."""

    batch_size: int = 1
    """videos per timed sampling run"""
    warmup: int = 1
    """untimed runs first"""
    repeats: int = 3
    """timed runs; the median is reported"""


@dataclass
class OutputConfig:
    """Sample grids (samples/<method>.gif) and TensorBoard logs (output_dir/tb)."""

    gif_videos: int = 16
    """videos in each method's sample grid"""
    fps: float = 4.0
    """frames per second of the GIFs"""
    scale: int = 4
    """nearest-neighbour upscaling of the GIF frames"""
    tensorboard: bool = True
    """write scalars, images, videos and the report under output_dir/tb"""


@dataclass
class EvalConfig:
    """The whole benchmark: methods, prompt set, seeds and measurement settings."""

    methods: list[MethodSpec]
    """the rows; the first is the reference unless `reference` is set"""
    data: DataConfig = field(default_factory=DataConfig)
    """prompt set"""
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    """semantic scorer"""
    timing: TimingConfig = field(default_factory=TimingConfig)
    """efficiency measurement"""
    output: OutputConfig = field(default_factory=OutputConfig)
    """figures and logs"""
    output_dir: str = "outputs/eval"
    """where results.csv/json, report.md, pareto.png, samples/ and tb/ go"""
    num_videos: int = 128
    """first N prompts of the validation split"""
    seeds: list[int] = field(default_factory=lambda: [0])
    """one noise draw per prompt and seed"""
    batch_size: int = 32
    """videos per sampling batch"""
    reference: str | None = None
    """method name for speedups and faithfulness (default: the first)"""
    skip_missing: bool = False
    """list methods with missing exports as skipped instead of failing"""
    device: str = "auto"
    """'auto' = cuda if available, else cpu"""
    model_seed: int = 0
    """seed of random:<size> models"""
    num_threads: int | None = None
    """torch CPU threads during the evaluation (None = torch's default; restored afterwards)"""
    teacher: str = "assets/teacher"
    """the stage-0 export; method entries refer to it as ${teacher} (resolved after overrides)"""

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("methods is empty: list at least the reference method")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate method names {dupes}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a method name; methods: {names}")
        if self.num_videos < 2 or self.batch_size < 1 or not self.seeds:
            raise ValueError(f"need num_videos >= 2 (for FD), batch_size >= 1 and at least one seed; got "
                             f"num_videos={self.num_videos}, batch_size={self.batch_size}, seeds={self.seeds}")


def load_scorer(cfg: SemanticConfig):
    """The semantic scorer; its digit classifier is trained (and saved) on first use."""
    from evaluation.semantic import SemanticScorer, load_digit_classifier, train_digit_classifier

    directory = Path(cfg.classifier_dir)
    try:
        classifier = load_digit_classifier(directory)
    except FileNotFoundError:
        tqdm.write(f"no digit classifier in {directory}: training one ({cfg.train_steps} steps)")
        classifier = train_digit_classifier(directory, steps=cfg.train_steps)
    return SemanticScorer(classifier.eval())


def bounds(cfg: SemanticConfig, scorer, prompts: PromptSet, real_features: Tensor) -> dict[str, dict]:
    """Ground-truth ceiling and noise floor rows, scored like the methods. Semantic: the scorer's own
    `ground_truth_ceiling` / `noise_floor` (num_bounds videos); quality and FD: other real videos of
    the world and the benchmark's own noise, as many as the prompt set."""
    from datamodules import moving_digits as world
    from evaluation.semantic import ground_truth_ceiling, noise_floor

    n, f, size = prompts.real.shape[0], prompts.real.shape[2], prompts.real.shape[3]
    kw = dict(num_frames=f, size=size)
    other_real, _, _ = world.sample_world(n, "val", cfg.bounds_seed, **kw)
    rows = {"ground truth (ceiling)": (ground_truth_ceiling(scorer, cfg.num_bounds, seed=cfg.bounds_seed, **kw),
                                       other_real),
            "noise (floor)": (noise_floor(scorer, cfg.num_bounds, seed=cfg.bounds_seed, **kw), prompts.noise[:n].cpu())}
    return {name: report.add_scores({**sem, **metrics.video_quality(videos, real_features, scorer.classifier)})
            for name, (sem, videos) in rows.items()}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every method and write every output file; returns {'rows', 'bounds', 'skipped', 'paths'}."""
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _evaluate(cfg)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: EvalConfig) -> dict[str, Any]:
    start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    reference = cfg.reference or cfg.methods[0].name
    skipped = {}
    for spec in cfg.methods:  # fail (or skip) on missing exports before any expensive work
        try:
            check_available(spec)
        except MissingExport as err:
            if not cfg.skip_missing:
                raise MissingExport(f"{err}; or set skip_missing: true to list the method as skipped") from err
            if spec.name == reference:
                raise MissingExport(f"the reference method cannot be skipped: {err}") from err
            skipped[spec.name] = str(err)
            tqdm.write(f"skipping: {err}")

    prompts = load_prompt_set(cfg.data.data_dir, cfg.num_videos, cfg.seeds, device, batch_size=cfg.batch_size,
                              verify_checksums=cfg.data.verify_checksums,
                              prepare_if_missing=cfg.data.prepare_if_missing)
    scorer = load_scorer(cfg.semantic)
    real_features = metrics.classifier_features(scorer.classifier, prompts.real)
    store = ModelStore(device, cfg.model_seed)
    rows, videos = [], {}
    for spec in tqdm([m for m in cfg.methods if m.name not in skipped], desc="methods"):
        videos[spec.name] = generate(spec, store, prompts, cfg.batch_size)
        eff = benchmark(spec, store, prompts, device, batch_size=cfg.timing.batch_size, warmup=cfg.timing.warmup,
                        repeats=cfg.timing.repeats)
        rows.append(report.add_scores({
            "name": spec.name, "label": spec.display, "kind": spec.kind, "cfg_distilled": spec.cfg_distilled,
            "ablation": spec.ablation,
            "num_steps": spec.num_steps, "nfe_dit": eff.nfe_dit, "nfe_dit_effective": eff.nfe_dit_effective,
            "nfe_predictor": eff.nfe_predictor, "flops": eff.flops, "latency_s": eff.latency_s,
            "peak_memory_mb": eff.peak_memory_bytes / 2 ** 20, "cache_mb": eff.cache_bytes / 2 ** 20,
            "memory_method": eff.memory_method, **scorer.score(videos[spec.name], prompts.labels),
            **metrics.video_quality(videos[spec.name], real_features, scorer.classifier)}))

    ref = next(r for r in rows if r["name"] == reference)
    for r in rows:  # speedups and faithfulness against the reference method
        r["speedup"] = efficiency.speedup(ref["latency_s"], r["latency_s"])
        r["theoretical_speedup"] = efficiency.speedup(ref["flops"], r["flops"])
        r["theoretical_latency_s"] = ref["latency_s"] / r["theoretical_speedup"]
        r["psnr"] = metrics.psnr(videos[r["name"]], videos[reference]).mean().item()
        r["ssim"] = metrics.ssim(videos[r["name"]], videos[reference]).mean().item()

    n_gif = min(cfg.output.gif_videos, prompts.real.shape[0])
    samples = {name: v[:n_gif] for name, v in videos.items()} | {"ground_truth": prompts.real[:n_gif]}
    bound_rows = bounds(cfg.semantic, scorer, prompts, real_features)
    meta = {"reference": reference, "num_videos": cfg.num_videos, "seeds": list(cfg.seeds),
            "num_samples": prompts.noise.shape[0], "device": str(device), "timing_batch": cfg.timing.batch_size,
            "repeats": cfg.timing.repeats, "warmup": cfg.timing.warmup,
            "memory_method": ("CUDA max_memory_allocated over one sampling run" if device.type == "cuda" else
                              "weights + inputs + peak bytes of live tensors created during one sampling run "
                              "(tracked with a TorchDispatchMode; CPU has no allocator statistic)"),
            "config": asdict(cfg), "seconds": time.perf_counter() - start}
    paths = report.write_all(Path(cfg.output_dir), rows, bound_rows, skipped, meta, samples, cfg.output.fps,
                             cfg.output.scale, cfg.output.tensorboard)
    return {"rows": rows, "bounds": bound_rows, "skipped": skipped, "paths": paths}


def build_parser() -> ArgumentParser:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True, docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="evaluate.py", description=__doc__, parser_mode="omegaconf+", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the fields below")
    parser.add_class_arguments(EvalConfig, nested_key=None, fail_untyped=True)
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    parsed = parser.parse_args(args)
    init = parser.instantiate(parsed)
    fields = {k: init[k] for k in EvalConfig.__dataclass_fields__}
    return evaluate(EvalConfig(**fields))


if __name__ == "__main__":
    main()
