"""Benchmark samplers and caches: `python evaluate.py --config configs/evaluate.yaml [--output_dir DIR] [--a.b value]`.

Every method samples the same held-out validation prompts from the same noise (one draw per prompt
and seed, `--seeds '[0, 1]'`); the evaluator writes results.csv/json, per_video.csv, report.md (the
paper's Table 1-4 layouts, every score with its bootstrap interval, paired comparisons),
pareto.png, samples/<method>.gif and TensorBoard logs (output_dir/tb). See SPEC §7 and
evaluation/*.py for the metric definitions, evaluation/stats.py for the intervals.

Each method's videos and measured costs are kept in output_dir/partial/ as soon as they are done, so an
interrupted evaluation resumes at the method it stopped in when run again with the same command
(evaluation/resume.py: what changed inputs make a stored method stale, and then it is sampled again).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from evaluation import efficiency, metrics, report, resume, stats  # noqa: E402
from evaluation.methods import (MethodSpec, MissingExport, ModelStore, PromptSet, benchmark,  # noqa: E402
                                check_available, generate, load_prompt_set, sampling_run)
from evaluation.progress import code_version, stage_progress  # noqa: E402
from models.io import check_config_files, check_writable  # noqa: E402


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
    scorer2_dir: str = "outputs/digit_scorer2"
    """the second, independent digit scorer (evaluation/digit_scorer2.py); trained on first use (~20 s)"""
    scorer2_copies: int = 12
    """augmented frames per held-out digit image when the second scorer has to be trained"""

    def __post_init__(self) -> None:
        if self.scorer2_copies < 1:
            raise ValueError(f"semantic.scorer2_copies must be >= 1 (augmented frames per held-out digit image "
                             f"for the second digit scorer; default 12), got {self.scorer2_copies}")


@dataclass
class TimingConfig:
    """Latency, FLOPs and memory are measured on sampling runs of the first `batch_size` prompts."""

    batch_size: int = 1
    """videos per timed sampling run"""
    warmup: int = 1
    """untimed (method, reference) run pairs first"""
    repeats: int = 3
    """timed rounds, each one run of the method and one of the reference (interleaved); the speedup is
    the median of the per-round ratios"""
    max_spread: float = 0.25
    """IQR / median of the per-round ratios above which the report calls a measured speedup too noisy"""

    def __post_init__(self) -> None:  # checked at parse time, not after every method has sampled
        if self.batch_size < 1 or self.warmup < 0 or self.repeats < 1:
            raise ValueError(f"timing needs batch_size >= 1, warmup >= 0 and repeats >= 1; got batch_size="
                             f"{self.batch_size}, warmup={self.warmup}, repeats={self.repeats}")


@dataclass
class BootstrapConfig:
    """Percentile bootstrap over prompts (evaluation/stats.py) for every score's interval."""

    resamples: int = stats.RESAMPLES
    """bootstrap resamples"""
    level: float = stats.LEVEL
    """interval coverage"""
    seed: int = 0
    """seed of the resampling generator (every method uses the same resampled prompts: paired)"""


