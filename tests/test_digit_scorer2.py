"""The second, independent digit scorer (evaluation/digit_scorer2.py): high on clean rendered digits, near
chance on noise, nothing on empty videos, deterministic, cached like the CNN; and the scorer-dependent
verdicts it feeds into the report's comparisons (evaluation/report.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import moving_digits as world
from evaluation import digit_scorer2 as s2
from evaluation import metrics, report, stats
from evaluation.semantic import NO_PREDICTION, DigitClassifier, SemanticScorer

QUICK = dict(copies=2)  # 1/6 of the default augmented frames; unseen-digit video accuracy ~0.95


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer2")
    s2.train_digit_scorer2(out, **QUICK)
    return out


@pytest.fixture(scope="module")
def scorer(scorer_dir):
    return s2.load_digit_scorer2(scorer_dir)


@pytest.fixture(scope="module")
def unseen():
    return world.sample_world(200, "train", seed=11)  # digits neither scorer was fitted on


def test_clean_rendered_digits_score_high_and_noise_near_chance(scorer, unseen):
    videos, labels, _ = unseen
    assert scorer.score(videos, labels)["digit2_acc"] > 0.85  # 0.957 measured with the default settings
    assert s2.noise_floor(scorer, num=300)["digit2_acc"] < 0.2  # chance is 0.1
    assert s2.ground_truth_ceiling(scorer, num=100, split="val")["digit2_acc"] > 0.9  # its own (fitted) digits
    black = -torch.ones(3, 3, 6, 24, 24)
    assert (scorer.predict(black) == NO_PREDICTION).all()  # an empty video is never credited a digit


def test_training_is_deterministic_and_reloads_exactly(scorer, scorer_dir, unseen, tmp_path):
    again = s2.train_digit_scorer2(tmp_path, **QUICK)
    for name in ("coef", "intercept", "mean", "scale"):
        assert torch.equal(getattr(scorer, name), getattr(again, name)), name
    videos = unseen[0][:50]
    assert torch.equal(scorer.predict(videos), again.predict(videos))
    config = json.loads((scorer_dir / s2.CONFIG_FILE).read_text())
    assert config["trained_on_split"] == "val" and config["train"]["copies"] == QUICK["copies"]
    assert config["frame_accuracy_unseen"] > 0.7


def test_crops_are_position_and_size_normalised():
    """The same digit at two positions gives the same crop; drawn 1.5x larger, a crop nearer to its own than
    to any of seven other digits' crops."""
    images, _ = world.load_mnist_split("val")
    digits = world.resize_digits(images[:8])  # (8, 16, 16)
    big = world.resize_digits(images[:1], 24)[0]  # (24, 24)
    frames = torch.zeros(10, 32, 32)
    for i in range(8):
        frames[i, 3:19, 4:20] = digits[i]
    frames[8, 13:29, 9:25] = digits[0]
    frames[9, 4:28, 6:30] = big
    crops, present = s2.digit_crops(frames)
    assert present.all()
    assert torch.allclose(crops[0], crops[8], atol=1e-5)  # a whole-pixel shift moves the sampling grid with it
    distance = (crops[9] - crops[:8]).abs().mean(dim=(1, 2))
    assert distance.argmin() == 0 and distance[0] < 0.7 * distance[1:].min()
    assert s2.frame_features(frames)[0].shape == (10, s2.CROP ** 2 + ((s2.CROP // s2.CELL) - 1) ** 2 * 4 * s2.BINS)


def test_stale_or_missing_scorer_is_retrained_or_explained(scorer_dir, tmp_path):
    said = []
    s2.ensure_digit_scorer2(scorer_dir, log=said.append, **QUICK)
    assert said == []  # trained with these settings: reused
    with pytest.raises(FileNotFoundError, match="python -m evaluation.digit_scorer2 --out"):
        s2.load_digit_scorer2(tmp_path)
    (tmp_path / s2.WEIGHTS_FILE).write_bytes((scorer_dir / s2.WEIGHTS_FILE).read_bytes())
    (tmp_path / s2.CONFIG_FILE).write_text((scorer_dir / s2.CONFIG_FILE).read_text())
    _, config = s2.ensure_digit_scorer2(tmp_path, log=said.append, copies=3)
    assert "stale second digit scorer" in said[0] and "train.copies = 2 (wanted 3)" in said[0]
    assert config["train"]["copies"] == 3
    with pytest.raises(ValueError, match="copies >= 1"):
        s2.train_digit_scorer2(tmp_path, copies=0)


def test_semantic_scorer_reports_both_digit_scorers(scorer, unseen):
    videos, labels, _ = unseen
    torch.manual_seed(0)
    cnn = DigitClassifier()  # untrained: only the plumbing is under test here
    both = SemanticScorer(cnn, digit2=scorer)
    correct = both.correct(videos[:40], {k: v[:40] for k, v in labels.items()})
    assert torch.equal(correct["digit2"], scorer.correct(videos[:40], labels["digit"][:40]))
    assert torch.equal(correct["all"], correct["digit"] & correct["color"] & correct["direction"])  # CNN only
    per_video = metrics.accuracy_per_video(correct)
    assert set(per_video) == {"digit_acc", "digit2_acc", "color_acc", "direction_acc", "all_correct"}
    assert "digit2_acc" not in metrics.accuracy_per_video(SemanticScorer(cnn).correct(videos[:4],
                                                                                       {k: v[:4] for k, v in labels.items()}))


# ---- the scorer-dependent verdict of a comparison (report.add_statistics / mark_scorer_dependent) ----

P = 60
INDICES = stats.resample_indices(P, 400, 0)


def _rows_and_scores(cnn_gap: float, second_gap: float) -> tuple[list[dict], dict]:
    """Two methods whose digit differs by `cnn_gap` under the CNN and `second_gap` under the second scorer."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.4, 0.6, size=P)
    jitter = np.where(np.arange(P) % 2 == 0, 0.05, -0.05)  # zero-mean per-prompt noise of the difference
    per_video = {}
    for name, (d1, d2) in {"a": (base + cnn_gap + jitter, base + second_gap - jitter), "b": (base, base)}.items():
        per_video[name] = {"digit_acc": d1, "digit2_acc": d2, "color_acc": np.ones(P), "direction_acc": np.ones(P),
                           "all_correct": d1, "flicker": np.ones(P), "smoothness": np.ones(P)}
        report.add_scores(per_video[name])
    rows = [{"name": n, "label": n.upper()} for n in per_video]
    return rows, per_video


@pytest.mark.parametrize("cnn_gap, second_gap, dependent", [(0.1, 0.1, False), (0.1, 0.0, True), (0.1, -0.1, True),
                                                             (0.0, 0.0, False)])
def test_a_digit_verdict_that_differs_between_scorers_is_scorer_dependent(cnn_gap, second_gap, dependent):
    rows, per_video = _rows_and_scores(cnn_gap, second_gap)
    pairs = [{"a": "a", "b": "b", "label": "A vs B", "metrics": ["semantic", "quality"]}]
    entries = {e["metric"]: e for e in report.add_statistics(rows, per_video, "b", pairs, P, INDICES)}
    # semantic contains the digit: the digit under both scorers follows it, though not asked for
    assert list(entries) == ["semantic", "digit_acc", "digit2_acc", "quality"]
    assert report.SCORER_DEPENDENT not in entries["quality"]["verdict"]
    assert entries["digit_acc"]["scorer_dependent"] is dependent and entries["digit2_acc"]["scorer_dependent"] is dependent
    for key in ("digit_acc", "digit2_acc"):
        assert (report.SCORER_DEPENDENT in entries[key]["verdict"]) is dependent
        assert ("better" in entries[key]["verdict"].split("(")[0]) is (not dependent and cnn_gap != 0)
    assert (report.SCORER_DEPENDENT in entries["semantic"]["verdict"]) is dependent  # semantic contains the digit
    assert rows[0]["vs_reference"]["digit2_acc"][0] == pytest.approx(second_gap, abs=1e-9)
    table = report.comparisons_table(list(entries.values()))
    assert "| A vs B | digit (2nd scorer) |" in table


def test_results_without_the_second_scorer_still_report(tmp_path):
    """results/reproduction was written before the second scorer: its rows and bounds lack digit2_acc, and the
    report's tables, scorer line and figure still render (with 'not scored' / '—')."""
    data = json.loads(Path("results/reproduction/results.json").read_text())
    rows, bounds = data["methods"], data["bounds"]
    assert all("digit2_acc" not in r for r in rows)
    text = report.markdown_report(rows, bounds, data["skipped"], data["meta"], data["comparisons"])
    assert "Digit, 2nd scorer" in text and "not scored in this evaluation" in text
    assert "ceiling 95.6 %, floor 10.2 %" in text  # the CNN's, as results.json holds them
    fig = report.pareto_figure(rows, bounds)
    fig.savefig(tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 0
