"""evaluation/claims.py: the paper's claims as verdicts from per-video scores with known effects, the
per_video.csv round trip, and configs/claims.yaml naming only methods the evaluation configs define.
(The cross-check against a real evaluation's report is in tests/test_evaluate.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

import evaluate
from evaluation import claims, report, stats

P, S = 40, 2
INDICES = stats.resample_indices(P, 500, 0)


def scores(**methods: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    return {name: {"semantic": values} for name, values in methods.items()}


@pytest.fixture
def base():
    return np.random.default_rng(0).uniform(0.3, 0.7, size=(P, S))


def part_result(part, per_video, rows=None):
    return claims.check_part(part, "semantic", per_video, rows or {}, INDICES, 0.95)


def test_greater_less_and_zero_effects(base):
    alternating = np.where(np.arange(P)[:, None] % 2 == 0, 0.1, -0.1) * np.ones((1, S))  # mean exactly 0
    pv = scores(b=base, better=base + 0.05, worse=base - 0.05, same=base + alternating)
    assert part_result({"a": "better", "b": "b"}, pv)["result"] == "supported"
    assert part_result({"a": "worse", "b": "b"}, pv)["result"] == "contradicted"
    same = part_result({"a": "same", "b": "b"}, pv)
    assert same["result"] == "open" and same["diff"][1] < 0 < same["diff"][2]
    assert part_result({"a": "worse", "b": "b", "test": "less"}, pv)["result"] == "supported"
    assert part_result({"a": "better", "b": "b", "test": "less"}, pv)["result"] == "contradicted"
    assert claims.verdict(["supported", "supported"]) == "reproduced"
    assert claims.verdict(["supported", "open"]) == "inconclusive"
    assert claims.verdict(["open", "contradicted"]) == "not reproduced"


def test_within_margin_is_relative_to_b(base):
    pv = scores(b=base, close=base - 0.005, far=base - 0.05)  # margin 3 % of ~0.5 = 0.015
    close = part_result({"a": "close", "b": "b", "test": "within", "margin": 0.03}, pv)
    assert close["bound"] == pytest.approx(-0.03 * base.mean()) and close["result"] == "supported"
    assert close["diff"][0] == pytest.approx(-0.005)
    assert part_result({"a": "far", "b": "b", "test": "within", "margin": 0.03}, pv)["result"] == "contradicted"


def test_difference_of_differences(base):
    # the cache loses 0.10 on the distilled model and 0.02 on the teacher: the first drop is larger
    pv = scores(d=base, d_cache=base - 0.10, t=base + 0.1, t_cache=base + 0.08)
    part = part_result({"a": "d_cache", "b": "d", "c": "t_cache", "d": "t", "test": "less"}, pv)
    assert part["diff"][0] == pytest.approx(-0.08) and part["result"] == "supported"
    assert part["a_value"] == pytest.approx(-0.10) and part["b_value"] == pytest.approx(-0.02)


def test_theoretical_speedup_threshold_overrules_the_interval(base):
    pv = scores(disca=base, rmf=base)
    rows = {"disca": {"theoretical_speedup": 10.5}}
    part = {"a": "disca", "b": "rmf", "test": "within", "margin": 0.02, "min_theoretical_speedup": 11.0}
    assert part_result(part, pv, rows)["result"] == "contradicted"
    rows["disca"]["theoretical_speedup"] = 11.6
    assert part_result(part, pv, rows)["result"] == "supported"


def test_every_cache_at_or_below_expands_to_the_slower_caches():
    rows = {"disca": {"name": "disca", "kind": "disca", "theoretical_speedup": 11.8},
            "fora": {"name": "fora", "kind": "cache", "theoretical_speedup": 4.3},
            "pab_fast": {"name": "pab_fast", "kind": "cache", "theoretical_speedup": 14.0},
            "rmf": {"name": "rmf", "kind": "meanflow", "theoretical_speedup": 5.0}}
    parts = claims.expand({"id": "x", "every_cache_at_or_below": "disca"}, rows)
    assert parts == [{"a": "disca", "b": "fora", "test": "greater"}]
    with pytest.raises(KeyError, match="'nope' is not a method"):
        claims.expand({"id": "x", "every_cache_at_or_below": "nope"}, rows)


def test_bad_parts_name_the_problem(base):
    pv = scores(b=base, a=base)
    with pytest.raises(KeyError, match=r"no per-video 'semantic' scores for \['ghost'\]"):
        part_result({"a": "ghost", "b": "b"}, pv)
    with pytest.raises(ValueError, match="test must be one of"):
        part_result({"a": "a", "b": "b", "test": "bigger"}, pv)


def test_per_video_csv_round_trip_and_claims_files(tmp_path, base):
    rng = np.random.default_rng(1)
    flat = {name: {"semantic": rng.integers(0, 4, size=P * S) / 3, "total": rng.uniform(0, 1, P * S)}
            for name in ("m1", "m2")}
    report.write_per_video(flat, P, tmp_path / "per_video.csv")
    back = claims.read_per_video(tmp_path / "per_video.csv")
    for name, metrics in flat.items():
        for key, values in metrics.items():
            np.testing.assert_allclose(back[name][key], stats.prompt_matrix(values, P), rtol=1e-5)
    rows = [{"name": n, "label": n.upper(), "kind": "meanflow", "theoretical_speedup": 1.0} for n in flat]
    report.write_json({"meta": {"num_videos": P, "bootstrap": {"resamples": 300, "level": 0.95, "seed": 3}},
                       "methods": rows}, tmp_path / "results.json")
    config = tmp_path / "claims.yaml"
    config.write_text(yaml.safe_dump({"claims": [{"id": "c1", "claim": "M1 beats M2", "paper": "+1", "metric": "total",
                                                  "parts": [{"a": "m1", "b": "m2"}]}]}))
    (result,) = claims.write_claims(tmp_path, config)
    expected = stats.paired_difference(back["m1"]["total"], back["m2"]["total"], stats.resample_indices(P, 300, 3))
    assert result["parts"][0]["diff"] == pytest.approx(expected.as_list())
    assert result["verdict"] == claims.verdict([result["parts"][0]["result"]])
    text = (tmp_path / "claims.md").read_text()
    assert "| M1 beats M2 | +1 | total: " in text and f"**{result['verdict']}**" in text and "M1 − M2" in text
    assert json.loads((tmp_path / "claims.json").read_text())[0]["id"] == "c1"
    # another claims file beside it (configs/observations.yaml) writes its own files, claims.md untouched
    claims.write_claims(tmp_path, config, name="observations")
    assert (tmp_path / "observations.md").read_text().split("\n", 1)[1] == text.split("\n", 1)[1]
    assert (tmp_path / "claims.md").read_text() == text
    with pytest.raises(ValueError, match=r"name must be a plain file stem .* got '\.\./x'"):
        claims.write_claims(tmp_path, config, name="../x")
    # a method the evaluation skipped (skip_missing) leaves its claim "not tested", with the reason
    data = json.loads((tmp_path / "results.json").read_text()) | {"skipped": {"m3": "no export at outputs/x"}}
    report.write_json(data, tmp_path / "results.json")
    (skipped,) = claims.evaluate_claims(tmp_path, [{"id": "s", "metric": "total", "parts": [{"a": "m1", "b": "m3"}]}])
    assert skipped["verdict"] == "not tested" and "m3 skipped by the evaluation: no export" in skipped["note"]
    with pytest.raises(KeyError, match=r"no per-video 'total' scores for \['m4'\]"):  # neither run nor skipped
        claims.evaluate_claims(tmp_path, [{"id": "t", "metric": "total", "parts": [{"a": "m1", "b": "m4"}]}])
    with pytest.raises(FileNotFoundError, match="figure1/results.json does not exist"):
        claims.evaluate_claims(tmp_path, [{"id": "f", "metric": "semantic", "source": "figure1",
                                           "parts": [{"a": "m1", "b": "m2"}]}])


@pytest.mark.parametrize("claim, match", [
    ({"id": "x", "claim": "c", "paper": "p"}, r"claim x lacks \['metric'\]"),
    ({"id": "x", "claim": "c", "paper": "p", "metric": "semantic"}, "claim x has no parts"),
    ({"id": "x", "claim": "c", "paper": "p", "metric": "semantic", "parts": [{"a": "m"}]}, "needs a and b"),
    ({"id": "x", "claim": "c", "paper": "p", "metric": "semantic", "parts": [{"a": "m", "b": "n", "c": "o"}]},
     "needs a and b"),
    ({"id": "x", "claim": "c", "paper": "p", "metric": "semantic", "parts": [{"a": "m", "b": "n", "test": "more"}]},
     "test must be one of"),
    ({"id": "x", "claim": "c", "paper": "p", "metric": "semantic", "parts": [{"a": "m", "b": "n", "test": "within"}]},
     "needs a margin"),
])
def test_bad_config_is_refused_before_any_score_is_read(tmp_path, claim, match):
    config = tmp_path / "claims.yaml"
    config.write_text(yaml.safe_dump({"claims": [claim]}))
    with pytest.raises(ValueError, match=match):
        claims.write_claims(tmp_path / "no_results_here", config)
    config.write_text("other: 1\n")
    with pytest.raises(ValueError, match="lists no claims"):
        claims.load_config(config)


@pytest.mark.parametrize("config", ["configs/claims.yaml", "configs/observations.yaml"])
def test_shipped_claims_name_methods_of_the_reproduction_evaluations(config):
    """Every method a claim names is a row of the evaluation `make reproduce` runs for it (config + overrides)."""
    spec = {"claims": claims.load_config(config)}
    pipeline = OmegaConf.to_container(OmegaConf.load("configs/reproduce.yaml"), resolve=True)
    methods = {}
    for ev in [pipeline["evaluate"], *pipeline["extra_evaluations"]]:
        parsed = evaluate.build_parser().parse_args(["--config", ev["config"], *map(str, ev["overrides"])])
        methods["." if ev is pipeline["evaluate"] else Path(ev["output_dir"]).name] = {m.name for m in parsed.methods}
    assert set(methods) == {".", "figure1"}
    ids = [c["id"] for c in spec["claims"]]  # issue 14's nine, the GAN with the fixed D, the R = 1.0 baseline (2)
    if config == "configs/claims.yaml":
        assert len(ids) == 12 and {"rmf_vs_r1_10", "rmf_vs_r1_20", "rmf_vs_mf_10", "rmf_vs_mf_20"} <= set(ids) and ids.index("gan_helps_residual_d") == ids.index("gan_helps") + 1
    for c in spec["claims"]:
        known = methods[c.get("source", ".")]
        assert c["metric"] in report.COMPARABLE_KEYS and c["claim"] and c["paper"]
        for p in c.get("parts", []):
            assert {p[k] for k in "abcd" if p.get(k)} <= known, c["id"]
            assert p.get("test", "greater") in claims.TESTS
        if c.get("every_cache_at_or_below"):
            assert c["every_cache_at_or_below"] in known


def _write_source(directory: Path, per_video: dict, bounds: dict | None = None) -> None:
    """results.json + per_video.csv of a made-up evaluation of P prompts x S seeds."""
    directory.mkdir(parents=True, exist_ok=True)
    report.write_per_video({n: {k: v.T.reshape(-1) for k, v in m.items()} for n, m in per_video.items()}, P,
                           directory / "per_video.csv")
    rows = [{"name": n, "label": n.upper(), "kind": "meanflow", "theoretical_speedup": 1.0} for n in per_video]
    report.write_json({"meta": {"num_videos": P, "bootstrap": {"resamples": 300, "level": 0.95, "seed": 3}},
                       "methods": rows, "bounds": bounds or {}}, directory / "results.json")


@pytest.mark.parametrize("second_gap, verdict", [(0.1, "reproduced"), (0.0, "scorer-dependent"),
                                                 (-0.1, "scorer-dependent")])
def test_a_claim_whose_digit_verdict_differs_between_scorers_is_scorer_dependent(tmp_path, base, second_gap, verdict):
    """The CNN reads A's digits 10 points better than B's; the second scorer reads +10, 0 or -10 points. The
    semantic claim is reproduced only when both scorers' digit verdicts agree."""
    alternating = np.where(np.arange(P)[:, None] % 2 == 0, 0.05, -0.05) * np.ones((1, S))
    per_video = {"a": {"digit_acc": base + 0.1, "digit2_acc": base + second_gap + alternating, "semantic": base + 0.05},
                 "b": {"digit_acc": base, "digit2_acc": base, "semantic": base}}
    bounds = {"ground truth (ceiling)": {"digit_acc": 0.93, "digit2_acc": 0.957},
              "noise (floor)": {"digit_acc": 0.1, "digit2_acc": 0.1}}
    _write_source(tmp_path, per_video, bounds)
    config = tmp_path / "claims.yaml"
    config.write_text(yaml.safe_dump({"claims": [{"id": "c", "claim": "A beats B", "paper": "+1", "metric": "semantic",
                                                  "parts": [{"a": "a", "b": "b"}]}]}))
    (result,) = claims.write_claims(tmp_path, config)
    assert result["metric_verdict"] == "reproduced" and result["verdict"] == verdict
    assert result["digit"]["digit_acc"]["verdict"] == "reproduced"
    assert result["scorer_dependent"] is (verdict == "scorer-dependent")
    assert result["digit"]["digit2_acc"]["parts"][0]["diff"][0] == pytest.approx(second_gap, abs=1e-6)
    text = (tmp_path / "claims.md").read_text()
    assert "| Digit, CNN | Digit, 2nd scorer | Verdict |" in text and f"**{verdict}**" in text
    assert "CNN ceiling 93.0 %, floor 10.0 %; 2nd scorer ceiling 95.7 %, floor 10.0 %" in text
    assert "Δ +10.0 [" in text and "digit, 2nd scorer: A − B" in text


