"""`make demo`: prepare data -> (shipped) teacher -> CFG distillation -> Restricted MeanFlow ->
predictor GAN -> evaluate, on the embedded default world. Every stage is the user's own command
(`python prepare.py`, `python train.py --config ...`, `python evaluate.py --config ...`) run as a
subprocess; a finished stage leaves a marker and is skipped next time, an interrupted one resumes
from its last checkpoint. Budgets live in configs/demo.yaml: step budgets, no time caps, and the arms
of each comparison (`equal_budgets`) must have equal ones. Every stage's completed steps are printed
and saved to outputs/demo/stages.json; the evaluation report lists them next to its rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.progress import stage_progress  # noqa: E402


def run(cmd: list[str], log: Path) -> float:
    """Run a command from the repo root, tee its output to `log`, fail loudly on error."""
    print(f"$ {' '.join(cmd)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("\r", "Epoch")) and "Warning" not in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"demo: `{' '.join(cmd)}` failed (exit {proc.returncode}); full log in {log}")
    elapsed = time.time() - start
    print(f"  ({elapsed:.0f} s)", flush=True)
    return elapsed


def run_timed(name: str, cmd: list[str], logs: Path, marks: Path) -> float:
    """`run` into `<logs>/<name>.log`, recording its wall seconds in the stage history whether it succeeds
    or fails (`record_seconds`)."""
    start = time.time()
    try:
        return run(cmd, logs / f"{name}.log")
    finally:
        record_seconds(marks, name, time.time() - start)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    cfg = OmegaConf.load(ROOT / args.config)
    stage_cfgs = OmegaConf.to_container(cfg.stages)
    check_equal_budgets(stage_cfgs, OmegaConf.to_container(cfg.get("equal_budgets", [])))
    py = sys.executable
    marks = ROOT / cfg.get("state_dir", f"{cfg.output_root}/demo")
    logs = marks / "logs"
    total = time.time()
    timings: dict[str, float | None] = {}  # seconds per stage run now; None = done earlier
    estimates = plan(cfg, stage_cfgs, marks)
    print_plan(estimates, args.config, cfg.get("costs_from", "results/reproduction"))

    def stage(name: str, cmd: list[str]) -> None:
        mark = marks / f"{name}.done"
        if mark.exists():
            print(f"[{name}] done already ({mark}); delete the marker to redo it")
            timings[name] = None
            estimates.pop(name, None)
            return
        print(f"[{name}]", flush=True)
        timings[name] = run_timed(name, cmd, logs, marks)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        estimates.pop(name, None)
        print(eta_line(name, timings[name], time.time() - total, estimates), flush=True)

    # 1. data
    data_dir = ROOT / cfg.data.dir
    if not (data_dir / "metadata.json").exists():
        stage("data", [py, "prepare.py", "--out", cfg.data.dir, *cfg.data.prepare])
    # 2. teacher: shipped for the CPU demo, trained here on a GPU
    teacher = ROOT / cfg.teacher
    extra_stage: list[str] = []
    if args.device == "cuda":
        stage("teacher_cuda", [py, "train.py", "--config", "configs/teacher_pretrain.yaml",
                               *cfg.cuda.teacher_overrides, *_resume("outputs/teacher")])
        teacher = ROOT / "outputs/teacher/export"
        extra_stage = list(cfg.cuda.stage_overrides)
    if not (teacher / "model.safetensors").exists():
        raise SystemExit(f"demo: the default teacher {teacher} is missing; run `make teacher` to train it")
    print(f"[teacher] {teacher}")
    # 3. distillation stages
    progress: dict[str, dict | None] = {}
    for s in cfg.stages:
        overrides = list(s.overrides) + list(s.get("extra", [])) + extra_stage
        if s.name == "cfg_distill":
            overrides += ["--model.init_args.teacher.init_args.directory", str(teacher)]
        root = f"{cfg.output_root}/{s.name}"
        stage(s.name, [py, "train.py", "--config", s.config, "--trainer.default_root_dir", root, *overrides,
                       *_resume(root)])
        progress[s.name] = stage_progress(ROOT / cfg.output_root / s.name / "export")
        print(f"[{s.name}] {progress_line(progress[s.name])}", flush=True)
    (marks / "stages.json").write_text(json.dumps(progress, indent=1))
    # 4. TeaCache calibration for the cache baselines
    stage("teacache_calibration", [py, "calibrate_teacache.py", *cfg.teacache])
    # 5. evaluation (always rerun: it is the report); `extra_evaluations` (e.g. Figure 1) run after it
    out = Path(cfg.evaluate.output_dir)
    for i, ev_cfg in enumerate([cfg.evaluate, *cfg.get("extra_evaluations", [])]):
        ev = [py, "evaluate.py", "--config", ev_cfg.config, "--output_dir", ev_cfg.output_dir, *ev_cfg.overrides]
        if args.device == "cuda":
            ev += ["--device", "cuda", "--teacher", str(teacher)]
        name = "evaluate" if i == 0 else f"evaluate_{Path(ev_cfg.output_dir).name}"
        print(f"[{name}]", flush=True)
        timings[name] = run_timed(name, ev, logs, marks)
        estimates.pop(name, None)
        print(eta_line(name, timings[name], time.time() - total, estimates), flush=True)
    report = ROOT / out / "report.md"
    timings["total"] = time.time() - total
    (marks / "timings.json").write_text(json.dumps(timings, indent=1))
    history = read_seconds(marks)
    print("\nstage times (s): this run ('-' = done in an earlier run), and all runs of the stage that ended "
          f"({marks / SECONDS_FILE}):")
    for name, sec in timings.items():
        runs = history.get(name, [])  # none for the total, or for a stage finished before the history existed
        print(f"  {name:<26} {'-' if sec is None else f'{sec:7.0f}'}"
              + (f"   {sum(runs):7.0f} in {len(runs)} run(s)" if runs else ""))
    early = [name for name, p in progress.items() if p is not None and p["stopped_early"]]
    unknown = [name for name, p in progress.items() if p is None]
    if early:
        print(f"\nWARNING: stages below their step budget (see the report's first lines): {early}")
    if unknown:
        print(f"\nWARNING: completed steps unknown (no training_state.json beside the export): {unknown}")
    if cfg.get("collect_to"):
        report = collect(ROOT / cfg.collect_to, ROOT / out, ROOT / cfg.output_root, progress, marks)
        for ev_cfg in cfg.get("extra_evaluations", []):
            collect(ROOT / cfg.collect_to / Path(ev_cfg.output_dir).name, ROOT / ev_cfg.output_dir,
                    ROOT / cfg.output_root, {}, marks)
        if cfg.get("claims"):  # the paper's claims as verdicts with intervals: <collect_to>/claims.md
            from evaluation.claims import write_claims
            write_claims(ROOT / cfg.collect_to, ROOT / cfg.claims)
            print(f"claims: {ROOT / cfg.collect_to / 'claims.md'}")
    print(f"\ndemo finished in {timings['total'] / 60:.1f} min. Open:\n"
          f"  {report}   the tables, comparisons and verdicts\n"
          f"  {report.parent / 'pareto.png'}   quality against speedup, with intervals\n"
          f"  {report.parent / 'results.json'}   every number of the report (per_video.csv beside it)\n"
          f"logs: {logs}")
    return report


def collect(dest: Path, eval_dir: Path, output_root: Path, progress: dict, marks: Path) -> Path:
    """Copy what a run is judged by (no weights) into `dest`, e.g. results/reproduction/ to be committed:
    the evaluation's report.md / results.json / results.csv / per_video.csv / pareto.png and the GIF grids
    of its comparisons (samples/compare/), every stage's
    training log (its CSVLogger metrics.csv), stages.json and timings.json, and machine.json (the commit,
    the machine and the library versions the run used)."""
    import platform
    import shutil

    import torch

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.json", "results.csv", "per_video.csv", "pareto.png"):
        if (eval_dir / name).exists():
            shutil.copy2(eval_dir / name, dest / name)
    if (eval_dir / "samples" / "compare").is_dir():  # the side-by-side GIF grids report.md links
        shutil.copytree(eval_dir / "samples" / "compare", dest / "samples" / "compare", dirs_exist_ok=True)
    for name in progress:
        log = output_root / name / "csv" / "metrics.csv"
        if log.exists():
            (dest / "training_logs").mkdir(exist_ok=True)
            shutil.copy2(log, dest / "training_logs" / f"{name}.csv")
    for name in ("stages.json", "timings.json", SECONDS_FILE):
        if (marks / name).exists():
            shutil.copy2(marks / name, dest / name)
    from evaluation.progress import code_version

    machine = {**code_version(ROOT), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    (dest / "machine.json").write_text(json.dumps(machine, indent=1))
    return dest / "report.md"


# --- the plan and the ETA: estimated from measured costs ----------------------------------------------------
# The reference costs are the committed measurements of `make reproduce` (seconds per stage invocation and the
# steps it completed, on the 2-core CPU of results/reproduction/machine.json), refined by this run's own history
# A pipeline config may name another finished run's results with `costs_from` (configs/demo.yaml: the committed
# demo run, whose short stages carry start-up costs the long runs amortise). A stage with no measurement of its own
# takes the median seconds per step of the measured stages of the same LightningModule class.
COSTS_DIR = ROOT / "results/reproduction"
# One training stage's start-up, validation and export beyond its steps, measured on 2026-12-07: two 150-step
# stage-2 arms alone on the 2-core CPU took 177 and 173 s against 147 s of steps at the reproduction's cost.
STARTUP_SECONDS = 27.0


def _model_class(config: str) -> str:
    return ((yaml.safe_load((ROOT / config).read_text()) or {}).get("model") or {}).get("class_path", "")


def step_costs(costs_dir: Path = COSTS_DIR) -> dict[str, float]:
    """Measured seconds per training step, by stage name, from a finished run's stage_seconds.json +
    stages.json (the last invocation of each stage over the steps it completed)."""
    sec, steps = costs_dir / SECONDS_FILE, costs_dir / "stages.json"
    if not (sec.is_file() and steps.is_file()):
        return {}
    seconds, progress = json.loads(sec.read_text()), json.loads(steps.read_text())
    return {name: seconds[name][-1] / p["completed_steps"] for name, p in progress.items()
            if p and p.get("completed_steps") and seconds.get(name)}


def evaluation_cost(costs_dir: Path = COSTS_DIR) -> float | None:
    """Measured seconds per (method x video) of a finished run's main evaluation."""
    results, sec = costs_dir / "results.json", costs_dir / SECONDS_FILE
    if not (results.is_file() and sec.is_file()):
        return None
    data, seconds = json.loads(results.read_text()), json.loads(sec.read_text())
    n = len(data["methods"]) * data["meta"]["num_videos"] * len(data["meta"]["seeds"])
    return seconds["evaluate"][-1] / n if seconds.get("evaluate") and n else None


