"""The paper's claims as verdicts with intervals, read from an evaluation's committed outputs.

    python -m evaluation.claims --results results/reproduction --config configs/claims.yaml

reads `<results>/<source>/results.json` (the rows, their theoretical speedups and the bootstrap settings)
and `<results>/<source>/per_video.csv` (every method's per-video scores), tests every claim of the config
(`configs/claims.yaml` documents the tests) and writes `<results>/claims.md` (the README's claims table plus
every part's numbers) and `<results>/claims.json`. Each part is a paired difference on the same prompts and
noise, computed by the report's own `report.compare` with the evaluation's bootstrap indices, so it equals the
report's comparison of the same pair (up to per_video.csv's six significant digits).

A claim on a metric that contains the digit accuracy (`report.DIGIT_DEPENDENT`) is also tested on the digit alone
under both digit scorers: the CNN (`digit_acc`) and the independent second scorer (`digit2_acc`,
evaluation/digit_scorer2.py). When those two digit verdicts differ the claim is "scorer-dependent", never
reproduced or not reproduced. Results written before the second scorer existed have no `digit2_acc`: their
claims keep the CNN's verdict and say that the second scorer is unavailable.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from evaluation import report, stats
from evaluation.report import _scale, _table, fmt_diff

TESTS = ("greater", "less", "within")
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not tested", report.SCORER_DEPENDENT)
DIGIT_SCORERS = {"digit_acc": "CNN", "digit2_acc": "2nd scorer"}  # the digit under each scorer
UNAVAILABLE = ("second digit scorer unavailable: per_video.csv has no digit2_acc scores (written before the second digit "
               "scorer existed; rerun the evaluation, which resumes every method's stored videos, to rescore)")


def read_per_video(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """per_video.csv -> {method: {metric: (P, S) array}} (prompts x seeds, as the evaluator drew them)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: claims are tested on an evaluation's per-video scores "
                                "(evaluate.py writes per_video.csv into its output_dir)")
    cells: dict[str, dict[str, dict[tuple[int, int], float]]] = defaultdict(lambda: defaultdict(dict))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            key = (int(row["prompt"]), int(row["seed_index"]))
            for metric, value in row.items():
                if metric not in ("method", "prompt", "seed_index") and value != "":
                    cells[row["method"]][metric][key] = float(value)
    out = {}
    for method, metrics in cells.items():
        out[method] = {}
        for metric, values in metrics.items():
            num_p = max(p for p, _ in values) + 1
            num_s = max(s for _, s in values) + 1
            if len(values) != num_p * num_s:
                raise ValueError(f"{path}: {method}/{metric} has {len(values)} videos, not prompts x seeds "
                                 f"({num_p} x {num_s})")
            matrix = np.empty((num_p, num_s))
            for (p, s), v in values.items():
                matrix[p, s] = v
            out[method][metric] = matrix
    return out


def _side(diff: list[float], test: str, bound: float) -> str:
    """'supported' / 'contradicted' / 'open' for the interval [low, high] of a difference against `bound`."""
    _, low, high = diff
    if test == "less":
        return "supported" if high < bound else "contradicted" if low > bound else "open"
    return "supported" if low > bound else "contradicted" if high < bound else "open"


def check_part(part: dict, metric: str, per_video: dict, rows: dict, indices: np.ndarray, level: float) -> dict:
    """One paired difference of a claim (computed by the report's own `report.compare`), its interval and
    whether it supports the claim."""
    validate_part(part, "claim part")
    test = part.get("test", "greater")
    names = {k: part[k] for k in ("a", "b", "c", "d") if part.get(k) is not None}
    missing = [n for n in names.values() if n not in per_video or metric not in per_video[n]]
    if missing:
        raise KeyError(f"claim part {part}: no per-video {metric!r} scores for {missing}; methods evaluated: "
                       f"{sorted(per_video)}")
    # (P, S) -> the evaluator's flat seed-major order that report.compare reads
    flat = {n: {metric: per_video[n][metric].T.reshape(-1)} for n in names.values()}
    labels = {n: rows.get(n, {}).get("label", n) for n in names.values()}
    num_prompts = per_video[part["a"]][metric].shape[0]
    (entry,) = report.compare(flat, labels, [{**part, "metrics": [metric]}], num_prompts, indices, level)
    bound = -part["margin"] * abs(entry["b_value"]) if test == "within" else 0.0
    out = {**part, "test": test, "metric": metric, "names": {k: labels[n] for k, n in names.items()},
           "a_value": entry["a_value"], "b_value": entry["b_value"], "diff": entry["diff"], "bound": bound,
           "result": _side(entry["diff"], test, bound)}
    if part.get("min_theoretical_speedup") is not None:
        speed = rows[part["a"]]["theoretical_speedup"]
        out["theoretical_speedup"] = speed
        if speed < part["min_theoretical_speedup"]:
            out["result"] = "contradicted"
    return out