def test_claims_on_results_without_the_second_scorer_say_it_is_unavailable(tmp_path, base):
    """Results written before the second scorer (results/reproduction's per_video.csv has only digit_acc) keep
    the CNN's verdict and say the second scorer is unavailable, without crashing."""
    per_video = {"a": {"digit_acc": base + 0.1, "semantic": base + 0.05}, "b": {"digit_acc": base, "semantic": base}}
    _write_source(tmp_path, per_video, {"ground truth (ceiling)": {"digit_acc": 0.93}, "noise (floor)": {"digit_acc": 0.1}})
    config = tmp_path / "claims.yaml"
    config.write_text(yaml.safe_dump({"claims": [{"id": "c", "claim": "A beats B", "paper": "+1", "metric": "semantic",
                                                  "parts": [{"a": "a", "b": "b"}]}]}))
    (result,) = claims.write_claims(tmp_path, config)
    assert result["verdict"] == "reproduced" and result["digit"]["digit2_acc"]["verdict"] == "unavailable"
    text = (tmp_path / "claims.md").read_text()
    assert "| unavailable |" in text and "Second digit scorer unavailable" in text and "2nd scorer not scored" in text
    # the committed reproduction (written before the second scorer) loads the same way
    committed = claims.evaluate_claims(Path("results/reproduction"), claims.load_config("configs/claims.yaml"))
    tested = [c for c in committed if c["digit"]]
    assert tested and all(c["digit"]["digit2_acc"]["verdict"] == "unavailable" for c in tested)
    assert all(c["verdict"] == c["metric_verdict"] for c in committed if c["parts"])