def _evaluation_size(ev_cfg) -> int:
    """methods x videos x seeds of an evaluation entry (its config, then its overrides)."""
    import evaluate

    parsed = evaluate.build_parser().parse_args(["--config", str(ROOT / ev_cfg.config), *map(str, ev_cfg.overrides)])
    return len(parsed.methods) * parsed.num_videos * len(parsed.seeds)


def plan(cfg, stage_cfgs: list[dict], marks: Path) -> dict[str, float | None]:
    """Estimated seconds of every stage and evaluation still to run (a finished stage is left out; None =
    no measurement to estimate from)."""
    import statistics

    costs_dir = ROOT / cfg.get("costs_from", "results/reproduction")
    measured = step_costs(costs_dir)
    by_class: dict[str, list[float]] = {}
    for s in stage_cfgs:
        if s["name"] in measured:
            by_class.setdefault(_model_class(s["config"]), []).append(measured[s["name"]])
    out: dict[str, float | None] = {}
    for s in stage_cfgs:
        if (marks / f"{s['name']}.done").exists():
            continue
        steps = budget(s)["max_steps"]
        per_step = measured.get(s["name"])
        if per_step is None and by_class.get(_model_class(s["config"])):
            per_step = statistics.median(by_class[_model_class(s["config"])])
        out[s["name"]] = None if steps is None or per_step is None else int(steps) * per_step + STARTUP_SECONDS
    per_video = evaluation_cost(costs_dir)
    for i, ev_cfg in enumerate([cfg.evaluate, *cfg.get("extra_evaluations", [])]):
        name = "evaluate" if i == 0 else f"evaluate_{Path(ev_cfg.output_dir).name}"
        out[name] = None if per_video is None else _evaluation_size(ev_cfg) * per_video
    return out


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.0f} min"


