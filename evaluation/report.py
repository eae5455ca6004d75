"""Write an evaluation's results: results.csv / results.json / per_video.csv, report.md (the paper's
Table 1-4 layouts), pareto.png, samples/<method>.gif, samples/compare/<a>__vs__<b>.gif (the arms of each
comparison side by side on the same prompts) and TensorBoard scalars, images and videos.

A result row is a flat dict with the keys in `COLUMNS`; the score definitions live here:

- semantic = mean(digit, colour, direction accuracy); all-correct is printed beside it;
- quality  = mean(temporal flickering, motion smoothness) (both in [0, 1]; FD-classifier and the
  motion magnitude are unbounded and shown on their own);
- total    = (semantic + 4 quality) / 5, VBench's 1:4 weighting of its semantic and quality scores.

All three are linear in per-video scores, so each is defined per video too and every score of
`INTERVAL_KEYS` carries a 95 % bootstrap interval over prompts (`evaluation/stats.py`); every stated
comparison (against the reference, against Table 3's full row, the configured "A vs B" pairs) is a
paired difference on the same prompts and noise, and is called better only when its interval
excludes zero (`verdict`).
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

from evaluation import stats
from evaluation.plots import pareto_figure

INTERVAL_KEYS = ("digit_acc", "digit2_acc", "color_acc", "direction_acc", "all_correct", "semantic", "flicker",
                 "smoothness", "motion", "quality", "total", "psnr", "ssim")
COMPARABLE_KEYS = tuple(k for k in INTERVAL_KEYS if k != "motion")  # higher is better for each of these
DELTA_KEYS = ("digit_acc", "digit2_acc", "semantic", "quality", "total")  # the paired differences the tables print
SECOND_SCORER = {"digit_acc": "digit2_acc"}
"""the second digit scorer's twin of a metric (evaluation/digit_scorer2.py): a comparison of `digit_acc` is
also made on `digit2_acc`, and a verdict that differs between the two is scorer-dependent"""
DIGIT_DEPENDENT = ("digit_acc", "all_correct", "semantic", "total")
"""metrics that contain the (CNN's) digit accuracy, so a scorer-dependent digit verdict concerns them too"""
SCORER_DEPENDENT = "scorer-dependent"
COMPARISON_KEYS = ("semantic", "digit_acc", "quality", "total")  # default metrics of an "A vs B" comparison
COLUMNS = (
    "name", "label", "kind", "cfg_distilled", "num_steps",
    "nfe_dit", "nfe_dit_effective", "nfe_predictor", "flops", "latency_s", "speedup", "speedup_q1", "speedup_q3",
    "speedup_min", "speedup_max", "speedup_too_noisy", "theoretical_speedup",
    "theoretical_latency_s", "peak_memory_mb", "cache_mb", "memory_method",
    "digit_acc", "digit2_acc", "color_acc", "direction_acc", "all_correct", "semantic",
    "flicker", "smoothness", "motion", "fd_classifier", "quality", "total", "psnr", "ssim",
    *(f"{k}_{end}" for k in INTERVAL_KEYS for end in ("lo", "hi")),
)
QUALITY_WEIGHT = 4.0  # VBench: total = (semantic + 4 quality) / 5
PERCENT_KEYS = tuple(k for k in INTERVAL_KEYS if k not in ("motion", "psnr"))  # shown x100
METRIC_NAMES = {"digit_acc": "digit", "digit2_acc": "digit (2nd scorer)", "color_acc": "colour", "direction_acc": "direction", "all_correct": "all-correct",
                "psnr": "PSNR (dB)", "ssim": "SSIM"}


def semantic_score(digit_acc, color_acc, direction_acc):
    return (digit_acc + color_acc + direction_acc) / 3


def quality_score(flicker, smoothness):
    return (flicker + smoothness) / 2


def total_score(semantic, quality):
    return (semantic + QUALITY_WEIGHT * quality) / (1 + QUALITY_WEIGHT)


def add_scores(row: dict) -> dict:
    """Add semantic, quality and total to a row (floats, or per-video arrays) holding the accuracies,
    flicker and smoothness."""
    row["semantic"] = semantic_score(row["digit_acc"], row["color_acc"], row["direction_acc"])
    row["quality"] = quality_score(row["flicker"], row["smoothness"])
    row["total"] = total_score(row["semantic"], row["quality"])
    return row


# --- intervals, paired differences and timing fields ----------------------------------------------------
def intervals(per_video: dict[str, np.ndarray], num_prompts: int, indices: np.ndarray,
              level: float = stats.LEVEL) -> dict[str, float]:
    """`key`, `key_lo`, `key_hi` for every key of INTERVAL_KEYS in `per_video` ((N,) in sample order)."""
    out = {}
    for key in INTERVAL_KEYS:
        if key in per_video:
            iv = stats.bootstrap_mean(stats.prompt_matrix(per_video[key], num_prompts), indices, level)
            out.update({key: iv.estimate, f"{key}_lo": iv.low, f"{key}_hi": iv.high})
    return out


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys: Iterable[str], num_prompts: int,
           indices: np.ndarray, level: float = stats.LEVEL) -> dict[str, list[float]]:
    """{key: [a - b, low, high]}: paired differences of two methods' per-video scores (the keys both have:
    scores of the second digit scorer are absent where it did not score)."""
    return {k: stats.paired_difference(stats.prompt_matrix(a[k], num_prompts), stats.prompt_matrix(b[k], num_prompts),
                                       indices, level).as_list() for k in keys if k in a and k in b}