def expand(claim: dict, rows: dict) -> list[dict]:
    """The claim's parts; `every_cache_at_or_below: A` becomes A > cache for every cache row at or below A's
    theoretical speedup."""
    parts = list(claim.get("parts", []))
    if claim.get("every_cache_at_or_below"):
        a = claim["every_cache_at_or_below"]
        if a not in rows:
            raise KeyError(f"claim {claim['id']}: {a!r} is not a method of the evaluation ({sorted(rows)})")
        caches = [r for r in rows.values() if r["kind"] == "cache"
                  and r["theoretical_speedup"] <= rows[a]["theoretical_speedup"]]
        parts += [{"a": a, "b": r["name"], "test": "greater"} for r in caches]
    return parts


def verdict(results: list[str]) -> str:
    if all(r == "supported" for r in results):
        return "reproduced"
    if any(r == "contradicted" for r in results):
        return "not reproduced"
    return "inconclusive"


def load_source(directory: Path) -> tuple[dict, dict, np.ndarray, float, dict]:
    """rows by name, per-video scores, the evaluation's bootstrap indices and level, and what it skipped
    (`load_bounds` reads its ceiling and floor)."""
    path = directory / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the evaluation first (make reproduce writes "
                                "results/reproduction/results.json and figure1/results.json)")
    data = json.loads(path.read_text())
    rows = {r["name"]: r for r in data["methods"]}
    per_video = read_per_video(directory / "per_video.csv")
    boot = data["meta"]["bootstrap"]
    num_prompts = data["meta"]["num_videos"]
    indices = stats.resample_indices(num_prompts, boot["resamples"], boot["seed"])
    return rows, per_video, indices, boot["level"], data.get("skipped") or {}


def load_bounds(directory: Path) -> dict[str, dict]:
    """The evaluation's ground-truth ceiling and noise floor rows (results.json), {} when it has none."""
    path = directory / "results.json"
    return (json.loads(path.read_text()).get("bounds") or {}) if path.exists() else {}


def digit_verdicts(parts: list[dict], per_video: dict, rows: dict, indices: np.ndarray, level: float) -> dict | None:
    """The claim's parts tested on the digit under each scorer: {metric: {"parts", "verdict"}}, or
    {"verdict": "unavailable", "note"} for the second scorer where a method has no digit2_acc scores (None
    when the scores have no digit at all)."""
    names = {p[k] for p in parts for k in "abcd" if p.get(k) is not None}
    if any("digit_acc" not in per_video.get(n, {}) for n in names):
        return None  # scores without any digit column (hand-made files): nothing to check
    out = {}
    for metric in DIGIT_SCORERS:
        if any(metric not in per_video[n] for n in names):
            out[metric] = {"parts": [], "verdict": "unavailable", "note": UNAVAILABLE}
            continue
        tested = [check_part(p, metric, per_video, rows, indices, level) for p in parts]
        out[metric] = {"parts": tested, "verdict": verdict([p["result"] for p in tested])}
    return out


def final_verdict(metric_verdict: str, digit: dict | None) -> tuple[str, bool]:
    """The claim's verdict and whether it is scorer-dependent: its metric's verdict, unless its digit verdicts
    under the two scorers differ (then "scorer-dependent")."""
    if not digit or digit["digit2_acc"]["verdict"] == "unavailable":
        return metric_verdict, False
    if digit["digit_acc"]["verdict"] != digit["digit2_acc"]["verdict"]:
        return report.SCORER_DEPENDENT, True
    return metric_verdict, False


