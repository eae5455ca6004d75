"""Evaluation metrics: each passes on real moving-digit videos and fails on noise or frozen video."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from datamodules.moving_digits import sample_world
from evaluation import metrics
from evaluation.semantic import DigitClassifier


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    videos, _, _ = sample_world(8, "val", seed=0)  # (8, 3, 6, 24, 24) in [-1, 1]
    return videos


@pytest.fixture(scope="module")
def noise(real) -> torch.Tensor:
    return torch.randn(real.shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def frozen(real) -> torch.Tensor:
    return real[:, :, :1].expand_as(real).clone()  # the first frame repeated


def test_flickering_passes_real_fails_noise_and_is_blind_to_frozen(real, noise, frozen):
    assert metrics.temporal_flickering(real).min() > 0.95
    assert metrics.temporal_flickering(noise).max() < 0.7
    # a frozen video is perfectly "flicker-free": the metric alone cannot catch it
    assert torch.allclose(metrics.temporal_flickering(frozen), torch.ones(8))


def test_flickering_matches_the_vbench_formula():
    a = torch.full((1, 3, 2, 4, 4), -1.0)
    a[:, :, 1] = 1.0  # black -> white: |diff| = 255 everywhere
    assert metrics.temporal_flickering(a).item() == pytest.approx(0.0)
    a[:, :, 1] = -1 + 2 * 51 / 255  # 51 of 255
    assert metrics.temporal_flickering(a).item() == pytest.approx((255 - 51) / 255, abs=1e-5)


def test_centroid_and_constant_velocity_fit_are_exact_on_a_moving_dot():
    video = torch.full((1, 3, 5, 9, 9), -1.0)
    for f in range(5):
        video[0, 0, f, 2 + f, 1 + f] = 1.0  # red dot moving (+1, +1) per frame
    tracks = metrics.centroid_tracks(video)
    assert torch.allclose(tracks[0], torch.tensor([[1.0 + f, 2.0 + f] for f in range(5)]))
    velocity, ss_res, ss_tot = metrics.constant_velocity_fit(tracks)
    assert torch.allclose(velocity, torch.tensor([[1.0, 1.0]]))
    assert ss_res.item() == pytest.approx(0.0, abs=1e-8)
    assert ss_tot.item() == pytest.approx(2 * 10.0)  # sum of (f - 2)^2 over both axes


def test_motion_smoothness_passes_real_fails_noise(real, noise):
    assert metrics.motion_smoothness(real).min() > 0.99
    assert metrics.motion_smoothness(noise).mean() < 0.4


def test_motion_magnitude_catches_frozen_video(real, noise, frozen):
    assert torch.allclose(metrics.motion_magnitude(real), torch.ones(8), atol=0.02)  # the world moves 1 px/frame
    assert metrics.motion_magnitude(frozen).max() < 1e-5
    assert metrics.motion_magnitude(noise).mean() < 0.3
    # ...which smoothness alone does not: a motionless track is trivially "smooth"
    assert metrics.motion_smoothness(frozen).min() > 0.99


def test_frechet_distance_zero_on_itself_and_grows_with_shift():
    feats = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    distances = [metrics.frechet_distance(feats, feats + s) for s in (0.25, 0.5, 1.0)]
    assert distances == pytest.approx([8 * 0.25 ** 2, 8 * 0.5 ** 2, 8 * 1.0], rel=1e-6)  # |shift|^2, same cov
    scaled = metrics.frechet_distance(feats, 2 * feats)
    assert scaled > 1.0


def test_frechet_distance_matches_scipy_sqrtm_reference():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(200, 5, generator=gen, dtype=torch.float64) @ torch.randn(5, 5, generator=gen, dtype=torch.float64)
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    ca, cb = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(scipy.linalg.sqrtm(ca @ cb)).real
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(torch.randn(1, 3), torch.randn(4, 3))


def test_psnr_ssim_identical_is_max_and_noise_is_low(real, noise):
    assert torch.allclose(metrics.psnr(real, real), torch.full((8,), metrics.PSNR_CAP))
    assert torch.allclose(metrics.ssim(real, real), torch.ones(8), atol=1e-5)
    assert metrics.psnr(noise, real).max() < 12
    assert metrics.ssim(noise, real).max() < 0.2
    slightly = (real + 0.02 * noise).clamp(-1, 1)
    assert 30 < metrics.psnr(slightly, real).min() < metrics.PSNR_CAP
    assert metrics.ssim(slightly, real).min() > metrics.ssim(noise, real).max()


def test_ssim_shrinks_its_window_for_tiny_frames():
    x = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(x, x[:1])


def test_check_videos_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, 3, F, H, W\)"):
        metrics.temporal_flickering(torch.zeros(2, 1, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.motion_smoothness(torch.zeros(2, 3, 1, 8, 8))


def test_classifier_features_and_video_quality(real, noise):
    torch.manual_seed(0)
    classifier = DigitClassifier(width=4, hidden=16).eval()
    feats = metrics.classifier_features(classifier, real)
    assert feats.shape == (8, 16)
    q_real = metrics.video_quality(real, feats, classifier)
    q_noise = metrics.video_quality(noise, feats, classifier)
    assert q_real["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
    assert q_noise["fd_classifier"] > q_real["fd_classifier"]
    assert set(q_real) == {"flicker", "smoothness", "motion", "fd_classifier"}