@dataclass
class Comparison:
    """One stated "A vs B": a paired difference on the same prompts and noise, per metric."""

    a: str
    """method name"""
    b: str
    """method name"""
    label: str | None = None
    """shown in the report (default: the two labels)"""
    metrics: list[str] = field(default_factory=lambda: list(report.COMPARISON_KEYS))
    """scores compared (evaluation.report.COMPARABLE_KEYS)"""
    margin: float | None = None
    """a relative tolerance ("A within 3 % of B": 0.03): also reports whether the interval of A - B stays
    above -margin * B"""
    c: str | None = None
    """with `d`: compare two differences, (A - B) - (C - D) on the same prompts and noise (e.g. a cache's
    drop on the distilled model against its drop on the teacher, paper Figure 1)"""
    d: str | None = None
    """method name, see `c`"""


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

    def __post_init__(self) -> None:
        if self.gif_videos < 1 or not self.fps > 0 or self.scale < 1:
            raise ValueError(f"output needs gif_videos >= 1, fps > 0 and scale >= 1; got gif_videos={self.gif_videos}, "
                             f"fps={self.fps}, scale={self.scale}")


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
    """noise seeds: one draw per prompt and seed (intervals resample prompts, a prompt's seeds together)"""
    batch_size: int = 32
    """videos per sampling batch"""
    reference: str | None = None
    """method name for speedups and faithfulness (default: the first)"""
    skip_missing: bool = False
    """list methods with missing exports as skipped instead of failing"""
    reuse_from: list[str] = field(default_factory=list)
    """output_dirs of other evaluations: a method this one has not stored yet is taken from theirs (partial/)
    when it samples the same thing (same fingerprint: sampling fields, reference, prompts, exports, code;
    names and labels may differ)"""
    device: str = "auto"
    """'auto' = cuda if available, else cpu"""
    model_seed: int = 0
    """seed of random:<size> models"""
    num_threads: int | None = None
    """torch CPU threads during the evaluation (None = torch's default; restored afterwards)"""
    teacher: str = "assets/teacher"
    """the stage-0 export; method entries refer to it as ${teacher} (resolved after overrides)"""
    stages: str = "outputs"
    """root of the stage runs (<stages>/<stage>/export); method entries refer to it as ${stages}, so
    `--stages outputs/reproduction` evaluates another set of runs with the same config"""
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    """intervals"""
    comparisons: list[Comparison] = field(default_factory=list)
    """stated "A vs B" comparisons, reported as paired differences with intervals"""

    def __post_init__(self) -> None:
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("methods is empty: list at least the reference method")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate method names {dupes}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not a method name; methods: {names}")
        if not self.seeds:
            raise ValueError("seeds is empty (--seeds []): give at least one noise seed, e.g. --seeds '[0]' or "
                             "--seeds '[0, 1]'")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a seed: a repeated seed repeats the same noise, "
                             "not a new draw")
        if self.num_videos < 2:
            raise ValueError(f"num_videos={self.num_videos}: the bootstrap intervals (and FD) need at least 2 videos "
                             "(prompts) to resample; set num_videos >= 2")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.bootstrap.resamples < 100 or not 0 < self.bootstrap.level < 1:
            raise ValueError(f"bootstrap needs resamples >= 100 and 0 < level < 1, got "
                             f"resamples={self.bootstrap.resamples}, level={self.bootstrap.level}")
        if self.timing.max_spread <= 0:
            raise ValueError(f"timing.max_spread must be > 0, got {self.timing.max_spread}")
        for c in self.comparisons:
            if (c.c is None) != (c.d is None) or (c.c is not None and c.margin is not None):
                raise ValueError(f"comparison {c.a!r} vs {c.b!r}: give both c and d (a difference of differences) "
                                 f"or neither, and no margin with them; got c={c.c!r}, d={c.d!r}, margin={c.margin}")
            unknown = [n for n in (c.a, c.b, c.c, c.d) if n is not None and n not in names]
            bad = [m for m in c.metrics if m not in report.COMPARABLE_KEYS]
            if unknown or bad or not c.metrics or c.a == c.b or (c.margin is not None and c.margin <= 0):
                raise ValueError(f"comparison {c.a!r} vs {c.b!r}: needs two different method names (unknown: "
                                 f"{unknown}), metrics from {list(report.COMPARABLE_KEYS)} (bad: {bad}) and a "
                                 f"margin > 0 or null (got {c.margin}); after replacing `methods`, replace "
                                 "`comparisons` too (--comparisons '[]' for none)")


def load_scorer(cfg: SemanticConfig):
    """The semantic scorer with both digit scorers; each is trained (and saved) on first use."""
    from evaluation.digit_scorer2 import ensure_digit_scorer2
    from evaluation.semantic import SemanticScorer, ensure_digit_classifier

    # a classifier left by another run (fewer steps, interrupted) is retrained, never silently reused
    classifier, _ = ensure_digit_classifier(cfg.classifier_dir, log=tqdm.write, steps=cfg.train_steps)
    digit2, _ = ensure_digit_scorer2(cfg.scorer2_dir, log=tqdm.write, copies=cfg.scorer2_copies)
    return SemanticScorer(classifier.eval(), digit2=digit2)