def evaluate_claims(results_dir: Path, claims: list[dict]) -> list[dict]:
    sources: dict[str, tuple] = {}
    out = []
    for claim in claims:
        source = claim.get("source", ".")
        if source not in sources:
            sources[source] = load_source(results_dir / source)
        rows, per_video, indices, level, skipped = sources[source]
        entry = {k: v for k, v in claim.items() if k != "parts"} | {"source": source}
        names = {p[k] for p in claim.get("parts", []) for k in "abcd" if p.get(k)}
        names |= {claim["every_cache_at_or_below"]} if claim.get("every_cache_at_or_below") else set()
        not_run = sorted(n for n in names if n in skipped)
        if not_run:  # the evaluation skipped a method (skip_missing): the claim is not tested, not an error
            out.append(entry | {"parts": [], "verdict": "not tested", "metric_verdict": "not tested", "digit": None,
                                "scorer_dependent": False,
                                "note": "; ".join(f"{n} skipped by the evaluation: {skipped[n]}" for n in not_run)})
            continue
        expanded = expand(claim, rows)
        parts = [check_part(p, claim["metric"], per_video, rows, indices, level) for p in expanded]
        metric_verdict = verdict([p["result"] for p in parts]) if parts else "inconclusive"
        digit = (digit_verdicts(expanded, per_video, rows, indices, level)
                 if parts and claim["metric"] in report.DIGIT_DEPENDENT else None)
        final, dependent = final_verdict(metric_verdict, digit)
        for p in parts:  # the side-by-side GIF of the part's arms, where the evaluation's samples are kept
            grid = Path(source) / "samples" / "compare" / report.grid_name(p)
            if (results_dir / grid).is_file():
                p["grid"] = grid.as_posix()
        entry |= {"parts": parts, "metric_verdict": metric_verdict, "digit": digit, "scorer_dependent": dependent,
                  "verdict": final}
        if not parts:  # every_cache_at_or_below found no cache as slow as A: nothing to compare at equal speed
            a = claim["every_cache_at_or_below"]
            entry["note"] = (f"no training-free cache at or below the theoretical speedup of {a} "
                             f"({rows[a]['theoretical_speedup']:.2f}x)")
        out.append(entry)
    return out


def _part_text(part: dict) -> str:
    name = part["names"].get
    if part.get("c") is not None:
        pair = f"({name('a')} − {name('b')}) − ({name('c')} − {name('d')})"
    else:
        pair = f"{name('a')} − {name('b')}"
    text = f"{pair}: {fmt_diff(part['diff'], part['metric'])}"
    if part["test"] == "within":
        text += f" (bound {_scale(part['metric']) * part['bound']:+.1f})"
    if "theoretical_speedup" in part:
        text += f"; {part['theoretical_speedup']:.2f}x theoretical (needs >= {part['min_theoretical_speedup']:g}x)"
    return text


def _digit_cell(claim: dict, metric: str) -> str:
    """The claim's digit verdict under one scorer: the paired difference of a single part, else the count."""
    if not claim.get("digit"):
        return "—"
    d = claim["digit"][metric]
    if d["verdict"] == "unavailable":
        return "unavailable"
    if len(d["parts"]) == 1:
        return f"Δ {fmt_diff(d['parts'][0]['diff'], metric)} → {d['verdict']}"
    return f"{d['verdict']} ({len(d['parts'])} parts)"


def _unavailable(claim: dict) -> bool:
    return bool(claim.get("digit")) and claim["digit"]["digit2_acc"]["verdict"] == "unavailable"


def scorers_note(bounds_by_source: dict[str, dict]) -> str:
    """Each evaluation's ceiling and floor under both digit scorers."""
    lines = []
    for source, bounds in bounds_by_source.items():
        ceiling, floor = bounds.get(report.CEILING, {}), bounds.get(report.FLOOR, {})
        cells = [f"{name} " + (f"ceiling {100 * ceiling[k]:.1f} %, floor {100 * floor[k]:.1f} %"
                               if ceiling.get(k) is not None and floor.get(k) is not None else "not scored")
                 for k, name in DIGIT_SCORERS.items()]
        lines.append(f"Digit scorers on `{source}`: " + "; ".join(cells) + ".")
    return " ".join(lines)


def claims_markdown(claims: list[dict], header_note: str = "") -> str:
    """The README's claims table (one row per claim, with its digit verdict under both digit scorers) and,
    below it, every part with its methods."""
    body = []
    for c in claims:
        scale = _scale(c["metric"])
        if not c["parts"]:  # not tested, or no cache to compare with
            ours = c["note"]
        elif len(c["parts"]) > 1:
            ours = f"{len(c['parts'])} paired differences, see below"
        elif c["parts"][0].get("c") is not None:  # a difference of differences
            ours = _part_text(c["parts"][0])
        else:
            p = c["parts"][0]
            ours = f"{scale * p['a_value']:.1f} vs {scale * p['b_value']:.1f}, Δ {fmt_diff(p['diff'], c['metric'])}"
            if "theoretical_speedup" in p:
                ours += f"; {p['theoretical_speedup']:.2f}x theoretical"
        verdict_text = f"**{c['verdict']}**"
        if c.get("scorer_dependent"):
            verdict_text += f" ({c['metric']} with the CNN's digit: {c['metric_verdict']})"
        body.append([c["claim"], c["paper"], f"{c['metric']}: {ours}", *(_digit_cell(c, k) for k in DIGIT_SCORERS),
                     verdict_text])
    table = _table(["Claim of the paper", "Paper", "Ours (95 % interval)", "Digit, CNN", "Digit, 2nd scorer",
                    "Verdict"], body)
    detail = []
    for c in claims:
        detail.append(f"- **{c['id']}** ({c['metric']}, source `{c['source']}/per_video.csv`): {c['verdict']}")
        detail += [f"  - {_part_text(p)} → {p['result']}" + (f" ([side by side]({p['grid']}))" if p.get("grid") else "")
                   for p in c["parts"]] or [f"  - {c['note']}"]
        for metric, name in DIGIT_SCORERS.items():
            d = (c.get("digit") or {}).get(metric)
            if d is not None:
                detail += ([f"  - digit, {name}: {_part_text(p)} → {p['result']}" for p in d["parts"]]
                           or [f"  - digit, {name}: unavailable (no digit2_acc in per_video.csv)"])
    return "\n".join([header_note, "", table, "", "Every part (Δ in points; a within-test's bound is "
                      "−margin × B):", "", *detail, ""]).lstrip()