def print_plan(estimates: dict[str, float | None], config: str, costs_from: str) -> None:
    known = [v for v in estimates.values() if v is not None]
    print(f"plan ({config}; estimated from the seconds per step measured in {costs_from}/ on a 2-core CPU, "
          f"plus {STARTUP_SECONDS:.0f} s of start-up and export per stage):")
    for name, sec in estimates.items():
        print(f"  {name:<28} ~{_minutes(sec)}")
    print(f"  {'in all':<28} ~{_minutes(sum(known))}" + (" (+ stages with no estimate)" if len(known) < len(estimates)
                                                           else ""), flush=True)


def eta_line(name: str, seconds: float, elapsed: float, remaining: dict[str, float | None]) -> str:
    """One line per finished stage: its time, the time so far and the estimate of what is left."""
    left = [v for v in remaining.values() if v is not None]
    unknown = len(remaining) - len(left)
    return (f"[{name}] finished in {_minutes(seconds)}; elapsed {_minutes(elapsed)}; about {_minutes(sum(left))} left"
            f" ({len(remaining)} stage(s) to go{f', {unknown} without an estimate' if unknown else ''})")


SECONDS_FILE = "stage_seconds.json"


def read_seconds(marks: Path) -> dict[str, list[float]]:
    path = marks / SECONDS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_seconds(marks: Path, name: str, seconds: float) -> None:
    """Append one invocation's wall seconds to `<marks>/stage_seconds.json` ({stage: [seconds, ...]}), so
    that a stage resumed across sessions keeps the cost of every invocation that ended (a process killed
    with its machine records nothing)."""
    from models.io import atomic_write_json

    history = read_seconds(marks)
    history.setdefault(name, []).append(round(seconds, 1))
    atomic_write_json(marks / SECONDS_FILE, history)


