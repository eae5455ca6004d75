"""evaluate.py end to end on the smoke config (two noise seeds), plus the efficiency measurements,
interleaved timing, the report's intervals and paired differences, bad input and method specs."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import evaluate
from evaluation import claims, efficiency, report, resume
from evaluation.methods import (MethodSpec, MissingExport, ModelStore, check_available, disca_schedule,
                                make_velocity)
from models.io import save_backbone
from models.mmdit import MMDiT
from sampling.sampler import ModelVelocity, sample, time_grid
from tests.conftest import perturb, tiny_text

SMOKE = "configs/smoke/evaluate.yaml"
MISSING = {"name": "missing_student", "kind": "cfg_distilled", "model": "outputs/does/not/exist", "guidance": 4.0,
           "train_config": "configs/cfg_distill.yaml"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    start = time.perf_counter()
    result = evaluate.main(["--config", SMOKE, "--output_dir", str(out), "--skip_missing", "true",
                            "--seeds", "[0, 1]", "--methods+", json.dumps(MISSING)])
    seconds = time.perf_counter() - start
    print(f"smoke evaluation took {seconds:.1f} s")
    return out, result, seconds


def smoke_method_names() -> list[str]:
    parser = evaluate.build_parser()
    return [m.name for m in parser.parse_args(["--config", SMOKE]).methods]


def test_smoke_writes_every_output_file(smoke):
    out, result, _ = smoke
    names = smoke_method_names()
    for name in ("results.csv", "results.json", "report.md", "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    for name in names + ["ground_truth"]:
        assert (out / "samples" / f"{name}.gif").read_bytes()[:6] == b"GIF89a"
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_smoke_results_have_every_method_and_column(smoke):
    out, result, _ = smoke
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == smoke_method_names()
    for r in rows:
        assert set(r) == set(report.COLUMNS)
        assert all(v not in ("", "nan", "None") for v in r.values()), r
    data = json.loads((out / "results.json").read_text())
    assert set(data["bounds"]) == {"ground truth (ceiling)", "noise (floor)"}
    assert data["skipped"] == {"missing_student": result["skipped"]["missing_student"]}


def test_smoke_numbers_are_consistent(smoke):
    _, result, _ = smoke
    rows = {r["name"]: r for r in result["rows"]}
    ref = rows["teacher_cfg_8"]
    assert ref["nfe_dit"] == 16 and ref["psnr"] == pytest.approx(100.0)
    assert len(ref["speedup_ratios"]) == 2 and ref["speedup_min"] <= ref["speedup"] <= ref["speedup_max"]
    assert rows["teacher_cfg_2"]["theoretical_speedup"] == pytest.approx(4.0, rel=1e-6)  # same model, 4x fewer calls
    assert rows["cfg_distilled_4"]["nfe_dit"] == 4 and rows["cfg_distilled_4"]["cfg_distilled"]
    assert rows["fora_n2"]["nfe_dit_effective"] < rows["fora_n2"]["nfe_dit"] == 4
    assert rows["fora_n2"]["flops"] < rows["cfg_distilled_4"]["flops"] and rows["fora_n2"]["cache_mb"] > 0
    assert rows["disca_n2"]["nfe_dit"] == 3 and rows["disca_n2"]["nfe_predictor"] == 1
    assert rows["disca_n2"]["flops"] < rows["meanflow_4"]["flops"]
    ceiling, floor = result["bounds"]["ground truth (ceiling)"], result["bounds"]["noise (floor)"]
    assert ceiling["color_acc"] > floor["color_acc"] and ceiling["fd_classifier"] < floor["fd_classifier"]


def test_smoke_report_has_tables_bounds_and_skipped(smoke):
    out, _, seconds = smoke
    text = (out / "report.md").read_text()
    for needle in ("Table 1", "Table 2", "Table 3", "Table 4", "Faithfulness", "ground truth (ceiling)", "noise (floor)",
                   "## Skipped methods", "missing_student", "python train.py --config configs/cfg_distill.yaml",
                   "## Paired comparisons", "seeds [0, 1]", "cluster bootstrap", "median over interleaved rounds"):
        assert needle in text, needle
    assert seconds < 180  # the smoke evaluation's budget on a 2-core CPU
    table3 = text.split("Table 3)")[1].split("##")[0]
    assert "| DisCa (N=2) | ✔ | ✔ | ✔ | " in table3
    assert "| DisCa training-free reuse (N=2) | ✔ | ✘ | — | " in table3
    table1 = text.split("Table 1)")[1].split("##")[0]
    assert "Restricted MeanFlow: 4 steps" in table1 and "FORA" not in table1
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert set(meta["code"]) == {"commit", "uncommitted_changes"}
    if meta["code"]["commit"]:  # a git checkout: the report names the commit that produced it
        assert f"Code: commit `{meta['code']['commit'][:12]}`" in text


def test_smoke_scores_digits_under_both_scorers_with_grids(smoke):
    """Issue 24 item 3 / issue 25 item 7: the second digit scorer's column, interval, ceiling and floor in every
    output, each digit comparison made under both scorers, and a side-by-side GIF per comparison."""
    out, result, _ = smoke
    with open(out / "per_video.csv") as f:
        assert "digit2_acc" in next(csv.reader(f))
    for r in result["rows"]:
        assert r["digit2_acc_lo"] <= r["digit2_acc"] <= r["digit2_acc_hi"]
    ceiling, floor = result["bounds"]["ground truth (ceiling)"], result["bounds"]["noise (floor)"]
    assert ceiling["digit2_acc"] > 0.8 and floor["digit2_acc"] < 0.3
    by_metric = {}
    for c in result["comparisons"]:
        by_metric.setdefault((c["label"], c["metric"]), c)
    digit = [k for k in by_metric if k[1] == "digit_acc"]
    assert digit and all((label, "digit2_acc") in by_metric for label, _ in digit)
    assert all(isinstance(by_metric[k]["scorer_dependent"], bool) for k in digit)
    text = (out / "report.md").read_text()
    assert "Digit, 2nd scorer" in text and f"ceiling {100 * ceiling['digit2_acc']:.1f} %" in text
    assert "## Side-by-side samples" in text
    grids = sorted((out / "samples" / "compare").glob("*.gif"))
    assert len(grids) == len({report.grid_name(c) for c in result["comparisons"]})
    for g in grids:
        assert f"(samples/compare/{g.name})" in text and g.read_bytes()[:6] == b"GIF89a"


def test_code_version_names_the_commit_and_uncommitted_changes(tmp_path):
    from evaluation.progress import code_version
    from evaluation.report import code_line

    assert code_version(tmp_path) == {"commit": None, "uncommitted_changes": None} and code_line(None) == ""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    clean = code_version(tmp_path)
    assert len(clean["commit"]) == 40 and clean["uncommitted_changes"] is False
    assert code_line(clean) == f" Code: commit `{clean['commit'][:12]}`."
    (tmp_path / "untracked.txt").write_text("outputs are not code")
    assert code_version(tmp_path) == clean
    (tmp_path / "a.py").write_text("x = 2\n")
    dirty = code_version(tmp_path)
    assert dirty == {"commit": clean["commit"], "uncommitted_changes": True}
    assert code_line(dirty).endswith("with uncommitted changes to tracked files.")


def test_every_score_has_an_interval_and_every_video_is_kept(smoke):
    out, result, _ = smoke
    rows = {r["name"]: r for r in result["rows"]}
    for r in list(rows.values()) + list(result["bounds"].values()):
        for key in ("digit_acc", "color_acc", "direction_acc", "all_correct", "semantic", "quality"):
            assert r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"], (r.get("name"), key)
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["seeds"] == [0, 1] and data["meta"]["num_samples"] == 16
    with open(out / "per_video.csv") as f:
        per_video = list(csv.DictReader(f))
    assert len(per_video) == 16 * len(rows)  # 8 prompts x 2 seeds per method
    assert {(int(r["prompt"]), int(r["seed_index"])) for r in per_video if r["method"] == "disca_n2"} == {
        (p, s) for p in range(8) for s in range(2)}
    semantic = [float(r["semantic"]) for r in per_video if r["method"] == "meanflow_4"]
    assert sum(semantic) / 16 == pytest.approx(rows["meanflow_4"]["semantic"], abs=1e-5)


def test_comparisons_are_paired_differences_with_verdicts(smoke):
    _, result, _ = smoke
    rows = {r["name"]: r for r in result["rows"]}
    first = next(c for c in result["comparisons"] if c["a"] == "meanflow_4" and c["metric"] == "semantic")
    diff, low, high = first["diff"]
    assert diff == pytest.approx(rows["meanflow_4"]["semantic"] - rows["cfg_distilled_4"]["semantic"], abs=1e-9)
    assert low <= diff <= high
    assert ("better" in first["verdict"]) == (low > 0 or high < 0)
    assert first["within_margin"] == (low > -0.05 * first["b_value"]) and "within 5 % of B" in first["verdict"]
    assert rows["meanflow_4"]["vs_reference"]["semantic"][0] == pytest.approx(
        rows["meanflow_4"]["semantic"] - rows["teacher_cfg_8"]["semantic"], abs=1e-9)
    assert set(rows["disca_reuse"]["vs_full"]) == set(report.DELTA_KEYS)
    dd = next(c for c in result["comparisons"] if c.get("c") == "disca_n2")
    drop_fora = rows["fora_n2"]["semantic"] - rows["cfg_distilled_4"]["semantic"]
    drop_disca = rows["disca_n2"]["semantic"] - rows["meanflow_4"]["semantic"]
    assert dd["a_value"] == pytest.approx(drop_fora, abs=1e-9) and dd["b_value"] == pytest.approx(drop_disca, abs=1e-9)
    assert dd["diff"][0] == pytest.approx(drop_fora - drop_disca, abs=1e-9) and dd["diff"][1] <= dd["diff"][2]


def test_claims_on_the_evaluation_equal_its_comparisons(smoke, tmp_path):
    """evaluation/claims.py on a real evaluation's files: the same paired differences as the report's."""
    out, result, _ = smoke
    config = tmp_path / "claims.yaml"
    config.write_text(json.dumps({"claims": [
        {"id": "learned", "claim": "learned beats reuse", "paper": "+2.9 %", "metric": "semantic",
         "parts": [{"a": "disca_n2", "b": "disca_reuse"}]},
        {"id": "drops", "claim": "FORA loses more than DisCa", "paper": "Figure 1", "metric": "semantic",
         "parts": [{"a": "fora_n2", "b": "cfg_distilled_4", "c": "disca_n2", "d": "meanflow_4", "test": "less"}]},
        {"id": "caches", "claim": "DisCa beats slower caches", "paper": "Table 2", "metric": "semantic",
         "every_cache_at_or_below": "disca_n2"}]}))
    learned, drops, caches = claims.write_claims(out, config)
    for got in (learned, drops):
        part = got["parts"][0]
        want = next(c for c in result["comparisons"] if c["a"] == part["a"] and c["b"] == part["b"]
                    and c.get("c") == part.get("c") and c["metric"] == "semantic")
        assert part["diff"] == pytest.approx(want["diff"], abs=1e-5)
        assert got["verdict"] == claims.verdict([part["result"]]) and got["verdict"] in claims.VERDICTS
    rows = {r["name"]: r for r in result["rows"]}  # every smoke cache is faster than DisCa N=2: nothing to compare
    assert all(r["theoretical_speedup"] > rows["disca_n2"]["theoretical_speedup"] for r in rows.values()
               if r["kind"] == "cache")
    assert caches["parts"] == [] and caches["verdict"] == "inconclusive" and "no training-free cache" in caches["note"]
    assert (out / "claims.md").read_text().count("\n| ") == 4  # header + 3 claims (separator row is "|---")


@pytest.fixture
def sampled(monkeypatch) -> list[str]:
    """The names of the methods evaluate.py samples (rather than takes from a store), in order."""
    names, real_generate = [], evaluate.generate

    def generate(spec, *args, **kwargs):
        names.append(spec.name)
        return real_generate(spec, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", generate)
    return names


def test_an_interrupted_evaluation_resumes_at_the_method_it_stopped_in(smoke, tmp_path, sampled, capsys):
    """The smoke run's stored methods, as an interrupted run would leave them: two never written, one
    stale (another fingerprint), one cut short, one of an older record layout. The rerun samples exactly
    those five again and writes the same per-video scores as the uninterrupted run."""
    out, result, _ = smoke
    names = [r["name"] for r in result["rows"]]
    assert sorted(p.stem for p in (out / "partial").glob("*.safetensors")) == sorted(names)
    again = tmp_path / "again"
    shutil.copytree(out / "partial", again / "partial")
    missing, stale, cut, old_layout = names[-2:], names[1], names[2], names[3]
    for name in missing:
        (again / "partial" / f"{name}.safetensors").unlink()
    store = resume.MethodResults(again / "partial")
    assert store.load(stale, "another fingerprint") is None  # a wrong fingerprint is never taken
    with safe_open(str(store.path(stale)), framework="pt") as f:
        videos, record = f.get_tensor("videos"), json.loads(f.metadata()["record"])
    store.save(stale, "an older fingerprint", videos, record)
    with safe_open(str(store.path(old_layout)), framework="pt") as f:
        meta, videos = f.metadata(), f.get_tensor("videos")
    record = json.loads(meta["record"])
    del record["seconds"]
    store.path(old_layout).write_bytes(save({"videos": videos}, metadata={**meta, "record": json.dumps(record)}))
    data = store.path(cut).read_bytes()
    store.path(cut).write_bytes(data[: len(data) // 2])

    second = evaluate.main(["--config", SMOKE, "--output_dir", str(again), "--skip_missing", "true",
                            "--seeds", "[0, 1]", "--methods+", json.dumps(MISSING), "--output.tensorboard", "false"])
    assert sorted(sampled) == sorted([stale, cut, old_layout, *missing])
    logged = capsys.readouterr().out
    assert f"{stale}: stored result" in logged and "is stale" in logged
    assert f"{cut}: stored result" in logged and "cannot be read" in logged
    assert f"{old_layout}: stored result" in logged and "record keys" in logged
    assert {r["name"]: r["resumed"] for r in second["rows"]} == {n: n not in sampled for n in names}
    assert json.loads((again / "results.json").read_text())["meta"]["resumed"] == [n for n in names if n not in sampled]
    assert (again / "per_video.csv").read_text() == (out / "per_video.csv").read_text()
    first_rows = {r["name"]: r for r in result["rows"]}
    for r in second["rows"]:
        if r["resumed"]:  # the stored costs and timings are the first run's, not measured again
            for key in ("flops", "nfe_dit", "peak_memory_mb", "latency_runs_s", "reference_runs_s", "speedup",
                        "method_seconds"):
                assert r[key] == first_rows[r["name"]][key], (r["name"], key)


def test_an_evaluation_takes_the_same_sampling_from_another_under_any_name(smoke, tmp_path, sampled):
    """`reuse_from`: a method stored by another evaluation with the same sampling (renamed and relabelled
    here) is taken, and copied into this one's store; a method sampled differently is sampled."""
    out, result, _ = smoke
    teacher = {"name": "reference_again", "label": "The 8-step teacher, renamed", "kind": "teacher_cfg",
               "model": "random:tiny", "num_steps": 8, "cfg_scale": 4.0}
    methods = [teacher, {**teacher, "name": "two_steps", "label": "2 steps", "num_steps": 2},
               {**teacher, "name": "three_steps", "label": "3 steps", "num_steps": 3}]
    other = evaluate.main(["--config", SMOKE, "--output_dir", str(tmp_path / "other"), "--seeds", "[0, 1]",
                           "--methods", json.dumps(methods), "--comparisons", "[]",
                           "--reuse_from", json.dumps([str(out)]), "--output.tensorboard", "false"])
    assert sampled == ["three_steps"]
    assert sorted(p.stem for p in (tmp_path / "other" / "partial").glob("*.safetensors")) == sorted(
        m["name"] for m in methods)
    rows, first = {r["name"]: r for r in other["rows"]}, {r["name"]: r for r in result["rows"]}
    for name, was in (("reference_again", "teacher_cfg_8"), ("two_steps", "teacher_cfg_2")):
        assert rows[name]["resumed"] and rows[name]["flops"] == first[was]["flops"]
        for key in ("semantic", "digit_acc", "quality", "fd_classifier", "speedup"):
            assert rows[name][key] == pytest.approx(first[was][key], abs=1e-9), (name, key)