def verdict(diff: list[float], a: str, b: str) -> str:
    """'A better' / 'B better' only when the interval of A - B (higher is better) excludes zero."""
    _, low, high = diff
    if low > 0:
        return f"**{a}** better"
    if high < 0:
        return f"**{b}** better"
    return "no difference shown (interval contains 0)"


def compare(per_video: dict[str, dict[str, np.ndarray]], labels: dict[str, str], pairs: list[dict],
            num_prompts: int, indices: np.ndarray, level: float = stats.LEVEL) -> list[dict]:
    """One entry per (pair, metric) for `pairs` = [{a, b, label, metrics, margin}] of evaluated methods.
    With a relative `margin`, A counts as within it of B when the interval's lower end of A - B lies
    above -margin * B (a target such as "within 3 % of the teacher").
    With `c` and `d`, the entry compares two differences on the same prompts and noise: "A" is A − B, "B"
    is C − D, and the interval is that of (A − B) − (C − D)."""
    out = []
    for pair in pairs:
        a, b, margin = pair["a"], pair["b"], pair.get("margin")
        first, second = per_video[a], per_video[b]
        name_a, name_b = labels[a], labels[b]
        if pair.get("c") is not None:
            c, d = per_video[pair["c"]], per_video[pair["d"]]
            first = {k: per_video[a][k] - per_video[b][k] for k in pair["metrics"]}
            second = {k: c[k] - d[k] for k in pair["metrics"]}
            name_a, name_b = f"({labels[a]}) − ({labels[b]})", f"({labels[pair['c']]}) − ({labels[pair['d']]})"
        diffs = paired(first, second, pair["metrics"], num_prompts, indices, level)
        for key, diff in diffs.items():
            b_value = float(np.mean(second[key]))
            entry = {"label": pair.get("label") or f"{name_a} vs {name_b}", "a": a, "b": b, "metric": key,
                     "a_value": float(np.mean(first[key])), "b_value": b_value, "diff": diff,
                     "verdict": verdict(diff, name_a, name_b)}
            if pair.get("c") is not None:
                entry |= {"c": pair["c"], "d": pair["d"]}
            if margin is not None:  # non-inferiority: the whole interval above -margin * B
                entry["within_margin"] = diff[1] > -margin * abs(b_value)
                entry["verdict"] += (f"; within {100 * margin:g} % of B: "
                                     + ("**yes**" if entry["within_margin"] else "not shown"))
            out.append(entry)
    return out


