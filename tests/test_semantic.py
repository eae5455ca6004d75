"""The semantic scorer passes ground truth, fails noise, and does not credit frozen videos."""
from __future__ import annotations

import json

import pytest
import torch

from datamodules import moving_digits as world
from evaluation.semantic import (CONFIG_FILE, NO_PREDICTION, SemanticScorer, centroid_velocity, ground_truth_ceiling,
                                 load_digit_classifier, noise_floor, predict_color, predict_direction, to_intensity,
                                 train_digit_classifier)

QUICK = dict(steps=250, batch_size=64)  # 1/5 of the default compute; ground-truth digit accuracy ~0.83


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf")
    train_digit_classifier(out, **QUICK)
    return out


@pytest.fixture(scope="module")
def scorer(classifier_dir) -> SemanticScorer:
    return SemanticScorer(load_digit_classifier(classifier_dir))


@pytest.fixture(scope="module")
def real():
    return world.sample_world(200, "train", seed=7)  # digits the classifier never saw


def test_saved_classifier_reloads_identically(classifier_dir, scorer, real):
    config = json.loads((classifier_dir / CONFIG_FILE).read_text())
    assert config["trained_on_split"] == "val" and config["train"]["steps"] == QUICK["steps"]
    videos = real[0][:8]
    again = SemanticScorer(load_digit_classifier(classifier_dir))
    assert torch.equal(scorer.predict(videos)["digit"], again.predict(videos)["digit"])


def test_missing_classifier_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m evaluation.semantic --out"):
        load_digit_classifier(tmp_path)


def test_ground_truth_scores_high(scorer, real):
    videos, labels, _ = real
    s = scorer.score(videos, labels)
    assert s["color_acc"] == 1.0 and s["direction_acc"] == 1.0
    assert s["digit_acc"] > 0.6  # 0.93 with the default training length
    assert s["all_correct"] == pytest.approx(s["digit_acc"])


def test_noise_scores_near_chance(scorer, real):
    s = noise_floor(scorer, num=200)
    assert s["digit_acc"] < 0.3 and s["color_acc"] < 0.4 and s["direction_acc"] < 0.3 and s["all_correct"] < 0.05


def test_frozen_videos_have_no_direction(scorer, real):
    videos, labels, _ = real
    frozen = videos[:, :, :1].expand_as(videos)  # the first frame repeated
    assert (predict_direction(frozen) == NO_PREDICTION).all()
    s = scorer.score(frozen, labels)
    assert s["direction_acc"] == 0.0 and s["all_correct"] == 0.0
    assert s["color_acc"] == 1.0  # the other attributes are judged independently


def test_centroid_velocity_is_one_pixel_per_frame(real):
    videos, labels, _ = real
    velocity, located = centroid_velocity(videos)
    assert located.all()
    table = torch.tensor(list(world.DIRECTIONS.values()), dtype=torch.float32)
    assert torch.allclose(velocity, table[labels["direction"]], atol=1e-4)


def test_empty_and_dim_videos():
    black = -torch.ones(2, 3, 6, 24, 24)
    assert (predict_color(black) == NO_PREDICTION).all() and (predict_direction(black) == NO_PREDICTION).all()
    videos, labels, _ = world.sample_world(12, "val", seed=1)
    dim = (videos + 1) * 0.7 - 1  # a generator that draws at 70% brightness keeps its colour
    assert torch.equal(predict_color(dim), labels["color"])
    assert to_intensity(videos).shape == (12, 6, 24, 24)


def test_ceiling_and_bad_inputs(scorer):
    assert ground_truth_ceiling(scorer, num=20)["color_acc"] == 1.0
    with pytest.raises(ValueError, match="videos must be"):
        scorer.score(torch.zeros(2, 6, 24, 24), {"digit": 0, "color": 0, "direction": 0})
    videos, labels, _ = world.sample_world(4, "val", seed=0)
    with pytest.raises(ValueError, match="labels lack"):
        scorer.score(videos, {"digit": labels["digit"]})
    with pytest.raises(ValueError, match="trained on 24px frames"):
        scorer.predict(torch.zeros(1, 3, 6, 32, 32))
