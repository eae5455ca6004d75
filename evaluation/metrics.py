"""Quality and faithfulness metrics for generated videos (SPEC §7), pure functions on tensors.

Every video batch is (N, 3, F, H, W) float in [-1, 1] (the moving-digits pixel space). Per-video
metrics return (N,) tensors; the evaluator averages them.

- `temporal_flickering`: VBench's weight-free temporal-flickering score (Huang et al., "VBench",
  CVPR 2024): the mean absolute difference of consecutive frames on the 0..255 pixel scale,
  mapped to `(255 - MAE) / 255`. A frozen (static) video scores 1.0, so flicker alone cannot
  catch a frozen video: read it together with `motion_magnitude`.
- `motion_smoothness` / `motion_magnitude`: the track of the intensity-weighted centroid of each
  frame is fitted with a constant velocity (least squares). Smoothness is `1 - sqrt(SS_res / SS_tot)`
  (1 = the centroid moves on a straight line at constant speed, ~0 = random jitter); magnitude is
  the fitted speed in pixels per frame (0 for a frozen video; 1 for the default world).
- `frechet_distance`: Fréchet distance between Gaussians fitted to two feature sets (the
  in-project digit classifier's features -> "FD-classifier"; not FID/FVD, whose Inception/I3D
  networks are not used here).
- `per_video_scores`: every per-video score whose mean is a report score, kept per video so the
  evaluator can bootstrap intervals and pair methods exactly (evaluation/stats.py).
- `psnr`, `ssim`: faithfulness to a reference sampler's videos from the same noise and prompt,
  frames treated as images in [0, 1] (torchmetrics). PSNR is capped at `PSNR_CAP` dB so that
  identical videos give a finite maximum.
"""
from __future__ import annotations

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP = 100.0  # dB; the value for identical videos (MSE 0)
SMOOTHNESS_EPS = 1e-2  # px^2 per frame added to SS_tot so a motionless track scores 1, not 0/0


def check_videos(videos: Tensor, name: str = "videos") -> Tensor:
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3, F, H, W), got shape {tuple(videos.shape)}")
    if videos.shape[2] < 2:
        raise ValueError(f"{name} need at least 2 frames for temporal metrics, got {videos.shape[2]}")
    return videos.float()