def test_the_fingerprint_follows_exports_code_and_prompts(tmp_path):
    """What makes a stored method stale: its export rewritten, a sampling source edited, other prompts."""
    export = save_backbone(MMDiT(size="tiny", config={"patch_size": [1, 2, 2], "text_dim": 16, "pooled_dim": 16}),
                           tmp_path / "export")
    spec = MethodSpec(name="m", kind="cfg_distilled", model=str(export), guidance=4.0)
    ref = MethodSpec(name="r", kind="teacher_cfg", model="random:tiny", cfg_scale=4.0)
    before = resume.fingerprint(spec, ref, {"prompts": "p"})
    assert before == resume.fingerprint(spec, ref, {"prompts": "p"})
    assert before != resume.fingerprint(spec, ref, {"prompts": "q"})
    assert before != resume.fingerprint(MethodSpec(name="m", kind="cfg_distilled", model=str(export), guidance=5.0),
                                        ref, {"prompts": "p"})
    weights = export / "model.safetensors"
    data = weights.read_bytes()
    time.sleep(0.01)
    weights.write_bytes(data)  # the same bytes written again, as a re-export would: a newer file
    assert resume.fingerprint(spec, ref, {"prompts": "p"}) != before

    (tmp_path / "code" / "sampling").mkdir(parents=True)
    source = tmp_path / "code" / "sampling" / "sampler.py"
    source.write_text("x = 1\n")
    digest = resume.code_digest(tmp_path / "code", ("sampling",))
    source.write_text("x = 2\n")
    assert resume.code_digest(tmp_path / "code", ("sampling",)) != digest


