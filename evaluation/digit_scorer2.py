"""The second, independent digit scorer: a linear classifier on HOG and pixel features of a centred,
size-normalised crop of the digit (no CNN, no shared weights, its own augmentations).

The project's verdicts compare methods by digit accuracy; one scorer's leniency may depend on the method
(blurry, thin or shifted digits), so every report also scores each video with this scorer and a verdict
that differs between the two is called "scorer-dependent" (evaluation/report.py, evaluation/claims.py).

Per frame, on the brightest-channel intensity (`semantic.to_intensity`):
1. crop: the intensity above `FLOOR` locates the digit; its centre of mass is the crop's centre and the
   larger side of its mass box (the `BOX_QUANTILE`..1-`BOX_QUANTILE` range of the mass along x and y) is
   scaled to `INNER` of `CROP` pixels, the aspect kept (LeCun et al.'s MNIST normalisation: the digit fitted
   in a 20 px box, centred by its centre of mass in 28 px); the crop is scaled to a maximum of 1;
2. features: the crop's pixels and a histogram of oriented gradients (Dalal & Triggs, CVPR 2005: per
   `CELL`-px cell, `BINS` signed orientations voted by gradient magnitude with linear interpolation between
   bins, L2-Hys-normalised 2x2-cell blocks);
3. a multinomial logistic regression (scikit-learn) on the standardised features; a video's prediction is
   the argmax of its frames' log-probabilities averaged over the frames that hold a digit (none: no
   prediction, so an empty video is never credited).

It is trained, like the CNN, only on the held-out (`val`) digits the generator never sees, rendered into
world frames with random affine warps, blur, brightness and pixel noise (none of which the CNN sees), and
stored as safetensors (weights, standardisation) + JSON (settings, measured accuracy): nothing is pickled.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor

from datamodules import moving_digits as world
from evaluation.semantic import (NO_PREDICTION, ceiling_videos, floor_videos, paste_in_world_colours,
                                 stored_settings_problem, to_intensity)
from models.io import atomic_write

# ---- features (one home; intensities in [0, 1], sizes in pixels) ----
FLOOR = 0.25  # intensity subtracted before locating the digit (as semantic.CENTROID_FLOOR)
MIN_MASS = 2.0  # a frame with less mass above FLOOR holds no digit
BOX_QUANTILE = 0.02  # the mass box leaves out this share of the mass on each side (stray pixels)
CROP, INNER = 20, 16  # the crop's side and the side its digit's larger extent is scaled to
CELL, BINS = 5, 9  # HOG cell side and signed orientation bins
HYS_CLIP = 0.2  # L2-Hys clipping of a normalised block

# ---- training (about 20 CPU-seconds on one core; C = 0.1 gave the best unseen-digit video accuracy of
# 0.1, 0.5, 2) ----
SCORER2_DEFAULTS = dict(copies=12, c=0.1, max_iter=1000, seed=0)
MAX_ROTATION, MAX_SHEAR, SCALE_RANGE = 12.0, 0.15, (0.85, 1.1)  # degrees, shear factor, size factor
MAX_BLUR, BRIGHTNESS_RANGE, MAX_NOISE_STD = 1.0, (0.6, 1.0), 0.2  # Gaussian sigma px, digit peak, noise in [-1, 1]
WEIGHTS_FILE, CONFIG_FILE = "digit_scorer2.safetensors", "digit_scorer2.json"


def digit_crops(frames: Tensor) -> tuple[Tensor, Tensor]:
    """(M, H, W) intensities in [0, 1] -> (M, CROP, CROP) centred, size-normalised crops in [0, 1] and
    (M,) bool: whether the frame holds a digit at all."""
    frames = frames.float()
    m, h, w = frames.shape
    weight = (frames - FLOOR).clamp(min=0)  # (M, H, W)
    mass = weight.sum(dim=(1, 2))  # (M,)
    present = mass >= MIN_MASS
    safe = mass.clamp(min=1e-6)[:, None]
    px, py = weight.sum(dim=1) / safe, weight.sum(dim=2) / safe  # (M, W), (M, H) marginals
    xs, ys = torch.arange(w, dtype=frames.dtype), torch.arange(h, dtype=frames.dtype)
    cx, cy = (px * xs).sum(dim=1), (py * ys).sum(dim=1)  # centre of mass

    def extent(p: Tensor) -> Tensor:  # pixels between the BOX_QUANTILE and 1 - BOX_QUANTILE mass points
        cdf = p.cumsum(dim=1)
        lo = (cdf < BOX_QUANTILE).sum(dim=1)
        hi = (cdf < 1 - BOX_QUANTILE).sum(dim=1)
        return (hi - lo + 1).to(frames.dtype)

    side = torch.maximum(extent(px), extent(py)).clamp(min=2.0)  # (M,)
    step = side / INNER  # source pixels per crop pixel
    u = torch.arange(CROP, dtype=frames.dtype) - (CROP - 1) / 2  # crop coordinates about its centre
    src_x = cx[:, None] + u[None] * step[:, None]  # (M, CROP)
    src_y = cy[:, None] + u[None] * step[:, None]
    grid = torch.stack([(2 * src_x / (w - 1) - 1)[:, None, :].expand(m, CROP, CROP),
                        (2 * src_y / (h - 1) - 1)[:, :, None].expand(m, CROP, CROP)], dim=-1)  # (M, CROP, CROP, 2)
    crops = F.grid_sample(weight[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
    peak = crops.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None]
    return torch.where(present[:, None, None], crops / peak, torch.zeros_like(crops)), present


def hog(crops: Tensor) -> Tensor:
    """(M, S, S) -> (M, blocks * 4 * BINS) histogram of oriented gradients, L2-Hys-normalised per 2x2-cell block."""
    x = F.pad(crops[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    gx = (x[:, 1:-1, 2:] - x[:, 1:-1, :-2]) / 2  # central differences, (M, S, S)
    gy = (x[:, 2:, 1:-1] - x[:, :-2, 1:-1]) / 2
    magnitude = torch.sqrt(gx ** 2 + gy ** 2)
    position = torch.atan2(gy, gx) % (2 * math.pi) / (2 * math.pi) * BINS  # signed orientation in bins, [0, BINS)
    low = position.floor()
    frac = position - low
    votes = torch.zeros(*crops.shape, BINS, dtype=crops.dtype)  # (M, S, S, BINS)
    votes.scatter_add_(-1, low.long()[..., None] % BINS, (magnitude * (1 - frac))[..., None])
    votes.scatter_add_(-1, (low.long()[..., None] + 1) % BINS, (magnitude * frac)[..., None])
    cells = F.avg_pool2d(votes.permute(0, 3, 1, 2), CELL) * CELL ** 2  # (M, BINS, S/CELL, S/CELL)
    blocks = cells.unfold(2, 2, 1).unfold(3, 2, 1)  # (M, BINS, nb, nb, 2, 2)
    blocks = blocks.permute(0, 2, 3, 1, 4, 5).flatten(3)  # (M, nb, nb, BINS * 4)
    blocks = blocks / torch.sqrt((blocks ** 2).sum(-1, keepdim=True) + 1e-6)
    blocks = blocks.clamp(max=HYS_CLIP)
    blocks = blocks / torch.sqrt((blocks ** 2).sum(-1, keepdim=True) + 1e-6)
    return blocks.flatten(1)


def frame_features(frames: Tensor) -> tuple[Tensor, Tensor]:
    """(M, H, W) intensities -> (M, D) crop pixels + HOG, and (M,) bool digit present."""
    crops, present = digit_crops(frames)
    return torch.cat([crops.flatten(1), hog(crops)], dim=1), present


class DigitScorer2:
    """Multinomial logistic regression on standardised `frame_features`, frames pooled per video."""

    def __init__(self, coef: Tensor, intercept: Tensor, mean: Tensor, scale: Tensor, frame_size: int):
        self.coef, self.intercept, self.mean, self.scale = coef.float(), intercept.float(), mean.float(), scale.float()
        self.frame_size = frame_size

    def frame_log_probs(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        feats, present = frame_features(frames)
        logits = ((feats - self.mean) / self.scale) @ self.coef.T + self.intercept  # (M, 10)
        return logits.log_softmax(dim=1), present

    @torch.no_grad()
    def predict(self, videos: Tensor, chunk: int = 4096) -> Tensor:
        """(N, 3, F, H, W) in [-1, 1] -> (N,) int64 digits, NO_PREDICTION for a video without a digit."""
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be (N, 3, F, H, W) in [-1, 1], got shape {tuple(videos.shape)}")
        intensity = to_intensity(videos.detach().float().cpu())  # (N, F, H, W)
        n, f, h, w = intensity.shape
        if (h, w) != (self.frame_size,) * 2:
            raise ValueError(f"the second digit scorer was trained on {self.frame_size}px frames, got {h}x{w}")
        frames = intensity.reshape(n * f, h, w)
        parts = [self.frame_log_probs(frames[i:i + chunk]) for i in range(0, n * f, chunk)]
        log_probs = torch.cat([p[0] for p in parts]).reshape(n, f, -1)
        present = torch.cat([p[1] for p in parts]).reshape(n, f).float()
        pooled = (log_probs * present[..., None]).sum(dim=1) / present.sum(dim=1, keepdim=True).clamp(min=1)
        return torch.where(present.sum(dim=1) > 0, pooled.argmax(dim=1), NO_PREDICTION)

    def correct(self, videos: Tensor, digits: Tensor) -> Tensor:
        """(N,) bool: the predicted digit is `digits` (N,)."""
        pred = self.predict(videos)
        target = torch.as_tensor(digits).cpu().long()
        if target.shape != pred.shape:
            raise ValueError(f"digit labels have shape {tuple(target.shape)}, expected {tuple(pred.shape)}")
        return pred == target

    def score(self, videos: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        return {"digit2_acc": self.correct(videos, labels["digit"]).float().mean().item()}


# ---- training data: world frames of the held-out digits, with this scorer's own augmentations ----

def _gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """(B, S, S) blurred per image by sigma (B,) px (sigma 0: unchanged), a 5-tap separable kernel."""
    taps = torch.arange(-2, 3, dtype=images.dtype)
    kernel = torch.exp(-taps[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 5)
    b, s, _ = images.shape
    x = F.pad(images[None], (2, 2, 2, 2))  # (1, B, S+4, S+4), one channel per image (grouped conv)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b)
    x = F.conv2d(x, kernel[:, None, :, None], groups=b)
    return x[0]


def augmented_frames(digits16: Tensor, gen: torch.Generator, size: int = world.FRAME_SIZE) -> Tensor:
    """One world-like intensity frame (B, H, W) per digit image (B, s, s): a random affine warp (rotation,
    shear, scale), blur, brightness, colour, position and pixel noise, reduced by `to_intensity`."""
    b, s = digits16.shape[0], digits16.shape[-1]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(MAX_ROTATION)
    shear = (torch.rand(b, generator=gen) * 2 - 1) * MAX_SHEAR
    scale = SCALE_RANGE[0] + torch.rand(b, generator=gen) * (SCALE_RANGE[1] - SCALE_RANGE[0])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, torch.zeros(b)], 1),
                         torch.stack([sin, cos, torch.zeros(b)], 1)], 1)  # (B, 2, 3), output -> input
    grid = F.affine_grid(theta, (b, 1, s, s), align_corners=False)
    warped = F.grid_sample(digits16[:, None], grid, align_corners=False)[:, 0]
    warped = _gaussian_blur(warped, torch.rand(b, generator=gen) * MAX_BLUR)
    bright = BRIGHTNESS_RANGE[0] + torch.rand(b, generator=gen) * (BRIGHTNESS_RANGE[1] - BRIGHTNESS_RANGE[0])
    warped = warped * bright[:, None, None]
    frames = paste_in_world_colours(warped, gen, size)  # (B, 3, H, W) in [-1, 1]
    noise_std = torch.rand(b, 1, 1, 1, generator=gen) * MAX_NOISE_STD
    frames = frames + noise_std * torch.randn(frames.shape, generator=gen)
    return to_intensity(frames[:, :, None])[:, 0]  # (B, H, W)


def training_settings(copies: int = SCORER2_DEFAULTS["copies"], c: float = SCORER2_DEFAULTS["c"],
                      max_iter: int = SCORER2_DEFAULTS["max_iter"], seed: int = SCORER2_DEFAULTS["seed"]) -> dict:
    """Everything a stored scorer must have been trained with to be reused (as stored in its JSON)."""
    return {"features": dict(floor=FLOOR, min_mass=MIN_MASS, box_quantile=BOX_QUANTILE, crop=CROP, inner=INNER,
                             cell=CELL, bins=BINS, hys_clip=HYS_CLIP),
            "train": dict(copies=copies, c=c, max_iter=max_iter, seed=seed, max_rotation=MAX_ROTATION,
                          max_shear=MAX_SHEAR, scale_range=list(SCALE_RANGE), max_blur=MAX_BLUR,
                          brightness_range=list(BRIGHTNESS_RANGE), max_noise_std=MAX_NOISE_STD)}


def train_digit_scorer2(out_dir: str | Path, copies: int = SCORER2_DEFAULTS["copies"],
                        c: float = SCORER2_DEFAULTS["c"], max_iter: int = SCORER2_DEFAULTS["max_iter"],
                        seed: int = SCORER2_DEFAULTS["seed"]) -> DigitScorer2:
    """Fit on `copies` augmented frames of every held-out (`val`) digit; save to `out_dir` with the
    frame accuracy on unseen (`train` split) digits. Deterministic: seeded torch generator, lbfgs."""
    from sklearn.linear_model import LogisticRegression

    if copies < 1 or c <= 0 or max_iter < 1:
        raise ValueError(f"the second digit scorer needs copies >= 1, c > 0 and max_iter >= 1; got copies={copies}, "
                         f"c={c}, max_iter={max_iter}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    images, labels = world.load_mnist_split("val")
    digits16 = world.resize_digits(images)  # (N, 16, 16)
    frames = torch.cat([augmented_frames(digits16, gen) for _ in range(copies)])  # (copies N, H, W)
    target = labels.repeat(copies)
    feats, present = frame_features(frames)
    x, y = feats[present].double().numpy(), target[present].numpy()
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale < 1e-8, 1.0, scale)
    model = LogisticRegression(C=c, max_iter=max_iter, tol=1e-6).fit((x - mean) / scale, y)
    scorer = DigitScorer2(torch.from_numpy(model.coef_), torch.from_numpy(model.intercept_),
                          torch.from_numpy(mean), torch.from_numpy(scale), world.FRAME_SIZE)
    config = {**training_settings(copies, c, max_iter, seed), "frame_size": world.FRAME_SIZE,
              "trained_on_split": "val", "num_train_frames": int(present.sum()),
              "seconds": round(time.perf_counter() - start, 1),
              "frame_accuracy_unseen": _frame_accuracy(scorer, "train", 2000, seed + 1),
              "frame_accuracy_fit": _frame_accuracy(scorer, "val", 1000, seed + 1)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # the config goes last: weights without it are never trusted
    tensors = {"coef": scorer.coef, "intercept": scorer.intercept, "mean": scorer.mean, "scale": scorer.scale}
    atomic_write(out / WEIGHTS_FILE, save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write(out / CONFIG_FILE, json.dumps(config, indent=1).encode())
    return scorer


@torch.no_grad()
def _frame_accuracy(scorer: DigitScorer2, split: str, num: int, seed: int) -> float:
    """Accuracy on single world frames of `split` digits with the training augmentations."""
    gen = torch.Generator().manual_seed(seed)
    images, labels = world.load_mnist_split(split)
    idx = torch.randint(len(images), (num,), generator=gen)
    log_probs, _ = scorer.frame_log_probs(augmented_frames(world.resize_digits(images[idx]), gen))
    return (log_probs.argmax(dim=1) == labels[idx]).float().mean().item()


def stale_reason(model_dir: str | Path, **settings) -> str | None:
    """Why the scorer in `model_dir` is not the one `settings` ask for (None: it is)."""
    model_dir = Path(model_dir)
    problem, diff, _ = stored_settings_problem(model_dir, WEIGHTS_FILE, CONFIG_FILE, training_settings(**settings),
                                               "second digit scorer")
    return f"stale second digit scorer in {model_dir}: {', '.join(diff)}" if diff else problem


def load_digit_scorer2(model_dir: str | Path) -> DigitScorer2:
    model_dir = Path(model_dir)
    weights, config_file = model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE
    if not weights.is_file() or not config_file.is_file():
        raise FileNotFoundError(f"no second digit scorer in {model_dir} (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
                                f"train one with `python -m evaluation.digit_scorer2 --out {model_dir}`")
    t = load_file(str(weights))
    return DigitScorer2(t["coef"], t["intercept"], t["mean"], t["scale"],
                        json.loads(config_file.read_text())["frame_size"])


def ensure_digit_scorer2(model_dir: str | Path, log=print, **settings) -> tuple[DigitScorer2, dict]:
    """The scorer in `model_dir` if it was trained with `settings`, else a freshly trained one (saying why);
    returns it with its stored config."""
    reason = stale_reason(model_dir, **settings)
    if reason is not None:
        log(f"{reason}: training the second digit scorer ({settings or SCORER2_DEFAULTS}) into {model_dir}")
        train_digit_scorer2(model_dir, **settings)
    return load_digit_scorer2(model_dir), json.loads((Path(model_dir) / CONFIG_FILE).read_text())


def ground_truth_ceiling(scorer: DigitScorer2, num: int = 1000, split: str = "train", seed: int = 1234,
                         **world_kwargs) -> dict[str, float]:
    """Digit accuracy on real world videos (`semantic.ceiling_videos`: unseen `train` digits by default)."""
    return scorer.score(*ceiling_videos(num, split, seed, **world_kwargs))


def noise_floor(scorer: DigitScorer2, num: int = 1000, seed: int = 1234, **world_kwargs) -> dict[str, float]:
    """Digit accuracy on N(0, 1) noise with real prompts' labels (`semantic.floor_videos`)."""
    return scorer.score(*floor_videos(num, seed, **world_kwargs))


def main(argv: list[str] | None = None) -> dict:
    """Train the second digit scorer and print its ceiling and floor."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True, help="directory for the scorer's weights and config")
    p.add_argument("--seed", type=int, default=SCORER2_DEFAULTS["seed"])
    p.add_argument("--num_eval", type=int, default=1000)
    args = p.parse_args(argv)
    scorer = train_digit_scorer2(args.out, seed=args.seed)
    report = {"ground_truth_unseen": ground_truth_ceiling(scorer, args.num_eval, "train"),
              "ground_truth_val": ground_truth_ceiling(scorer, args.num_eval, "val"),
              "noise": noise_floor(scorer, args.num_eval),
              "config": json.loads((Path(args.out) / CONFIG_FILE).read_text())}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