def with_second_scorer(pairs: list[dict], per_video: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Each pair with the second scorer's twin (`SECOND_SCORER`) right after every metric that has one, where
    every method the pair names was scored by it; a pair that compares a metric containing the digit
    (`DIGIT_DEPENDENT`) but not the digit itself gets the digit (and its twin) after that metric, so every
    verdict that rests on the digit shows whether it holds under both scorers."""
    out = []
    for pair in pairs:
        names = [pair[k] for k in "abcd" if pair.get(k) is not None]
        asked = list(pair["metrics"])
        first = next((i for i, m in enumerate(asked) if m in DIGIT_DEPENDENT), None)
        if first is not None and "digit_acc" not in asked and all("digit_acc" in per_video[n] for n in names):
            asked.insert(first + 1, "digit_acc")
        metrics = []
        for m in asked:
            metrics.append(m)
            twin = SECOND_SCORER.get(m)
            if twin and twin not in pair["metrics"] and all(twin in per_video[n] for n in names):
                metrics.append(twin)
        out.append({**pair, "metrics": metrics})
    return out


def _outcome(entry: dict) -> tuple:
    """What a comparison entry concludes: the side its interval excludes zero on, and a margin test's result."""
    _, low, high = entry["diff"]
    return ("a" if low > 0 else "b" if high < 0 else "open", entry.get("within_margin"))


def mark_scorer_dependent(entries: list[dict]) -> list[dict]:
    """Set `scorer_dependent` on every digit entry that has its second-scorer twin in the same comparison;
    where the two conclude differently, both verdicts read "scorer-dependent" (never A or B better) and the
    comparison's other digit-dependent metrics (`DIGIT_DEPENDENT`) say so."""
    groups: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        groups.setdefault((e["label"], e["a"], e["b"], e.get("c"), e.get("d")), {})[e["metric"]] = e
    for group in groups.values():
        for first, second in SECOND_SCORER.items():
            if first not in group or second not in group:
                continue
            e1, e2 = group[first], group[second]
            dependent = _outcome(e1) != _outcome(e2)
            e1["scorer_dependent"] = e2["scorer_dependent"] = dependent
            if dependent:
                e1["verdict"] = e2["verdict"] = (f"**{SCORER_DEPENDENT}** (CNN: {e1['verdict']}; 2nd scorer: "
                                                 f"{e2['verdict']})")
                for m in DIGIT_DEPENDENT:
                    if m != first and m in group:
                        group[m]["verdict"] += f"; its digit verdict is {SCORER_DEPENDENT}"
    return entries


def full_row(rows: list[dict]) -> dict | None:
    """The Table 3 row that uses every DisCa component (the ablations' baseline), if any."""
    from evaluation.methods import ABLATION_KEYS

    return next((r for r in rows if r.get("ablation") and all(r["ablation"][k] for k in ABLATION_KEYS)), None)


def add_statistics(rows: list[dict], per_video: dict[str, dict[str, np.ndarray]], reference: str,
                   pairs: list[dict], num_prompts: int, indices: np.ndarray, level: float = stats.LEVEL) -> list[dict]:
    """Give every row its intervals, its paired differences to the reference (`vs_reference`) and, for
    Table 3 rows, to the full row (`vs_full`); returns the configured comparisons (`compare`), each digit
    comparison also made with the second digit scorer and marked scorer-dependent where they disagree."""
    full = full_row(rows)
    for r in rows:
        scores = per_video[r["name"]]
        r.update(intervals(scores, num_prompts, indices, level))
        r["vs_reference"] = paired(scores, per_video[reference], DELTA_KEYS, num_prompts, indices, level)
        if r.get("ablation") and full is not None:
            r["vs_full"] = paired(scores, per_video[full["name"]], DELTA_KEYS, num_prompts, indices, level)
    pairs = with_second_scorer(pairs, per_video)
    return mark_scorer_dependent(compare(per_video, {r["name"]: r["label"] for r in rows}, pairs, num_prompts,
                                         indices, level))


def timing_fields(method_s: list[float], reference_s: list[float], max_spread: float) -> dict:
    """The row's latency (median of the method's interleaved runs) and measured speedup (median of
    the per-round ratios, quartiles, range, and whether the spread is too wide to conclude)."""
    from evaluation.efficiency import speedup_stats

    sp = speedup_stats(reference_s, method_s)
    return {"latency_s": float(np.median(method_s)), "latency_runs_s": list(method_s),
            "reference_runs_s": list(reference_s), "speedup": sp.median, "speedup_q1": sp.q1, "speedup_q3": sp.q3,
            "speedup_min": sp.low, "speedup_max": sp.high, "speedup_ratios": sp.ratios,
            "speedup_too_noisy": sp.too_wide(max_spread)}


# --- tables ------------------------------------------------------------------------------------------
def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_per_video(per_video: dict[str, dict[str, np.ndarray]], num_prompts: int, path: Path) -> None:
    """One line per (method, prompt, seed): every per-video score, so any pairing can be recomputed."""
    keys = sorted({k for scores in per_video.values() for k in scores})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "prompt", "seed_index", *keys])
        for name, scores in per_video.items():
            n = len(next(iter(scores.values())))
            for i in range(n):
                writer.writerow([name, i % num_prompts, i // num_prompts,
                                 *(f"{float(scores[k][i]):.6g}" if k in scores else "" for k in keys)])


