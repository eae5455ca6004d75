"""The demo's budgets: equal step budgets for the arms of each comparison and no time caps
(configs/demo.yaml, scripts/demo.py), and the completed steps read back from a real run's checkpoint,
including a run that a time cap stopped early (evaluation/progress.py)."""
from __future__ import annotations

import pytest
import yaml

import train
from evaluation import report
from evaluation.progress import stage_progress
from scripts import demo
from tests.conftest import ROOT

DEMO = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
STAGES = {s["name"]: s for s in DEMO["stages"]}


def option(stage: dict, flag: str, default=None):
    args = [str(a) for a in [*stage["overrides"], *stage.get("extra", [])]]
    return args[len(args) - 1 - args[::-1].index(flag) + 1] if flag in args else default


def test_demo_has_no_time_caps_and_equal_budgets():
    for stage in DEMO["stages"]:
        assert demo.budget(stage)["max_time"] is None, stage["name"]
    demo.check_equal_budgets(DEMO["stages"], DEMO["equal_budgets"])
    r_arms = {"restricted_meanflow", "restricted_meanflow_r04"} | {n for n in STAGES if "meanflow_r1" in n}
    assert any(r_arms <= set(group) for group in DEMO["equal_budgets"])


def test_gan_and_no_gan_predictors_see_the_same_batches():
    def batches(stage: dict) -> int:
        steps = int(demo.budget(stage)["max_steps"])
        lam = float(option(stage, "--model.init_args.lam", yaml.safe_load(
            (ROOT / stage["config"]).read_text())["model"]["init_args"]["lam"]))
        if lam == 0:  # MSE only: one optimizer step per batch
            return steps
        warmup = int(option(stage, "--model.init_args.mse_warmup_steps"))
        return warmup + (steps - warmup) // 2  # then a D and a P step per batch

    assert batches(STAGES["predictor_gan"]) == batches(STAGES["predictor_gan_nogan"]) == 130


def test_unequal_arms_are_refused():
    stages = [dict(STAGES["restricted_meanflow"]),
              {**STAGES["restricted_meanflow_r04"], "extra": ["--trainer.max_time", "00:00:08:00"]}]
    with pytest.raises(SystemExit, match="must have equal step budgets and time caps"):
        demo.check_equal_budgets(stages, [["restricted_meanflow", "restricted_meanflow_r04"]])
    stages[1] = {**STAGES["restricted_meanflow_r04"], "extra": ["--trainer.max_steps", "75"]}
    with pytest.raises(SystemExit, match="'max_steps': '75'"):
        demo.check_equal_budgets(stages, [["restricted_meanflow", "restricted_meanflow_r04"]])
    with pytest.raises(SystemExit, match="unknown stages \\['nope'\\]"):
        demo.check_equal_budgets(stages, [["restricted_meanflow", "nope"]])


def fit(run, data, *overrides: str):
    cli = train.build_cli(["--config", str(ROOT / "configs/smoke/teacher_pretrain.yaml"),
                           "--trainer.default_root_dir", str(run), "--data.init_args.data_dir", str(data),
                           "--trainer.enable_progress_bar", "false", *overrides])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def test_completed_steps_of_real_runs_full_and_stopped_early_by_a_time_cap(tmp_path):
    fit(tmp_path / "full", tmp_path / "data", "--trainer.max_steps", "13")  # ends between checkpoints (every 10)
    full = stage_progress(tmp_path / "full" / "export")
    assert (full["completed_steps"], full["max_steps"], full["stopped_early"]) == (13, 13, False)
    assert demo.progress_line(full) == "completed 13 of 13 steps"

    run = tmp_path / "run"
    cli = fit(run, tmp_path / "data", "--trainer.max_steps", "100000", "--trainer.max_time", "00:00:00:02")
    progress = stage_progress(run / "export")
    assert 0 < progress["completed_steps"] == cli.trainer.global_step < 100000
    assert progress["max_steps"] == 100000 and progress["max_time"] == "00:00:00:02" and progress["stopped_early"]
    assert demo.progress_line(progress).startswith("WARNING: completed")
    notice = "\n".join(report.training_notice({progress["stage_dir"]: progress}))
    assert f"{progress['completed_steps']} of 100000 steps (max_time 00:00:00:02)" in notice
    assert stage_progress(tmp_path / "no_stage" / "export") is None  # e.g. the shipped teacher