REQUIRED = ("id", "claim", "paper", "metric")


def validate_part(part: dict, where: str) -> None:
    """A part names a and b (and c with d), a known test, and a margin for `within`."""
    if not part.get("a") or not part.get("b") or (part.get("c") is None) != (part.get("d") is None):
        raise ValueError(f"{where}: part {part} needs a and b (and c with d)")
    if part.get("test", "greater") not in TESTS:
        raise ValueError(f"{where}: test must be one of {TESTS}, got {part['test']!r}")
    if part.get("test") == "within" and not part.get("margin"):
        raise ValueError(f"{where}: a `within` part needs a margin (e.g. 0.03)")


def load_config(config: Path) -> list[dict]:
    """The claims of a config file, checked before any score is read: every field present, every test known."""
    spec = yaml.safe_load(Path(config).read_text()) or {}
    if not spec.get("claims"):
        raise ValueError(f"{config} lists no claims (expected a top-level `claims:` list)")
    for claim in spec["claims"]:
        missing = [k for k in REQUIRED if not claim.get(k)]
        if missing:
            raise ValueError(f"{config}: claim {claim.get('id', claim)} lacks {missing} (each claim needs {REQUIRED})")
        if not claim.get("parts") and not claim.get("every_cache_at_or_below"):
            raise ValueError(f"{config}: claim {claim['id']} has no parts to test (give `parts` or "
                             "`every_cache_at_or_below`)")
        for part in claim.get("parts", []):
            validate_part(part, f"{config}: claim {claim['id']}")
    return spec["claims"]


def write_claims(results_dir: Path, config: Path, name: str = "claims") -> list[dict]:
    """Test the claims of `config` on `results_dir`; write `<name>.md` and `<name>.json` there."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ValueError(f"name must be a plain file stem (letters, digits, _ or -), got {name!r}")
    claims = evaluate_claims(results_dir, load_config(config))
    machine = results_dir / "machine.json"
    commit = json.loads(machine.read_text()).get("commit") if machine.exists() else None
    note = (f"Claims of `{config}` tested on `{results_dir}` (evaluation commit {commit or 'unknown'}). "
            "Reproduced = every paired difference's 95 % interval on the claimed side; not reproduced = one "
            "on the other side; inconclusive = an interval that contains the claimed boundary; not tested = a "
            "method the claim needs was skipped by the evaluation; scorer-dependent = the claim's parts tested on "
            "the digit give different verdicts under the two digit scorers (the CNN of evaluation/semantic.py and "
            "the independent HOG + logistic-regression scorer of evaluation/digit_scorer2.py), so the claim is "
            "neither reproduced nor refuted. "
            + scorers_note({c["source"]: load_bounds(results_dir / c["source"]) for c in claims})
            + (f" {UNAVAILABLE[0].upper()}{UNAVAILABLE[1:]}." if any(_unavailable(c) for c in claims) else ""))
    (results_dir / f"{name}.md").write_text(claims_markdown(claims, note))
    (results_dir / f"{name}.json").write_text(json.dumps(claims, indent=1, default=float))
    return claims


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, type=Path, help="directory with results.json and per_video.csv")
    p.add_argument("--config", default=Path("configs/claims.yaml"), type=Path)
    p.add_argument("--name", default="claims", help="write <results>/<name>.md and <name>.json")
    args = p.parse_args(argv)
    claims = write_claims(args.results, args.config, args.name)
    print((args.results / f"{args.name}.md").read_text())
    return claims


if __name__ == "__main__":
    main()