def write_json(payload: dict, path: Path) -> None:
    path.write_text(json.dumps(payload, indent=1, default=float))


def _scale(key: str) -> float:
    return 100.0 if key in PERCENT_KEYS else 1.0


def fmt_ci(row: dict, key: str, fmt: str = "{:.1f}") -> str:
    """'value [low, high]' of a row's score (percent keys x100); '—' for a score the row lacks (the second
    digit scorer's in results written before it existed)."""
    if row.get(key) is None:
        return "—"
    k = _scale(key)
    if f"{key}_lo" not in row:
        return _num(row[key] * k, fmt)
    return f"{fmt.format(row[key] * k)} [{fmt.format(row[f'{key}_lo'] * k)}, {fmt.format(row[f'{key}_hi'] * k)}]"


def fmt_diff(diff: list[float] | None, key: str) -> str:
    """'+d [+low, +high]' of a paired difference (percent keys in points, one decimal unless more are
    needed to show that the interval excludes zero), '—' for none."""
    if diff is None:
        return "—"
    k = _scale(key)
    est, low, high = (v * k for v in diff)
    for decimals in range(1, 5):  # enough decimals that an interval excluding zero does not print as 0.0
        fmt = f"{{:+.{decimals}f}}"
        if not ((low > 0 and float(fmt.format(low)) == 0) or (high < 0 and float(fmt.format(high)) == 0)):
            break
    return f"{fmt.format(est)} [{fmt.format(low)}, {fmt.format(high)}]"


def fmt_speed(row: dict) -> str:
    """'median× [q1–q3]', flagged when the spread is too wide to conclude."""
    text = f"{row['speedup']:.2f}× [{row['speedup_q1']:.2f}–{row['speedup_q3']:.2f}]"
    return text + " ⚠" if row["speedup_too_noisy"] else text


def fmt_steps(row: dict) -> str:
    """Completed / budgeted training steps of the exports a row uses ('—' when no checkpoint is known)."""
    parts = []
    for role, progress in (row.get("training") or {}).items():
        if progress is None:
            continue
        budget = progress["max_steps"] if progress["max_steps"] is not None else "?"
        mark = " ⚠ stopped early" if progress["stopped_early"] else ""
        parts.append(f"{'P ' if role == 'predictor' else ''}{progress['completed_steps']}/{budget}{mark}")
    return "; ".join(parts) or "—"


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _mark(flag: bool) -> str:
    return "✔" if flag else "✘"


def table2(rows: list[dict], bounds: dict[str, dict]) -> str:
    """Method, CFG distilled, efficiency, semantic and quality scores with their intervals (paper Table 2
    layout), the paired difference of the semantic score to the reference, then the ground-truth and
    noise rows."""
    header = ["Method", "CFG distilled", "NFE (DiT + P)", "Latency (s) ↓", "Speed ↑ [IQR]", "Theor. speed ↑",
              "Peak mem (MB) ↓", "Digit ↑", "Digit, 2nd scorer ↑", "Colour ↑", "Direction ↑", "All-correct ↑",
              "Semantic ↑",
              "Δ Semantic vs ref", "Flicker ↑", "Smoothness ↑", "Motion (px/f)", "FD-classifier ↓",
              "Quality ↑", "Total ↑", "Trained steps"]
    scored = ("digit_acc", "digit2_acc", "color_acc", "direction_acc", "all_correct", "semantic")
    body = []
    for r in rows:
        nfe = _num(r["nfe_dit_effective"], "{:.4g}") + (f" + {r['nfe_predictor']:.4g}" if r["nfe_predictor"] else "")
        body.append([r["label"], _mark(r["cfg_distilled"]), nfe, _num(r["latency_s"], "{:.4g}"), fmt_speed(r),
                     f"{r['theoretical_speedup']:.2f}×", _num(r["peak_memory_mb"], "{:.4g}"),
                     *(fmt_ci(r, k) for k in scored), fmt_diff(r["vs_reference"].get("semantic"), "semantic"),
                     _num(100 * r["flicker"], "{:.1f}"), _num(100 * r["smoothness"], "{:.1f}"),
                     _num(r["motion"], "{:.2f}"), _num(r["fd_classifier"], "{:.4g}"), fmt_ci(r, "quality"),
                     fmt_ci(r, "total"), fmt_steps(r)])
    for name, b in bounds.items():
        body.append([f"*{name}*", "", "—", "—", "—", "—", "—", *(fmt_ci(b, k) for k in scored), "—",
                     _num(100 * b["flicker"], "{:.1f}"), _num(100 * b["smoothness"], "{:.1f}"),
                     _num(b["motion"], "{:.2f}"), _num(b["fd_classifier"], "{:.4g}"), fmt_ci(b, "quality"),
                     _num(100 * b["total"], "{:.1f}"), "—"])
    return _table(header, body)