def test_collect_copies_what_a_reproduction_is_judged_by(tmp_path):
    """make reproduce's last step: reports, per-stage training logs, budgets, timings and the machine and
    commit go to results/reproduction/ — and no weights."""
    import json

    ev, root, marks = tmp_path / "eval", tmp_path / "runs", tmp_path / "state"
    ev.mkdir()
    for name in ("report.md", "results.json", "results.csv", "per_video.csv"):
        (ev / name).write_text(name)
    (ev / "samples" / "compare").mkdir(parents=True)
    (ev / "samples" / "compare" / "a__vs__b.gif").write_bytes(b"GIF89a")
    (ev / "samples" / "teacher.gif").write_bytes(b"GIF89a")  # per-method samples stay behind
    (root / "cfg_distill" / "csv").mkdir(parents=True)
    (root / "cfg_distill" / "csv" / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (root / "cfg_distill" / "export").mkdir()
    (root / "cfg_distill" / "export" / "model.safetensors").write_bytes(b"weights")
    marks.mkdir()
    (marks / "stages.json").write_text("{}")
    (marks / "timings.json").write_text("{}")
    demo.record_seconds(marks, "cfg_distill", 600.04)  # an invocation interrupted by an error, then the resumed one
    demo.record_seconds(marks, "cfg_distill", 1200.0)

    report_path = demo.collect(tmp_path / "results", ev, root, {"cfg_distill": None, "no_log_stage": None}, marks)
    out = tmp_path / "results"
    assert report_path == out / "report.md" and report_path.read_text() == "report.md"
    assert (out / "training_logs" / "cfg_distill.csv").read_text().startswith("step,loss")
    assert {p.name for p in out.iterdir()} == {"report.md", "results.json", "results.csv", "per_video.csv",
                                                "training_logs", "stages.json", "timings.json", "machine.json",
                                                "stage_seconds.json", "samples"}
    assert [p.name for p in (out / "samples").rglob("*.gif")] == ["a__vs__b.gif"]
    assert json.loads((out / "stage_seconds.json").read_text()) == {"cfg_distill": [600.0, 1200.0]}
    assert not list(out.rglob("*.safetensors"))
    machine = json.loads((out / "machine.json").read_text())
    assert machine["cpu_count"] >= 1 and machine["torch"] and machine["date"]
    if (ROOT / ".git").exists():  # a clone: the commit the run used is named
        assert len(machine["commit"]) == 40


def test_a_failed_stage_keeps_its_seconds_and_fails_loudly(tmp_path):
    """A stage command that fails stops the pipeline with its exit code, and its wall time still enters the
    stage history, next to the earlier invocations."""
    import json
    import sys

    demo.record_seconds(tmp_path, "meanflow", 30.0)
    with pytest.raises(SystemExit, match=r"failed \(exit 3\)"):
        demo.run_timed("meanflow", [sys.executable, "-c", "import time, sys; time.sleep(0.2); sys.exit(3)"],
                       tmp_path / "logs", tmp_path)
    history = json.loads((tmp_path / "stage_seconds.json").read_text())["meanflow"]
    assert history[0] == 30.0 and len(history) == 2 and history[1] >= 0.2


def test_the_plan_estimates_every_stage_from_measured_costs_and_the_eta_counts_down(tmp_path, capsys):
    """`make demo` prints a plan with an estimated time per stage (measured seconds per step of a finished run,
    the median of the same LightningModule class for a stage that run did not have) and one ETA line per stage."""
    import json

    from omegaconf import OmegaConf
    costs = tmp_path / "costs"
    costs.mkdir()
    (costs / demo.SECONDS_FILE).write_text(json.dumps({"cfg_distill": [200.0], "restricted_meanflow": [100.0],
                                                       "meanflow": [300.0], "evaluate": [64.0]}))
    (costs / "stages.json").write_text(json.dumps({n: {"completed_steps": 100} for n in
                                                   ("cfg_distill", "restricted_meanflow", "meanflow")}))
    (costs / "results.json").write_text(json.dumps({"methods": [{}] * 4, "meta": {"num_videos": 8, "seeds": [0, 1]}}))
    cfg = OmegaConf.create({**DEMO, "costs_from": str(costs)})
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "predictor_gan.done").write_text("")  # a finished stage is not planned
    est = demo.plan(cfg, DEMO["stages"], marks)
    steps = {s["name"]: int(demo.budget(s)["max_steps"]) for s in DEMO["stages"]}
    start = demo.STARTUP_SECONDS
    assert "predictor_gan" not in est and est["cfg_distill"] == pytest.approx(2.0 * steps["cfg_distill"] + start)
    assert est["meanflow"] == pytest.approx(3.0 * steps["meanflow"] + start)
    # R = 1.0 was not measured: the median s/step of the stage-2 arms measured (1.0 and 3.0 -> 2.0)
    assert est["restricted_meanflow_r1"] == pytest.approx(2.0 * steps["restricted_meanflow_r1"] + start)
    assert est["predictor_gan_nogan"] is None  # no stage-3 measurement at all
    methods = demo._evaluation_size(cfg.evaluate)
    assert est["evaluate"] == pytest.approx(methods * 1.0)  # 64 s / (4 methods x 8 videos x 2 seeds) = 1 s each
    demo.print_plan(est, "configs/demo.yaml", str(costs))
    out = capsys.readouterr().out
    assert all(name in out for name in est) and "in all" in out and "without" not in out
    line = demo.eta_line("cfg_distill", 120.0, 600.0, {"meanflow": 600.0, "predictor_gan_nogan": None})
    assert line == ("[cfg_distill] finished in 2 min; elapsed 10 min; about 10 min left "
                    "(2 stage(s) to go, 1 without an estimate)")