def to_unit(videos: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (generated videos may overshoot)."""
    return ((videos.float() + 1) / 2).clamp(0, 1)


def temporal_flickering(videos: Tensor) -> Tensor:
    """(N,) VBench temporal-flickering score in [0, 1]; higher = less flicker, 1.0 for a frozen video."""
    pixels = to_unit(check_videos(videos)) * 255  # (N, 3, F, H, W) on the 0..255 scale
    mae = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))  # (N,)
    return (255 - mae) / 255


def centroid_tracks(videos: Tensor) -> Tensor:
    """(N, F, 2) intensity-weighted centroid (x, y) in pixels of every frame.

    Intensity is the brightest channel (colour-agnostic); each frame's median is subtracted as the
    background, so a uniformly grey or noisy background does not pull the centroid to the centre.
    A blank frame's centroid is the frame centre.
    """
    intensity = to_unit(check_videos(videos)).amax(dim=1)  # (N, F, H, W)
    n, f, h, w = intensity.shape
    background = intensity.flatten(2).median(dim=2).values[..., None, None]  # (N, F, 1, 1)
    weight = (intensity - background).clamp(min=0)
    mass = weight.sum(dim=(2, 3))  # (N, F)
    ys = torch.arange(h, dtype=weight.dtype, device=weight.device)
    xs = torch.arange(w, dtype=weight.dtype, device=weight.device)
    cx = (weight.sum(dim=2) * xs).sum(dim=2) / mass.clamp(min=1e-12)
    cy = (weight.sum(dim=3) * ys).sum(dim=2) / mass.clamp(min=1e-12)
    blank = mass <= 1e-12
    cx = torch.where(blank, torch.full_like(cx, (w - 1) / 2), cx)
    cy = torch.where(blank, torch.full_like(cy, (h - 1) / 2), cy)
    return torch.stack([cx, cy], dim=-1)


def constant_velocity_fit(tracks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares fit p_f = p_0 + v f of tracks (N, F, 2).

    Returns velocity (N, 2) in px/frame, SS_res (N,) and SS_tot (N,) (both summed over frames and
    coordinates, px^2)."""
    f = tracks.shape[1]
    frames = torch.arange(f, dtype=tracks.dtype, device=tracks.device)
    fc = frames - frames.mean()  # (F,)
    mean = tracks.mean(dim=1, keepdim=True)  # (N, 1, 2)
    centred = tracks - mean
    velocity = (fc[None, :, None] * centred).sum(dim=1) / (fc ** 2).sum()  # (N, 2)
    fitted = fc[None, :, None] * velocity[:, None, :]
    ss_res = ((centred - fitted) ** 2).sum(dim=(1, 2))
    ss_tot = (centred ** 2).sum(dim=(1, 2))
    return velocity, ss_res, ss_tot


def motion_smoothness(videos: Tensor) -> Tensor:
    """(N,) `1 - sqrt(SS_res / (SS_tot + eps))` of the constant-velocity fit of the centroid track.

    1 = constant-velocity motion (real moving digits, and trivially a frozen video), ~0 = random
    jitter (noise). Pair it with `motion_magnitude` to catch frozen videos."""
    tracks = centroid_tracks(videos)
    _, ss_res, ss_tot = constant_velocity_fit(tracks)
    eps = SMOOTHNESS_EPS * tracks.shape[1]
    return 1 - (ss_res / (ss_tot + eps)).sqrt()


def motion_magnitude(videos: Tensor) -> Tensor:
    """(N,) fitted centroid speed in pixels per frame (0 for a frozen video)."""
    velocity, _, _ = constant_velocity_fit(centroid_tracks(videos))
    return velocity.norm(dim=-1)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (float64)."""
    vals, vecs = torch.linalg.eigh(matrix)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between N(mu_a, S_a) and N(mu_b, S_b) fitted to (N, D) and (M, D) features:

        |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)

    (Dowson & Landau 1982; the FID formula of Heusel et al. 2017). The trace term uses the symmetric
    form, computed by eigendecomposition in float64, so it is real and exact for PSD covariances.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D) with the same D, got {tuple(features_a.shape)} "
                         f"and {tuple(features_b.shape)}")
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {features_a.shape[0]} and "
                         f"{features_b.shape[0]}")
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(fd.clamp(min=0))


def _frames(videos: Tensor) -> Tensor:
    return rearrange(to_unit(videos), "n c f h w -> (n f) c h w")


def psnr(videos: Tensor, reference: Tensor) -> Tensor:
    """(N,) mean over frames of the per-frame PSNR (dB, data range 1) against `reference`, capped at PSNR_CAP."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    n, f = videos.shape[0], videos.shape[2]
    per_frame = peak_signal_noise_ratio(_frames(check_videos(videos)), _frames(check_videos(reference, "reference")),
                                        data_range=1.0, reduction="none", dim=(1, 2, 3))
    return per_frame.clamp(max=PSNR_CAP).reshape(n, f).mean(dim=1)


def ssim(videos: Tensor, reference: Tensor) -> Tensor:
    """(N,) mean over frames of SSIM (Gaussian window, data range 1) against `reference`.

    The window is 11 px (sigma 1.5) as in Wang et al. 2004, shrunk to the largest odd size that fits
    smaller frames (sigma scaled with it)."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference {tuple(reference.shape)} differ in shape")
    n, f, h, w = videos.shape[0], videos.shape[2], videos.shape[3], videos.shape[4]
    size = min(11, min(h, w) - (1 - min(h, w) % 2))
    if size < 3:
        raise ValueError(f"frames of {h}x{w} px are too small for SSIM (need at least 3x3)")
    per_frame = structural_similarity_index_measure(
        _frames(check_videos(videos)), _frames(check_videos(reference, "reference")), kernel_size=size,
        sigma=1.5 * size / 11, data_range=1.0, reduction="none")
    return per_frame.reshape(n, f).mean(dim=1)


@torch.no_grad()
def classifier_features(classifier: torch.nn.Module, videos: Tensor, chunk: int = 512) -> Tensor:
    """(N, D) frame-averaged penultimate features of the digit classifier (`classifier.features` on
    each frame's intensity, preprocessed exactly as `evaluation.semantic` scores it): FD-classifier's input."""
    from evaluation.semantic import to_intensity

    intensity = to_intensity(check_videos(videos).cpu())  # (N, F, H, W)
    n, f, h, w = intensity.shape
    frames = intensity.reshape(n * f, 1, h, w)
    feats = torch.cat([classifier.features(frames[i:i + chunk]) for i in range(0, n * f, chunk)])
    return feats.reshape(n, f, -1).mean(dim=1)


def accuracy_per_video(correct: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """(N,) 0/1 float64 digit / colour / direction / all-correct (and the second digit scorer's digit,
    `digit2_acc`, when it scored) from `SemanticScorer.correct`."""
    names = {"digit": "digit_acc", "color": "color_acc", "direction": "direction_acc", "all": "all_correct",
             "digit2": "digit2_acc"}
    return {name: correct[key].double().numpy() for key, name in names.items() if key in correct}


def quality_per_video(videos: Tensor) -> dict[str, np.ndarray]:
    """(N,) float64 flicker, smoothness and motion."""
    return {"flicker": temporal_flickering(videos).double().numpy(),
            "smoothness": motion_smoothness(videos).double().numpy(),
            "motion": motion_magnitude(videos).double().numpy()}


def per_video_scores(correct: dict[str, Tensor], videos: Tensor) -> dict[str, np.ndarray]:
    """Every (N,) per-video score: accuracies, flicker, smoothness, motion, and semantic / quality /
    total (linear in these, `report.add_scores`), so their means are the row's scores."""
    from evaluation.report import add_scores

    scores = accuracy_per_video(correct) | quality_per_video(videos)
    if len({v.shape for v in scores.values()}) != 1:
        raise ValueError(f"per-video scores differ in length: { {k: v.shape for k, v in scores.items()} }")
    return add_scores(scores)


def fd_classifier(videos: Tensor, real_features: Tensor, classifier: torch.nn.Module) -> float:
    """FD-classifier of a video set against the real videos' features."""
    return frechet_distance(classifier_features(classifier, videos), real_features)


def video_quality(videos: Tensor, real_features: Tensor, classifier: torch.nn.Module) -> dict[str, float]:
    """Set averages of flicker, smoothness and motion, and FD-classifier against `real_features`."""
    means = {k: float(v.mean()) for k, v in quality_per_video(videos).items()}
    return means | {"fd_classifier": fd_classifier(videos, real_features, classifier)}