def table4(rows: list[dict], max_spread: float) -> str:
    """Theoretical (FLOPs) vs measured speedup (paper Table 4 layout): the measured one is the median of
    per-round ratios of interleaved runs, with quartiles and range; the theoretical latency is the
    reference latency divided by the theoretical speedup."""
    header = ["Method", "CFG distilled", "Peak mem (MB) ↓", "Cache (MB)", "FLOPs (G) ↓", "Theor. speed ↑",
              "Theor. latency (s)", "Latency (s) ↓", "Speed ↑ (median)", "IQR", "min–max", "Readable?"]
    body = [[r["label"], _mark(r["cfg_distilled"]), _num(r["peak_memory_mb"], "{:.4g}"),
             _num(r["cache_mb"], "{:.3g}"), f"{r['flops'] / 1e9:.4g}", f"{r['theoretical_speedup']:.2f}×",
             _num(r["theoretical_latency_s"], "{:.4g}"), _num(r["latency_s"], "{:.4g}"), f"{r['speedup']:.2f}×",
             f"{r['speedup_q1']:.2f}–{r['speedup_q3']:.2f}", f"{r['speedup_min']:.2f}–{r['speedup_max']:.2f}",
             f"⚠ too noisy (IQR/median > {max_spread:g})" if r["speedup_too_noisy"] else "yes"]
            for r in rows]
    return _table(header, body)


def table1(rows: list[dict], reference: dict) -> str:
    """The step-distillation rows (CFG teacher, CFG-distilled and MeanFlow samplers, no caches) in the
    layout of the paper's Table 1: NFE, theoretical and measured speedup, semantic scores with their
    intervals, paired differences to the reference and PSNR to the reference's videos."""
    header = ["Method", "CFG distilled", "NFE", "Theor. speed", "Measured speed [IQR]", "Digit", "Digit, 2nd scorer",
              "Colour", "Direction", "All-correct", "Semantic", "Δ Digit vs ref", "Δ Digit, 2nd scorer, vs ref",
              "Δ Semantic vs ref", "PSNR (dB)", "Trained steps"]
    body = [[r["label"], _mark(r["cfg_distilled"]), _num(r["nfe_dit_effective"], "{:.4g}"),
             f"{r['theoretical_speedup']:.2f}×", fmt_speed(r),
             *(fmt_ci(r, k) for k in ("digit_acc", "digit2_acc", "color_acc", "direction_acc", "all_correct",
                                      "semantic")),
             *(fmt_diff(None if r is reference else r["vs_reference"].get(k), k)
               for k in ("digit_acc", "digit2_acc", "semantic")),
             "—" if r is reference else fmt_ci(r, "psnr", "{:.2f}"), fmt_steps(r)]
            for r in rows if r["kind"] in ("teacher_cfg", "cfg_distilled", "meanflow")]
    return _table(header, body)


def table3(rows: list[dict]) -> str:
    """The ablation rows (methods with `ablation` flags) in the layout of the paper's Table 3: which of
    Restricted MeanFlow / learnable predictor / GAN training each uses, its scores with intervals and
    the paired difference to the row that uses all three (`vs_full`). Empty when there is no such row."""
    from evaluation.methods import ABLATION_KEYS

    ablations = [r for r in rows if r.get("ablation")]
    full = full_row(rows)
    if full is None:
        return ""
    mark = {True: "✔", False: "✘", None: "—"}
    header = ["Method", "Restricted MeanFlow", "Learnable predictor", "GAN training", "Semantic ↑",
              "Δ Semantic", "Quality ↑", "Δ Quality", "Total ↑", "Δ Total", "FD-classifier ↓", "Trained steps"]
    body = [[r["label"], *(mark[r["ablation"][k]] for k in ABLATION_KEYS),
             *(cell for k in ("semantic", "quality", "total")
               for cell in (fmt_ci(r, k), fmt_diff(None if r is full else r["vs_full"][k], k))),
             _num(r["fd_classifier"], "{:.4g}"), fmt_steps(r)]
            for r in sorted(ablations, key=lambda r: r is not full)]
    return _table(header, body)


