"""Semantic score of generated moving-digit videos (SPEC §7, the offline VBench-semantic analogue).

A video is judged on the three attributes its prompt names:
- digit: a small CNN trained here on the HELD-OUT real digits (the generator trains on the other
  images), applied to every frame's grey-level intensity; logits are averaged over frames;
- colour: mean RGB of the bright pixels, brightness-normalised, nearest entry of `COLORS`;
- direction: least-squares velocity of the intensity-weighted centroid, nearest entry of
  `DIRECTIONS`; a digit that barely moves has no direction (a frozen video must not pass).

Numbers are only meaningful beside the ground-truth ceiling (real world videos) and the noise
floor (Gaussian noise), which `ground_truth_ceiling` and `noise_floor` compute with the same scorer.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor, nn

from datamodules import moving_digits as world
from models.io import atomic_write

# ---- scorer settings (one home; each threshold is in intensity units [0, 1] or pixels/frame) ----
BRIGHT_THRESHOLD = 0.5  # pixels brighter than this define the digit's colour
CENTROID_FLOOR = 0.25  # intensity subtracted before taking the centroid, so faint noise does not pin it
MIN_MOTION = 0.25  # px/frame; the world moves 1 px/frame, below this the video counts as frozen
NO_PREDICTION = -1

# ---- classifier training defaults: ~35 CPU-seconds on one core (width 16, 600 steps), unseen-digit
# video accuracy 0.93; width 32 costs 2.5x per step for no measured gain ----
CLASSIFIER_DEFAULTS = dict(steps=600, batch_size=128, lr=3e-3, weight_decay=1e-4, seed=0)
MAX_NOISE_STD = 0.15  # augmentation: generator-like pixel noise, in [-1, 1] video units
WEIGHTS_FILE, CONFIG_FILE = "digit_classifier.safetensors", "digit_classifier.json"


def to_intensity(videos: Tensor) -> Tensor:
    """(N, 3, F, H, W) in [-1, 1] -> (N, F, H, W) in [0, 1]: the brightest channel.

    Every world colour has a channel at 1, so the max recovers the digit's grey level exactly
    whatever its colour, and the classifier never needs to learn colour invariance.
    """
    return ((videos.clamp(-1, 1) + 1) / 2).amax(dim=1)


class DigitClassifier(nn.Module):
    """Two conv blocks and an MLP head on one (1, H, W) intensity frame; `features` feed FD-classifier."""

    def __init__(self, width: int = 16, hidden: int = 128, frame_size: int = world.FRAME_SIZE):
        super().__init__()
        self.config = dict(width=width, hidden=hidden, frame_size=frame_size)
        self.frame_size = frame_size
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 2w, H/4, W/4)
            nn.Flatten(),
            nn.Linear(2 * width * (frame_size // 4) ** 2, hidden), nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(hidden, world.NUM_DIGITS)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dropout(self.features(x)))  # (B, 10)


# ---- attribute predictions; each returns (N,) int64 with NO_PREDICTION where undecidable ----

def predict_color(videos: Tensor, bright_threshold: float = BRIGHT_THRESHOLD) -> Tensor:
    rgb = (videos.clamp(-1, 1) + 1) / 2  # (N, 3, F, H, W)
    bright = (rgb.amax(dim=1) > bright_threshold)[:, None]  # (N, 1, F, H, W)
    count = bright.sum(dim=(2, 3, 4))  # (N, 1)
    mean = (rgb * bright).sum(dim=(2, 3, 4)) / count.clamp(min=1)  # (N, 3)
    mean = mean / mean.amax(dim=1, keepdim=True).clamp(min=1e-6)  # brightness-normalised
    table = torch.tensor(list(world.COLORS.values()), dtype=mean.dtype)  # (6, 3)
    pred = torch.cdist(mean, table).argmin(dim=1)
    return torch.where(count[:, 0] > 0, pred, NO_PREDICTION)


def centroid_velocity(videos: Tensor, floor: float = CENTROID_FLOOR) -> tuple[Tensor, Tensor]:
    """Least-squares (vx, vy) in px/frame of the intensity-weighted centroid, (N, 2), and whether
    every frame had any mass to locate, (N,) bool."""
    w = (to_intensity(videos) - floor).clamp(min=0)  # (N, F, H, W)
    n, f, h, wd = w.shape
    mass = w.sum(dim=(2, 3))  # (N, F)
    ys, xs = torch.arange(h, dtype=w.dtype), torch.arange(wd, dtype=w.dtype)
    cx = (w.sum(dim=2) * xs).sum(dim=2) / mass.clamp(min=1e-6)  # (N, F)
    cy = (w.sum(dim=3) * ys).sum(dim=2) / mass.clamp(min=1e-6)
    t = torch.arange(f, dtype=w.dtype) - (f - 1) / 2  # centred frame index
    centroid = torch.stack([cx, cy], dim=-1)  # (N, F, 2)
    velocity = (t[None, :, None] * centroid).sum(dim=1) / (t ** 2).sum().clamp(min=1e-6)  # (N, 2)
    return velocity, (mass > 0).all(dim=1)


def predict_direction(videos: Tensor, floor: float = CENTROID_FLOOR, min_motion: float = MIN_MOTION) -> Tensor:
    velocity, located = centroid_velocity(videos, floor)
    table = torch.tensor(list(world.DIRECTIONS.values()), dtype=velocity.dtype)  # (4, 2)
    pred = (velocity @ table.T).argmax(dim=1)
    moving = located & (velocity.norm(dim=1) >= min_motion)
    return torch.where(moving, pred, NO_PREDICTION)


@torch.no_grad()
def predict_digit(classifier: DigitClassifier, videos: Tensor, chunk: int = 256) -> Tensor:
    """Per-frame logits averaged over frames, so one blurry frame cannot decide alone."""
    intensity = to_intensity(videos)  # (N, F, H, W)
    n, f, h, w = intensity.shape
    if (h, w) != (classifier.frame_size,) * 2:
        raise ValueError(f"the digit classifier was trained on {classifier.frame_size}px frames, got {h}x{w}")
    frames = intensity.reshape(n * f, 1, h, w)
    logits = torch.cat([classifier(frames[i:i + chunk]) for i in range(0, n * f, chunk)])  # (N F, 10)
    return logits.reshape(n, f, -1).mean(dim=1).argmax(dim=1)


class SemanticScorer:
    """Digit (the CNN), colour and direction of each video; with `digit2` (the independent second digit
    scorer of `evaluation/digit_scorer2.py`), also `digit2`: the digit as that scorer reads it, reported
    beside the CNN's so a verdict that rests on one scorer's leniency shows (never part of `all`)."""

    def __init__(self, classifier: DigitClassifier, bright_threshold: float = BRIGHT_THRESHOLD,
                 centroid_floor: float = CENTROID_FLOOR, min_motion: float = MIN_MOTION, digit2=None):
        self.classifier = classifier.eval()
        self.bright_threshold, self.centroid_floor, self.min_motion = bright_threshold, centroid_floor, min_motion
        self.digit2 = digit2

    def predict(self, videos: Tensor) -> dict[str, Tensor]:
        if videos.ndim != 5 or videos.shape[1] != 3:
            raise ValueError(f"videos must be (N, 3, F, H, W) in [-1, 1], got shape {tuple(videos.shape)}")
        videos = videos.detach().float().cpu()
        return {"digit": predict_digit(self.classifier, videos),
                "color": predict_color(videos, self.bright_threshold),
                "direction": predict_direction(videos, self.centroid_floor, self.min_motion)}

    def correct(self, videos: Tensor, labels: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per video (N,) bool: digit, color and direction right, and all three right (`all`)."""
        missing = [k for k in ("digit", "color", "direction") if k not in labels]
        if missing:
            raise ValueError(f"labels lack {missing}")
        pred = self.predict(videos)
        correct = {}
        for key, p in pred.items():
            target = torch.as_tensor(labels[key]).cpu().long()
            if target.shape != p.shape:
                raise ValueError(f"labels[{key!r}] has shape {tuple(target.shape)}, expected {tuple(p.shape)}")
            correct[key] = p == target
        correct["all"] = correct["digit"] & correct["color"] & correct["direction"]
        if self.digit2 is not None:
            correct["digit2"] = self.digit2.correct(videos, labels["digit"])
        return correct

    def score(self, videos: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
        """Accuracies per attribute and the rate of videos with all three right (and `digit2_acc`, the second
        digit scorer's accuracy, when it is set)."""
        correct = self.correct(videos, labels)
        out = {"digit_acc": correct["digit"].float().mean().item(), "color_acc": correct["color"].float().mean().item(),
               "direction_acc": correct["direction"].float().mean().item(),
               "all_correct": correct["all"].float().mean().item()}
        if "digit2" in correct:
            out["digit2_acc"] = correct["digit2"].float().mean().item()
        return out


def ceiling_videos(num: int = 1000, split: str = "train", seed: int = 1234, **world_kwargs
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Real world videos and their labels: what `ground_truth_ceiling` scores."""
    videos, labels, _ = world.sample_world(num, split, seed, **world_kwargs)
    return videos, labels


def floor_videos(num: int = 1000, seed: int = 1234, **world_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """N(0, 1) noise with real prompts' labels: what `noise_floor` scores."""
    videos, labels, _ = world.sample_world(num, "val", seed, **world_kwargs)
    return torch.randn(videos.shape, generator=torch.Generator().manual_seed(seed)), labels


def ground_truth_ceiling(scorer: SemanticScorer, num: int = 1000, split: str = "train", seed: int = 1234,
                         **world_kwargs) -> dict[str, float]:
    """Score real world videos. The default split is `train` because the classifier was fitted on
    the held-out (`val`) images: train-split digits are real digits it has never seen, which is the
    honest ceiling; `split="val"` measures how well it fits its own training images."""
    return scorer.score(*ceiling_videos(num, split, seed, **world_kwargs))


def noise_floor(scorer: SemanticScorer, num: int = 1000, seed: int = 1234, **world_kwargs) -> dict[str, float]:
    """Score N(0, 1) noise against real prompts' labels: what a generator that learned nothing gets."""
    return scorer.score(*floor_videos(num, seed, **world_kwargs))


# ---- classifier training ----

def paste_in_world_colours(glyphs: Tensor, gen: torch.Generator, size: int = world.FRAME_SIZE) -> Tensor:
    """(B, 3, size, size) frames in [-1, 1] on black: glyph i of `glyphs` (B, s, s) in a random colour of the world
    at a random position (draws: colours, then positions). Shared by both digit scorers' training frames."""
    b, s = glyphs.shape[0], glyphs.shape[-1]
    table = torch.tensor(list(world.COLORS.values()))  # (6, 3)
    rgb = table[torch.randint(len(table), (b,), generator=gen)]  # (B, 3)
    pos = torch.randint(size - s + 1, (b, 2), generator=gen)
    frames = torch.zeros(b, 3, size, size)
    for i in range(b):
        x, y = pos[i].tolist()
        frames[i, :, y:y + s, x:x + s] = rgb[i, :, None, None] * glyphs[i]
    return frames * 2 - 1


def _augmented_frames(digits16: Tensor, labels: Tensor, batch_size: int, gen: torch.Generator,
                      size: int = world.FRAME_SIZE) -> tuple[Tensor, Tensor]:
    """One batch of world-like frames (B, 1, H, W): random image, colour, position and pixel noise,
    reduced to intensity by the same `to_intensity` the scorer uses."""
    idx = torch.randint(len(digits16), (batch_size,), generator=gen)
    frames = paste_in_world_colours(digits16[idx], gen, size)
    noise_std = torch.rand(batch_size, 1, 1, 1, generator=gen) * MAX_NOISE_STD
    frames = frames + noise_std * torch.randn(frames.shape, generator=gen)
    return to_intensity(frames[:, :, None])[:, :1], labels[idx]  # (B, 1, H, W), (B,)


@torch.no_grad()
def _frame_accuracy(model: DigitClassifier, split: str, num: int, seed: int) -> float:
    images, labels = world.load_mnist_split(split)
    frames, target = _augmented_frames(world.resize_digits(images), labels, num, torch.Generator().manual_seed(seed))
    model.eval()
    return (model(frames).argmax(dim=1) == target).float().mean().item()


def train_digit_classifier(out_dir: str | Path, steps: int = CLASSIFIER_DEFAULTS["steps"],
                           batch_size: int = CLASSIFIER_DEFAULTS["batch_size"], lr: float = CLASSIFIER_DEFAULTS["lr"],
                           weight_decay: float = CLASSIFIER_DEFAULTS["weight_decay"],
                           seed: int = CLASSIFIER_DEFAULTS["seed"], width: int = 16, hidden: int = 128
                           ) -> DigitClassifier:
    """Fit the classifier on held-out (`val`) digits only and save weights + config to `out_dir`.

    The generator never trains on these images, so the score rewards drawing the right digit,
    not reproducing memorised training images. Accuracy on unseen (`train` split) digits is
    measured and stored in the JSON.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = world.load_mnist_split("val")
    digits16 = world.resize_digits(images)  # (N, 16, 16)
    model = DigitClassifier(width, hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(steps):
        x, y = _augmented_frames(digits16, labels, batch_size, gen)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()

    config = {
        "arch": model.config, "digit_size": world.DIGIT_SIZE, "trained_on_split": "val",
        "train": dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                      max_noise_std=MAX_NOISE_STD, seconds=round(time.perf_counter() - start, 1)),
        "frame_accuracy_unseen": _frame_accuracy(model, "train", 2000, seed + 1),
        "frame_accuracy_fit": _frame_accuracy(model, "val", 1000, seed + 1),
    }
    out = Path(out_dir)
    (out / CONFIG_FILE).unlink(missing_ok=True)  # the config goes last: weights without it are never trusted
    atomic_write(out / WEIGHTS_FILE, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    atomic_write(out / CONFIG_FILE, json.dumps(config, indent=1).encode())
    return model


def training_settings(steps: int = CLASSIFIER_DEFAULTS["steps"], batch_size: int = CLASSIFIER_DEFAULTS["batch_size"],
                      lr: float = CLASSIFIER_DEFAULTS["lr"], weight_decay: float = CLASSIFIER_DEFAULTS["weight_decay"],
                      seed: int = CLASSIFIER_DEFAULTS["seed"], width: int = 16, hidden: int = 128) -> dict:
    """What a saved classifier must have been trained with to be reused (as stored in its JSON)."""
    return {"arch": DigitClassifier(width, hidden).config,
            "train": dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                          max_noise_std=MAX_NOISE_STD)}


def stored_settings_problem(model_dir: Path, weights_name: str, config_name: str, wanted: dict[str, dict],
                            what: str) -> tuple[str | None, list[str], dict]:
    """(problem, differences, stored config) of a scorer cached in `model_dir` against the `wanted` settings
    ({part: {key: value}}): problem = a missing or unreadable file; differences = the settings that differ.
    Both empty: the cached scorer is the one asked for. Shared by both digit scorers."""
    weights, config_file = model_dir / weights_name, model_dir / config_name
    if not config_file.is_file():
        return f"{'no ' + config_name if weights.is_file() else 'no ' + what} in {model_dir}", [], {}
    try:
        stored = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        return f"{config_file} is not valid JSON ({err})", [], {}
    if not weights.is_file():
        return f"{weights} is missing", [], stored
    got = {part: stored.get(part) or {} for part in wanted}
    diff = [f"{part}.{k} = {got[part].get(k)} (wanted {v})" for part in wanted for k, v in wanted[part].items()
            if got[part].get(k) != v]
    return None, diff, stored


def stale_reason(model_dir: str | Path, **settings) -> str | None:
    """Why the classifier in `model_dir` is not the one `settings` ask for (None: it is), e.g. one left by
    an interrupted or shorter run. Compares architecture and every training setting stored beside it."""
    model_dir = Path(model_dir)
    problem, diff, stored = stored_settings_problem(model_dir, WEIGHTS_FILE, CONFIG_FILE,
                                                    training_settings(**settings), "classifier")
    if diff:
        return (f"stale digit classifier in {model_dir} (unseen-digit frame accuracy "
                f"{stored.get('frame_accuracy_unseen')}): {', '.join(diff)}")
    return problem


def ensure_digit_classifier(model_dir: str | Path, log=print, **settings) -> tuple[DigitClassifier, dict]:
    """The classifier in `model_dir` if it was trained with `settings`, else a freshly trained one (saying
    why); returns it with its stored config (training settings and measured accuracy), which is what
    a report should cite."""
    reason = stale_reason(model_dir, **settings)
    if reason is not None:
        log(f"{reason}: training a digit classifier ({settings or CLASSIFIER_DEFAULTS}) into {model_dir}")
        train_digit_classifier(model_dir, **settings)
    model = load_digit_classifier(model_dir)
    return model, json.loads((Path(model_dir) / CONFIG_FILE).read_text())


def load_digit_classifier(model_dir: str | Path) -> DigitClassifier:
    model_dir = Path(model_dir)
    weights, config_file = model_dir / WEIGHTS_FILE, model_dir / CONFIG_FILE
    if not weights.is_file() or not config_file.is_file():
        raise FileNotFoundError(f"no digit classifier in {model_dir} (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
                                f"train one with `python -m evaluation.semantic --out {model_dir}`")
    model = DigitClassifier(**json.loads(config_file.read_text())["arch"])
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    """Train the digit classifier and print the scorer's ceiling and floor."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True, help="directory for the classifier weights and config")
    p.add_argument("--steps", type=int, default=CLASSIFIER_DEFAULTS["steps"])
    p.add_argument("--seed", type=int, default=CLASSIFIER_DEFAULTS["seed"])
    p.add_argument("--num_eval", type=int, default=1000)
    args = p.parse_args(argv)
    scorer = SemanticScorer(train_digit_classifier(args.out, steps=args.steps, seed=args.seed))
    report = {"ground_truth_unseen": ground_truth_ceiling(scorer, args.num_eval, "train"),
              "ground_truth_val": ground_truth_ceiling(scorer, args.num_eval, "val"),
              "noise": noise_floor(scorer, args.num_eval)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
