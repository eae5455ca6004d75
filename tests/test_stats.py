"""The bootstrap of evaluation/stats.py: coverage on a known distribution, width shrinking with n,
paired differences that exclude zero only when they should, the prompt-major layout of seeds, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from evaluation import stats


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, n, p = 300, 60, 0.3  # Bernoulli(0.3) scores: an accuracy
    indices = stats.resample_indices(n, 1000, seed=1)
    hits = 0
    for _ in range(trials):
        iv = stats.bootstrap_mean(rng.binomial(1, p, size=n), indices)
        hits += iv.low <= p <= iv.high
    assert 0.89 <= hits / trials <= 0.985  # percentile bootstrap at n = 60: slightly under nominal


def test_interval_shrinks_like_one_over_sqrt_n():
    rng = np.random.default_rng(1)
    widths = {}
    for n in (100, 400):
        iv = stats.bootstrap_mean(rng.normal(0.5, 0.2, size=n), stats.resample_indices(n, 2000, seed=0))
        widths[n] = iv.high - iv.low
        assert iv.low < iv.estimate < iv.high
    assert widths[400] / widths[100] == pytest.approx(0.5, abs=0.12)
    assert widths[100] == pytest.approx(2 * 1.96 * 0.2 / 10, rel=0.15)  # normal theory: 2 z sigma / sqrt(n)


def test_paired_difference_excludes_zero_only_when_it_should():
    rng = np.random.default_rng(2)
    n = 64
    indices = stats.resample_indices(n, 2000, seed=0)
    prompt_effect = rng.normal(0, 1.0, size=n)  # large per-prompt variation shared by both methods
    a = prompt_effect + rng.normal(0, 0.05, size=n)
    better = prompt_effect + 0.1 + rng.normal(0, 0.05, size=n)
    same = prompt_effect + rng.normal(0, 0.05, size=n)

    diff = stats.paired_difference(better, a, indices)
    assert diff.excludes_zero and diff.low > 0 and diff.estimate == pytest.approx(0.1, abs=0.03)
    # the unpaired intervals overlap heavily: only the pairing shows the difference
    iv_a, iv_b = stats.bootstrap_mean(a, indices), stats.bootstrap_mean(better, indices)
    assert iv_b.low < iv_a.high
    assert not stats.paired_difference(same, a, indices).excludes_zero
    worse = stats.paired_difference(a, better, indices)
    assert worse.excludes_zero and worse.high < 0


def test_seeds_of_a_prompt_stay_together():
    # seed-major sample order (seed s fills rows s*P .. (s+1)*P - 1) -> (P, S)
    values = np.array([1, 2, 3, 10, 20, 30])  # 3 prompts x 2 seeds
    np.testing.assert_array_equal(stats.prompt_matrix(values, 3), [[1, 10], [2, 20], [3, 30]])
    # a prompt whose two seeds disagree counts once, at their mean
    iv = stats.bootstrap_mean(np.array([[0.0, 1.0], [0.5, 0.5]]), stats.resample_indices(2, 500, seed=0))
    assert iv.estimate == iv.low == iv.high == 0.5
    with pytest.raises(ValueError, match="7 per-video values do not split into 3 prompts"):
        stats.prompt_matrix(np.arange(7), 3)


def test_resampling_is_seeded():
    np.testing.assert_array_equal(stats.resample_indices(10, 50, seed=3), stats.resample_indices(10, 50, seed=3))
    assert not np.array_equal(stats.resample_indices(10, 50, seed=3), stats.resample_indices(10, 50, seed=4))


def test_bootstrap_with_fewer_than_two_videos_is_refused():
    with pytest.raises(ValueError, match="at least 2 videos.*got 1"):
        stats.resample_indices(1)
    with pytest.raises(ValueError, match="at least 2 videos.*got 1"):
        stats.bootstrap_mean(np.array([0.5]), np.zeros((10, 1), dtype=int))
    with pytest.raises(ValueError, match="same shape"):
        stats.paired_difference(np.ones(4), np.ones(5), stats.resample_indices(4, 10))
    with pytest.raises(ValueError, match="do not resample 4 prompts"):
        stats.bootstrap_mean(np.ones(4), stats.resample_indices(5, 10))
    with pytest.raises(ValueError, match="NaN"):
        stats.bootstrap_mean(np.array([1.0, np.nan]), stats.resample_indices(2, 10))