def comparisons_table(comparisons: list[dict]) -> str:
    header = ["Comparison (A vs B)", "Metric", "A", "B", "A − B [95 % CI]", "Verdict"]
    body = [[c["label"], METRIC_NAMES.get(c["metric"], c["metric"]), _num(_scale(c["metric"]) * c["a_value"], "{:.1f}"),
             _num(_scale(c["metric"]) * c["b_value"], "{:.1f}"), fmt_diff(c["diff"], c["metric"]), c["verdict"]]
            for c in comparisons]
    return _table(header, body)


def faithfulness_table(rows: list[dict]) -> str:
    header = ["Method", "PSNR (dB) ↑", "SSIM ↑"]
    return _table(header, [[r["label"], fmt_ci(r, "psnr", "{:.2f}"), fmt_ci(r, "ssim")] for r in rows])


def training_notice(stages: dict[str, dict]) -> list[str]:
    """The report's first lines when any training stage stopped before its step budget."""
    early = {d: p for d, p in stages.items() if p["stopped_early"]}
    if not early:
        return []
    lines = ["> **Warning: a training run stopped before its step budget**, so the comparisons that involve "
             "it are not at equal budget:"]
    lines += [f"> - `{d}`: {p['completed_steps']} of {p['max_steps']} steps"
              + (f" (max_time {p['max_time']})" if p.get("max_time") else "") for d, p in early.items()]
    return lines + [""]


def stages_table(stages: dict[str, dict]) -> str:
    header = ["Stage (directory)", "Completed steps", "Budget (max_steps)", "max_time", "Stopped early"]
    return _table(header, [[f"`{d}`", str(p["completed_steps"]), _num(p["max_steps"], "{}"),
                            p.get("max_time") or "—", "**yes**" if p["stopped_early"] else "no"]
                           for d, p in stages.items()])


def code_line(code: dict | None) -> str:
    """' Code: commit <sha>.' (+ that tracked files had uncommitted changes), or '' when unknown."""
    if not code or not code.get("commit"):
        return ""
    dirty = " with uncommitted changes to tracked files" if code.get("uncommitted_changes") else ""
    return f" Code: commit `{code['commit'][:12]}`{dirty}."


CEILING, FLOOR = "ground truth (ceiling)", "noise (floor)"  # the bounds rows evaluate.py scores


def scorers_line(bounds: dict[str, dict]) -> str:
    """Both digit scorers with the ceiling and floor each measured (the second: 'not scored' in results
    written before it existed)."""
    def bound(key: str) -> str:
        ceiling, floor = bounds.get(CEILING, {}), bounds.get(FLOOR, {})
        if ceiling.get(key) is None or floor.get(key) is None:
            return "not scored in this evaluation"
        return f"ceiling {100 * ceiling[key]:.1f} %, floor {100 * floor[key]:.1f} %"

    return (f"Digit accuracy is read by two independent scorers: the CNN of `evaluation/semantic.py` "
            f"({bound('digit_acc')}) and a second scorer of another kind, HOG + pixel features of a centred, "
            f"size-normalised crop into a logistic regression (`evaluation/digit_scorer2.py`; {bound('digit2_acc')}). "
            "Ceiling = real world videos of unseen digits, floor = Gaussian noise. A comparison whose digit verdict "
            f"differs between the two is marked **{SCORER_DEPENDENT}** and counts as neither side better.")


def grid_name(entry: dict) -> str:
    """File name (under samples/compare/) of the side-by-side GIF of a comparison's arms."""
    return "__vs__".join(entry[k] for k in "abcd" if entry.get(k) is not None) + ".gif"