def bounds(cfg: SemanticConfig, scorer, prompts: PromptSet, real_features: Tensor, boot: BootstrapConfig,
           indices) -> dict[str, dict]:
    """Ground-truth ceiling and noise floor rows, scored like the methods. Semantic: the videos of the
    scorer's own `ground_truth_ceiling` / `noise_floor` (num_bounds videos, intervals over them);
    quality and FD: other real videos of the world and the benchmark's own noise, as many as the prompt set."""
    from datamodules import moving_digits as world
    from evaluation.semantic import ceiling_videos, floor_videos

    n, f, size = prompts.real.shape[0], prompts.real.shape[2], prompts.real.shape[3]
    kw = dict(num_frames=f, size=size)
    other_real, _, _ = world.sample_world(n, "val", cfg.bounds_seed, **kw)
    sets = {"ground truth (ceiling)": (ceiling_videos(cfg.num_bounds, seed=cfg.bounds_seed, **kw), other_real),
            "noise (floor)": (floor_videos(cfg.num_bounds, seed=cfg.bounds_seed, **kw), prompts.noise[:n].cpu())}
    bound_indices = stats.resample_indices(cfg.num_bounds, boot.resamples, boot.seed)
    rows = {}
    for name, ((videos, labels), quality_videos) in sets.items():
        acc = metrics.accuracy_per_video(scorer.correct(videos, labels))
        acc["semantic"] = report.semantic_score(acc["digit_acc"], acc["color_acc"], acc["direction_acc"])
        quality = metrics.quality_per_video(quality_videos)
        quality["quality"] = report.quality_score(quality["flicker"], quality["smoothness"])
        row = (report.intervals(acc, cfg.num_bounds, bound_indices, boot.level)
               | report.intervals(quality, n, indices, boot.level))
        row["total"] = report.total_score(row["semantic"], row["quality"])
        row["fd_classifier"] = metrics.fd_classifier(quality_videos, real_features, scorer.classifier)
        rows[name] = row
    return rows


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every method and write every output file; returns {'rows', 'bounds', 'comparisons', 'skipped',
    'paths'}."""
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
    # where the results go must take them, before anything is sampled (an unwritable partial/ lost a method)
    for directory in (Path(cfg.output_dir), Path(cfg.output_dir) / "partial"):
        check_writable(directory, "--output_dir" if directory == Path(cfg.output_dir) else "--output_dir's partial/")

    boot = cfg.bootstrap
    indices = stats.resample_indices(cfg.num_videos, boot.resamples, boot.seed)  # shared by every method: paired
    prompts = load_prompt_set(cfg.data.data_dir, cfg.num_videos, cfg.seeds, device, batch_size=cfg.batch_size,
                              verify_checksums=cfg.data.verify_checksums,
                              prepare_if_missing=cfg.data.prepare_if_missing)
    scorer = load_scorer(cfg.semantic)
    real_features = metrics.classifier_features(scorer.classifier, prompts.real)
    store = ModelStore(device, cfg.model_seed)
    ref_spec = next(m for m in cfg.methods if m.name == reference)
    ref_run, _ = sampling_run(ref_spec, store, prompts, device, batch_size=cfg.timing.batch_size)
    # each method's videos and measured costs are kept as soon as they exist; a rerun resumes from them
    stored = resume.MethodResults(Path(cfg.output_dir) / "partial", log=tqdm.write,
                                  others=[Path(d) / "partial" for d in cfg.reuse_from])
    context = {"prompts": resume.prompt_digest(prompts), "code": resume.code_digest(), "device": str(device),
               "timing": asdict(cfg.timing), "batch_size": cfg.batch_size, "model_seed": cfg.model_seed}
    rows, videos, per_video = [], {}, {}
    for spec in tqdm([m for m in cfg.methods if m.name not in skipped], desc="methods"):
        key = resume.fingerprint(spec, ref_spec, context)
        found = stored.load(spec.name, key)
        if found is not None:
            videos[spec.name], measured = found
            tqdm.write(f"{spec.name}: resumed from {stored.path(spec.name)}")
        else:
            began = time.perf_counter()
            videos[spec.name] = generate(spec, store, prompts, cfg.batch_size)
            eff = benchmark(spec, store, prompts, device, batch_size=cfg.timing.batch_size)
            run, _ = sampling_run(spec, store, prompts, device, batch_size=cfg.timing.batch_size)
            method_s, reference_s = efficiency.interleaved_times(run, ref_run, cfg.timing.repeats,
                                                                 cfg.timing.warmup, sync=efficiency.device_sync(device))
            measured = {"efficiency": asdict(eff), "method_s": method_s, "reference_s": reference_s,
                        "seconds": time.perf_counter() - began}
            stored.save(spec.name, key, videos[spec.name], measured)
        eff = efficiency.Efficiency(**measured["efficiency"])
        per_video[spec.name] = metrics.per_video_scores(scorer.correct(videos[spec.name], prompts.labels),
                                                        videos[spec.name])
        rows.append({
            "name": spec.name, "label": spec.display, "kind": spec.kind, "cfg_distilled": spec.cfg_distilled,
            "ablation": spec.ablation, "num_steps": spec.num_steps, "nfe_dit": eff.nfe_dit,
            "nfe_dit_effective": eff.nfe_dit_effective, "nfe_predictor": eff.nfe_predictor, "flops": eff.flops,
            "peak_memory_mb": eff.peak_memory_bytes / 2 ** 20, "cache_mb": eff.cache_bytes / 2 ** 20,
            "memory_method": eff.memory_method,
            **report.timing_fields(measured["method_s"], measured["reference_s"], cfg.timing.max_spread),
            "fd_classifier": metrics.fd_classifier(videos[spec.name], real_features, scorer.classifier),
            "resumed": found is not None, "method_seconds": measured["seconds"], "training": training_progress(spec)})

    ref = next(r for r in rows if r["name"] == reference)
    for r in rows:  # per-video faithfulness to the reference, FLOP speedups
        per_video[r["name"]]["psnr"] = metrics.psnr(videos[r["name"]], videos[reference]).double().numpy()
        per_video[r["name"]]["ssim"] = metrics.ssim(videos[r["name"]], videos[reference]).double().numpy()
        r["theoretical_speedup"] = efficiency.speedup(ref["flops"], r["flops"])
        r["theoretical_latency_s"] = ref["latency_s"] / r["theoretical_speedup"]

    def evaluated(c: Comparison) -> bool:
        return all(n in per_video for n in (c.a, c.b, c.c, c.d) if n is not None)

    pairs = [asdict(c) for c in cfg.comparisons if evaluated(c)]
    skipped |= {f"comparison {c.a} vs {c.b}": "a method it compares was skipped" for c in cfg.comparisons
                if not evaluated(c)}
    comparisons = report.add_statistics(rows, per_video, reference, pairs, cfg.num_videos, indices, boot.level)

    n_gif = min(cfg.output.gif_videos, prompts.real.shape[0])
    samples = {name: v[:n_gif] for name, v in videos.items()} | {"ground_truth": prompts.real[:n_gif]}
    bound_rows = bounds(cfg.semantic, scorer, prompts, real_features, boot, indices)
    stages = {p["stage_dir"]: p for r in rows for p in r["training"].values() if p is not None}
    meta = {"reference": reference, "num_videos": cfg.num_videos, "seeds": list(cfg.seeds),
            "num_samples": prompts.noise.shape[0], "device": str(device), "timing_batch": cfg.timing.batch_size,
            "repeats": cfg.timing.repeats, "warmup": cfg.timing.warmup, "max_spread": cfg.timing.max_spread,
            "bootstrap": asdict(boot), "stages": stages,
            "memory_method": ("CUDA max_memory_allocated over one sampling run" if device.type == "cuda" else
                              "weights + inputs + peak bytes of live tensors created during one sampling run "
                              "(tracked with a TorchDispatchMode; CPU has no allocator statistic)"),
            "config": asdict(cfg), "seconds": time.perf_counter() - start,
            "code": code_version(Path(__file__).resolve().parent),  # the commit that produced these numbers
            "resumed": [r["name"] for r in rows if r["resumed"]],  # sampled by an earlier, interrupted run
            "method_seconds": sum(r["method_seconds"] for r in rows)}  # sampling + cost + timing, all runs
    paths = report.write_all(Path(cfg.output_dir), rows, bound_rows, skipped, meta, samples, cfg.output.fps,
                             cfg.output.scale, cfg.output.tensorboard, comparisons, per_video)
    return {"rows": rows, "bounds": bound_rows, "comparisons": comparisons, "skipped": skipped, "paths": paths}


def training_progress(spec: MethodSpec) -> dict[str, dict | None]:
    """Completed vs budgeted steps of the stages behind the method's exports (evaluation/progress.py)."""
    exports = {"model": None if spec.is_random else spec.model}
    if spec.kind == "disca" and spec.predictor not in ("reuse", "random"):
        exports["predictor"] = spec.predictor
    return {role: stage_progress(path) if path else None for role, path in exports.items()}


def build_parser() -> ArgumentParser:
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True, docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="evaluate.py", description=__doc__, parser_mode="omegaconf+", default_env=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with the fields below")
    parser.add_class_arguments(EvalConfig, nested_key=None, fail_untyped=True)
    return parser


def main(args: list[str] | None = None) -> dict[str, Any]:
    check_config_files(sys.argv[1:] if args is None else args)  # a YAML syntax error names its file
    parser = build_parser()
    parsed = parser.parse_args(args)
    init = parser.instantiate(parsed)
    fields = {k: init[k] for k in EvalConfig.__dataclass_fields__}
    return evaluate(EvalConfig(**fields))


if __name__ == "__main__":
    main()