def budget(stage: dict) -> dict[str, str | None]:
    """A demo stage's effective max_steps / max_time: the last override, else its config's trainer value."""
    args = [str(a) for a in [*stage.get("overrides", []), *stage.get("extra", [])]]
    trainer = (yaml.safe_load((ROOT / stage["config"]).read_text()) or {}).get("trainer") or {}
    out = {}
    for key in ("max_steps", "max_time"):
        flag = f"--trainer.{key}"
        given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
        value = given[-1] if given else trainer.get(key)
        out[key] = None if value is None else str(value)
    return out


def check_equal_budgets(stages: list[dict], groups: list[list[str]]) -> None:
    """Refuse a demo whose comparison arms (`equal_budgets` groups of stage names) differ in
    max_steps or max_time: the report compares them as equal-budget runs."""
    by_name = {s["name"]: s for s in stages}
    for group in groups:
        unknown = [n for n in group if n not in by_name]
        if unknown:
            raise SystemExit(f"demo: equal_budgets names unknown stages {unknown}; stages: {sorted(by_name)}")
        budgets = {n: budget(by_name[n]) for n in group}
        if len({tuple(b.values()) for b in budgets.values()}) > 1:
            raise SystemExit(f"demo: the arms {group} of one comparison must have equal step budgets and time caps, "
                             f"got {budgets}")


def progress_line(progress: dict | None) -> str:
    """'completed N of M steps', with a warning when the run stopped before its budget."""
    if progress is None:
        return "WARNING: no training_state.json beside the export, completed steps unknown"
    text = f"completed {progress['completed_steps']} of {progress['max_steps']} steps"
    return f"WARNING: {text}: stopped early" if progress["stopped_early"] else text


def _resume(root: str) -> list[str]:
    last = ROOT / root / "checkpoints" / "last.ckpt"
    return ["--ckpt_path", str(last)] if last.exists() else []


if __name__ == "__main__":
    main()