def grids_section(comparisons: list[dict], grids: dict[str, Path], labels: dict[str, str]) -> list[str]:
    """Links to the side-by-side GIF of every comparison whose grid was written, with its columns."""
    lines, seen = [], set()
    for c in comparisons:
        name = grid_name(c)
        if name in seen or name not in grids:
            continue
        seen.add(name)
        arms = [c[k] for k in "abcd" if c.get(k) is not None]
        columns = ", ".join(f"{letter} = {labels.get(arm, arm)}" for letter, arm in zip("ABCD", arms))
        lines.append(f"- [{c['label']}](samples/compare/{name}): {columns}, real = the prompt's real video")
    if not lines:
        return []
    return ["## Side-by-side samples", "", "The same prompts (one per row, seed 0) for the arms of each comparison, "
            "column by column:", "", *lines, ""]


def markdown_report(rows: list[dict], bounds: dict[str, dict], skipped: dict[str, str], meta: dict,
                    comparisons: list[dict] | None = None, grids: dict[str, Path] | None = None) -> str:
    reference = next(r for r in rows if r["name"] == meta["reference"])
    stages = meta.get("stages") or {}
    boot = meta["bootstrap"]
    parts = [
        "# Evaluation report",
        "",
        *training_notice(stages),
        f"{meta['num_samples']} videos ({meta['num_videos']} held-out validation prompts × seeds "
        f"{meta['seeds']}), every method from the same noise and prompts; device `{meta['device']}`; "
        f"reference method for speedups, paired differences and faithfulness: **{reference['label']}**. "
        f"Evaluation took {meta['seconds']:.1f} s.{code_line(meta.get('code'))}",
        "",
        f"Every score is `value [{100 * boot['level']:g} % interval]`: a percentile bootstrap over prompts "
        f"({boot['resamples']} resamples, generator seed {boot['seed']}); the seeds of one prompt are resampled "
        "together (a cluster bootstrap). Every Δ is a paired difference (A − B, in points) on the same prompts "
        "and noise with its interval; a difference is called better only when its interval excludes zero. "
        "Measured speed = median over interleaved rounds of (reference time / method time), `[q1–q3]`; ⚠ marks "
        f"a spread too wide to conclude (IQR / median > {meta['max_spread']:g}).",
        "",
        scorers_line(bounds),
        "",
        "## Quality and efficiency (layout of the paper's Table 2)",
        "",
        "Scores in %. The ground-truth ceiling (real videos) and the noise floor (Gaussian noise) are scored by "
        "the same scorer.",
        "",
        table2(rows, bounds),
        "",
        "## Step distillation (layout of the paper's Table 1)",
        "",
        table1(rows, reference),
        "",
    ]
    ablation = table3(rows)
    if ablation:
        parts += ["## Ablation (layout of the paper's Table 3)", "",
                  "Δ = paired difference to the row that uses all three components.", "", ablation, ""]
    if comparisons:
        parts += ["## Paired comparisons", "", "A − B on the same prompts and noise, in points; A or B is called "
                  "better only when the interval excludes zero.", "", comparisons_table(comparisons), ""]
        parts += grids_section(comparisons, grids or {}, {r["name"]: r["label"] for r in rows})
    parts += [
        f"## Faithfulness to {reference['label']} (same noise and prompt)",
        "",
        faithfulness_table(rows),
        "",
        "## Theoretical vs measured speedup (layout of the paper's Table 4)",
        "",
        table4(rows, meta["max_spread"]),
        "",
    ]
    noisy = [r["label"] for r in rows if r["speedup_too_noisy"]]
    if noisy:
        parts += [f"Measured speedups too noisy to conclude (IQR / median > {meta['max_spread']:g}): "
                  + ", ".join(noisy) + ". Read the theoretical (FLOP) speedup for these.", ""]
    if stages:
        parts += ["## Training budgets", "", "Completed steps of every stage whose export a method uses (read "
                  "from the stage's last checkpoint; budget and max_time from the config it ran with).", "",
                  stages_table(stages), ""]
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
        "weighting). Intervals of flicker, smoothness and motion are in results.json; FD-classifier is a "
        "set statistic and has none. The bounds rows' semantic intervals resample their own videos.",
        "- Digit, 2nd scorer = the digit as the independent second scorer reads it (`evaluation/digit_scorer2.py`: "
        "no CNN, trained on the same held-out digits with other augmentations); it enters no other score, it "
        "only checks the CNN's digit verdicts.",
        "- FD-classifier = Fréchet distance between the digit classifier's features (frame-averaged) "
        "of generated and real videos of the same prompts (not FID/FVD).",
        "- NFE = full DiT evaluations (a CFG step costs 2; a cache's partial call counts its computed "
        "fraction of block updates) + predictor evaluations.",
        f"- FLOPs = counted by torch.utils.flop_counter over one whole sampling run of "
        f"{meta['timing_batch']} video(s) (matmul/attention ops); latency = median of {meta['repeats']} "
        f"interleaved rounds after {meta['warmup']} warm-up pair(s): each round times one run of the method and "
        "one of the reference back to back (alternating which goes first), synchronised on CUDA. Latencies of "
        "different rows were taken at different times and move with the machine's load; compare rows by the "
        "measured speed, whose ratios share each round's load.",
        f"- Peak memory: {meta['memory_method']}. Cache = bytes held by the cache (peak over the run).",
        "- Per-video scores of every method are in per_video.csv (method, prompt, seed index).",
        "",
    ]
    return "\n".join(parts)