@pytest.mark.parametrize("args, match", [
    (["--seeds", "[]"], r"seeds is empty \(--seeds \[\]\)"),
    (["--seeds", "[3, 3]"], r"seeds \[3, 3\] repeat a seed"),
    (["--num_videos", "1"], r"num_videos=1: the bootstrap intervals .* need at least 2 videos"),
    (["--comparisons", '[{"a": "teacher_cfg_8", "b": "nope"}]'], r"unknown: \['nope'\]"),
    (["--comparisons", '[{"a": "teacher_cfg_8", "b": "meanflow_4", "c": "fora_n2"}]'], r"give both c and d"),
])
def test_bad_input_fails_before_any_sampling(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        evaluate.main(["--config", SMOKE, "--output_dir", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_missing_export_fails_clearly_before_any_work(tmp_path):
    with pytest.raises(MissingExport, match=r"'missing_student'.*outputs/does/not/exist.*configs/cfg_distill\.yaml"):
        evaluate.main(["--config", SMOKE, "--output_dir", str(tmp_path), "--methods", json.dumps([MISSING]),
                       "--comparisons", "[]"])
    assert not any(tmp_path.iterdir())


def test_reference_cannot_be_skipped(tmp_path):
    with pytest.raises(MissingExport, match="reference"):
        evaluate.main(["--config", SMOKE, "--output_dir", str(tmp_path), "--skip_missing", "true",
                       "--methods", json.dumps([MISSING]), "--comparisons", "[]"])


def test_full_config_parses_and_lists_the_paper_rows():
    parser = evaluate.build_parser()
    init = parser.instantiate(parser.parse_args(["--config", "configs/evaluate.yaml"]))
    cfg = evaluate.EvalConfig(**{k: init[k] for k in evaluate.EvalConfig.__dataclass_fields__})
    specs = {m.name: m for m in cfg.methods}
    assert cfg.reference == "teacher_cfg_50" and specs["teacher_cfg_50"].cfg_scale == 4.0
    assert {m.cache for m in cfg.methods if m.kind == "cache"} == {"fora", "delta_dit", "pab", "teacache",
                                                                    "taylorseer"}
    full_steps = {n: len(disca_schedule(specs[n])) for n in ("disca_n2", "disca_n3", "disca_n4")}
    assert full_steps == {"disca_n2": 13, "disca_n3": 11, "disca_n4": 8}  # paper appendix 6.3
    assert specs["disca_n4_reuse"].predictor == "reuse" and specs["disca_n4_mf"].model == "outputs/meanflow/export"
    assert [n for n, m in specs.items() if m.ablation] == ["disca_n4", "disca_n4_mf", "disca_n4_reuse", "disca_n4_nogan"]


def test_help_documents_the_options():
    text = evaluate.build_parser().format_help()
    for needle in ("--num_videos", "first N prompts of the validation split", "--timing.repeats",
                   "--skip_missing", "--semantic.classifier_dir"):
        assert needle in text


# --- method specs and model loading -------------------------------------------------------------------
def test_method_spec_validation():
    with pytest.raises(ValueError, match="kind 'bogus'"):
        MethodSpec(name="a", kind="bogus", model="random:tiny")
    with pytest.raises(ValueError, match="needs base"):
        MethodSpec(name="a", kind="cache", model="random:tiny", cache="fora", guidance=4.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        MethodSpec(name="a", kind="teacher_cfg", model="random:tiny")
    with pytest.raises(ValueError, match="ablation needs exactly the keys"):
        MethodSpec(name="a", kind="disca", model="random:tiny", predictor="reuse", max_interval=2, guidance=4.0,
                   ablation={"gan": True})
    with pytest.raises(ValueError, match="exactly one of `schedule`"):
        MethodSpec(name="a", kind="disca", model="random:tiny", predictor="reuse", guidance=4.0)
    spec = MethodSpec(name="a", kind="cache", base="teacher_cfg", cache="fora", model="random:tiny", cfg_scale=4.0)
    assert not spec.cfg_distilled and spec.sampler_kind == "teacher_cfg"


def test_export_mismatch_and_capability_errors_name_the_method(tmp_path):
    export = tmp_path / "teacher"
    save_backbone(perturb(MMDiT(size="tiny")), export)
    store = ModelStore(torch.device("cpu"))
    as_meanflow = MethodSpec(name="mf_on_teacher", kind="meanflow", model=str(export), guidance=4.0)
    check_available(as_meanflow)
    with pytest.raises(ValueError, match="'mf_on_teacher'.*no r embedding"):
        store.backbone(as_meanflow)
    cfg = json.loads((export / "config.json").read_text())
    cfg["hidden_size"], cfg["rope_axes_dim"] = 64, [8, 12, 12]
    (export / "config.json").write_text(json.dumps(cfg))
    teacher = MethodSpec(name="broken_teacher", kind="teacher_cfg", model=str(export), cfg_scale=4.0)
    with pytest.raises(ValueError, match="'broken_teacher'.*does not match"):
        ModelStore(torch.device("cpu")).backbone(teacher)


def test_teacache_calibration_missing_names_the_command():
    spec = MethodSpec(name="tc", kind="cache", base="cfg_distilled", cache="teacache", model="random:tiny",
                      guidance=4.0, num_steps=20, cache_kwargs={"threshold": 0.1, "calibration": "nope.json"})
    with pytest.raises(MissingExport, match="calibrate_teacache.py --model_dir random:tiny .*--num_steps 20"):
        check_available(spec)


# --- efficiency -----------------------------------------------------------------------------------------
def test_count_flops_of_a_linear_layer():
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(4, 16)
    assert efficiency.count_flops(lambda: (layer(x), None)) == 2 * 4 * 16 * 8


def test_live_tensor_bytes_tracks_the_peak_of_simultaneously_alive_tensors():
    def run():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # +4000: peak 8000
        del a
        c = b + 1  # a freed first: still 8000
        return c, None

    with efficiency.CostTracker() as tracker:
        run()
    assert tracker.peak == 8000 and tracker.flops == 0


def test_cost_tracker_counts_what_flop_counter_mode_counts(tiny_mmdit, tiny_video):
    from torch.utils.flop_counter import FlopCounterMode

    text, null = tiny_text(2), tiny_text(1, seed=3)

    def run():
        velocity = ModelVelocity(tiny_mmdit, text, mode="cfg", cfg_scale=4.0, null_text=null)
        return sample(velocity, tiny_video, time_grid(2)), velocity

    with FlopCounterMode(display=False, custom_mapping={
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: efficiency._cpu_sdpa_flops}) as reference:
        run()
    assert efficiency.count_flops(run) == reference.get_total_flops() > 0


def test_measure_counts_nfe_flops_and_cache(tiny_mmdit, tiny_video):
    text, null = tiny_text(2), tiny_text(1, seed=3)
    grid = time_grid(4)
    spec = MethodSpec(name="fora", kind="cache", base="teacher_cfg", cache="fora", cache_kwargs={"interval": 2},
                      model="random:tiny", cfg_scale=4.0, num_steps=4)
    store = ModelStore(torch.device("cpu"))  # builds the seeded random tiny model of `spec`

    def plain():
        velocity = ModelVelocity(tiny_mmdit, text, mode="cfg", cfg_scale=4.0, null_text=null)
        return sample(velocity, tiny_video, grid), velocity

    eff = efficiency.measure(plain, torch.device("cpu"), resident_bytes=123)
    assert eff.nfe_dit == eff.nfe_dit_effective == 8 and eff.nfe_predictor == 0 and eff.cache_bytes == 0
    assert eff.flops > 0 and eff.peak_memory_bytes > 123

    def cached():
        velocity = make_velocity(spec, store, tiny_text(2), null)
        return sample(velocity, tiny_video, grid), velocity

    eff = efficiency.measure(cached, torch.device("cpu"), resident_bytes=0)
    # FORA (N=2) on 4 steps computes steps 0, 1, 3 (first, then anchored to the last step): 3 of 4 calls
    assert eff.nfe_dit == 8 and eff.nfe_dit_effective == pytest.approx(6.0) and eff.cache_bytes > 0


def test_speedup_rejects_zero_cost():
    assert efficiency.speedup(10.0, 2.0) == 5.0
    with pytest.raises(ValueError):
        efficiency.speedup(1.0, 0.0)


class FakeClock:
    """A clock that a fake run advances by its cost times the machine's current load."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, cost: float, loads: list[float]):
        def run():
            self.calls.append(name)
            self.now += cost * loads[min(len([c for c in self.calls if c == name]) - 1, len(loads) - 1)]
        return run


def test_interleaved_timing_cancels_a_changing_load():
    clock = FakeClock()
    loads = [1.0, 1.0, 3.0, 1.0, 8.0, 2.0]  # the machine's load per round (first: the warm-up pair)
    method, reference = clock.runner("m", 2.0, loads), clock.runner("ref", 10.0, loads)
    method_s, reference_s = efficiency.interleaved_times(method, reference, rounds=5, warmup=1, clock=clock)
    assert clock.calls == ["ref", "m", "ref", "m", "m", "ref", "ref", "m", "m", "ref", "ref", "m"]
    assert reference_s == [10.0, 30.0, 10.0, 80.0, 20.0] and method_s == [2.0, 6.0, 2.0, 16.0, 4.0]
    sp = efficiency.speedup_stats(reference_s, method_s)
    assert sp.median == sp.q1 == sp.q3 == sp.low == sp.high == 5.0 and not sp.too_wide(0.25)


def test_speedup_stats_median_and_spread():
    sp = efficiency.speedup_stats([10.0, 10.0, 10.0, 10.0, 10.0], [1.0, 2.0, 2.5, 5.0, 10.0])
    assert sp.ratios == [10.0, 5.0, 4.0, 2.0, 1.0]
    assert (sp.median, sp.q1, sp.q3, sp.low, sp.high) == (4.0, 2.0, 5.0, 1.0, 10.0)
    assert sp.relative_iqr == pytest.approx(0.75) and sp.too_wide(0.25) and not sp.too_wide(1.0)
    with pytest.raises(ValueError, match="one reference time per method time"):
        efficiency.speedup_stats([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="rounds"):
        efficiency.interleaved_times(lambda: None, lambda: None, rounds=0)


# --- report rendering -------------------------------------------------------------------------------------
def test_interval_and_paired_difference_rendering():
    row = {"semantic": 0.7812, "semantic_lo": 0.75, "semantic_hi": 0.8234, "psnr": 21.38, "psnr_lo": 20.9,
           "psnr_hi": 21.85}
    assert report.fmt_ci(row, "semantic") == "78.1 [75.0, 82.3]"
    assert report.fmt_ci(row, "psnr", "{:.2f}") == "21.38 [20.90, 21.85]"
    assert report.fmt_diff([0.054, 0.012, 0.098], "semantic") == "+5.4 [+1.2, +9.8]"
    assert report.fmt_diff([-0.004, -0.021, 0.013], "digit_acc") == "-0.4 [-2.1, +1.3]"
    assert report.fmt_diff([0.0004, 0.0001, 0.0008], "ssim") == "+0.04 [+0.01, +0.08]"  # not "+0.0 [+0.0, ...]"
    assert report.fmt_diff(None, "semantic") == "—"
    assert report.verdict([0.05, 0.01, 0.09], "A", "B") == "**A** better"
    assert report.verdict([-0.05, -0.09, -0.01], "A", "B") == "**B** better"
    assert report.verdict([0.05, -0.01, 0.09], "A", "B") == "no difference shown (interval contains 0)"
    table = report.comparisons_table([{"label": "R=0.2 vs R=1.0", "metric": "semantic", "a_value": 0.786,
                                       "b_value": 0.768, "diff": [0.018, 0.004, 0.031],
                                       "verdict": report.verdict([0.018, 0.004, 0.031], "R=0.2", "R=1.0")}])
    assert "| R=0.2 vs R=1.0 | semantic | 78.6 | 76.8 | +1.8 [+0.4, +3.1] | **R=0.2** better |" in table
    ssim = report.comparisons_table([{"label": "x", "metric": "ssim", "a_value": 0.7, "b_value": 0.6,
                                      "diff": [0.1, -0.02, 0.2], "verdict": "v"}])
    assert "| x | SSIM | 70.0 | 60.0 | +10.0 [-2.0, +20.0] | v |" in ssim
    speed = {"speedup": 4.33, "speedup_q1": 4.1, "speedup_q3": 4.52, "speedup_too_noisy": False}
    assert report.fmt_speed(speed) == "4.33× [4.10–4.52]"
    assert report.fmt_speed(speed | {"speedup_too_noisy": True}).endswith("⚠")


def test_completed_steps_and_early_stop_notice():
    done = {"stage_dir": "outputs/meanflow_r1", "completed_steps": 150, "max_steps": 150, "max_time": None,
            "stopped_early": False}
    early = {"stage_dir": "outputs/restricted_meanflow", "completed_steps": 25, "max_steps": 150,
             "max_time": "00:00:08:00", "stopped_early": True}
    assert report.fmt_steps({"training": {"model": done}}) == "150/150"
    assert report.fmt_steps({"training": {"model": early, "predictor": done}}) == "25/150 ⚠ stopped early; P 150/150"
    assert report.fmt_steps({"training": {"model": None}}) == "—"
    assert report.training_notice({"outputs/meanflow_r1": done}) == []
    notice = "\n".join(report.training_notice({"outputs/meanflow_r1": done, "outputs/restricted_meanflow": early}))
    assert "stopped before its step budget" in notice and "`outputs/restricted_meanflow`: 25 of 150 steps" in notice
    assert "meanflow_r1" not in notice


def test_grid_frames_layout():
    videos = torch.zeros(5, 3, 4, 6, 6)
    frames = report.grid_frames(videos, scale=2, pad=1)  # 3 columns x 2 rows of 13 px cells
    assert frames.shape == (4, 2 * 13, 3 * 13, 3) and frames.dtype.name == "uint8"