# --- figures (the Pareto plot is in evaluation/plots.py) -----------------------------------------------
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


def comparison_frames(arms: list[Tensor], num_prompts: int = 8, scale: int = 4, pad: int = 2,
                      header: int = 14) -> np.ndarray:
    """Arms' videos (each (N, 3, F, H, W) in [-1, 1], the same prompts in the same order) side by side:
    one row per prompt, one column per arm, a header naming the columns A, B, C, D and `real` (the last
    arm). Returns (F, rows, cols, 3) uint8 frames."""
    from PIL import Image, ImageDraw

    n = min(num_prompts, *(a.shape[0] for a in arms))
    x = torch.stack([a[:n].float().clamp(-1, 1) for a in arms], dim=1)  # (n, arms, 3, F, H, W)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, dim=4).repeat_interleave(scale, dim=5)
    x = torch.nn.functional.pad(x, (0, pad, 0, pad), value=255)  # white separators
    frames = rearrange(x, "r c ch f h w -> f (r h) (c w) ch").numpy()
    cell_w = x.shape[-1]
    head = Image.new("RGB", (frames.shape[2], header), "white")
    draw = ImageDraw.Draw(head)
    names = [*"ABCD"[:len(arms) - 1], "real"]
    for i, name in enumerate(names):
        draw.text((i * cell_w + 3, 1), name, fill="black")
    head = np.broadcast_to(np.asarray(head), (frames.shape[0], *np.asarray(head).shape))
    return np.concatenate([head, frames], axis=1)


def write_comparison_grids(directory: Path, comparisons: list[dict], samples: dict[str, Tensor], fps: float = 4.0,
                           scale: int = 4) -> dict[str, Path]:
    """samples/compare/<a>__vs__<b>[__vs__<c>__vs__<d>].gif for every comparison whose arms all have samples
    (and the real videos as the last column); returns {file name: path}."""
    import imageio.v3 as iio

    out = {}
    for c in comparisons:
        arms = [c[k] for k in "abcd" if c.get(k) is not None]
        name = grid_name(c)
        if name in out or not all(a in samples for a in arms) or "ground_truth" not in samples:
            continue
        directory.mkdir(parents=True, exist_ok=True)
        frames = comparison_frames([samples[a] for a in arms] + [samples["ground_truth"]], scale=scale)
        out[name] = directory / name
        out[name].write_bytes(iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0))
    return out


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
              samples: dict[str, Tensor], fps: float = 4.0, scale: int = 4, tensorboard: bool = True,
              comparisons: list[dict] | None = None,
              per_video: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Path]:
    """Every output file; returns their paths by name."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "samples").mkdir(exist_ok=True)
    paths = {"csv": output_dir / "results.csv", "json": output_dir / "results.json",
             "report": output_dir / "report.md", "pareto": output_dir / "pareto.png"}
    write_csv(rows, paths["csv"])
    write_json({"meta": meta, "methods": rows, "bounds": bounds, "comparisons": comparisons or [],
                "skipped": skipped}, paths["json"])
    if per_video:
        paths["per_video"] = output_dir / "per_video.csv"
        write_per_video(per_video, meta["num_videos"], paths["per_video"])
    grids = write_comparison_grids(output_dir / "samples" / "compare", comparisons or [], samples, fps, scale)
    paths |= {f"compare/{name}": path for name, path in grids.items()}
    report_md = markdown_report(rows, bounds, skipped, meta, comparisons, grids)
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
