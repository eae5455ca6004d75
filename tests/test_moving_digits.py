"""The moving-digits world: split hygiene, rendering geometry, prompts and determinism."""
from __future__ import annotations

import pytest
import torch

from datamodules import moving_digits as world


def test_splits_are_disjoint_shuffled_and_balanced():
    train, train_y = world.load_mnist_split("train")
    val, val_y = world.load_mnist_split("val")
    assert train.shape == (4000, 28, 28) and val.shape == (1000, 28, 28)
    assert train.dtype == torch.float32 and 0.0 <= train.min() and train.max() <= 1.0
    # the file is sorted by label: a proper shuffle leaves every digit in both splits
    assert torch.bincount(val_y, minlength=10).min() > 50
    assert torch.bincount(train_y, minlength=10).min() > 300
    # split by image: no held-out image is a training image
    flat_train = {bytes(x.numpy().tobytes()) for x in train}
    assert not any(bytes(x.numpy().tobytes()) in flat_train for x in val)
    with pytest.raises(ValueError, match="split must be one of"):
        world.load_mnist_split("test")


@pytest.mark.parametrize("direction", world.DIRECTION_NAMES)
def test_render_moves_one_pixel_per_frame(direction):
    image = torch.zeros(28, 28)
    image[10:18, 10:18] = 1.0
    (x_lo, _), (y_lo, _) = world.start_range(direction)
    video = world.render_video(image, "red", direction, (x_lo, y_lo))
    assert video.shape == (3, world.NUM_FRAMES, world.FRAME_SIZE, world.FRAME_SIZE)
    assert video.min() == -1.0 and video.max() <= 1.0
    assert (video[1:] == -1).all()  # red: green and blue channels stay background
    dx, dy = world.DIRECTIONS[direction]
    for f in range(1, world.NUM_FRAMES):
        shifted = torch.roll(video[:, 0], shifts=(dy * f, dx * f), dims=(1, 2))
        assert torch.equal(shifted, video[:, f])


def test_render_colour_scales_intensity():
    image = torch.zeros(28, 28)
    image[:, :] = 0.5
    video = world.render_video(image, "yellow", "down", (4, 0))
    inside = video[:, 0, 8, 8]  # inside the 16x16 digit square placed at x=4, y=0
    assert torch.allclose(inside, torch.tensor([0.0, 0.0, -1.0]), atol=1e-5)  # 0.5 intensity -> 0 in [-1, 1]


def test_render_rejects_bad_inputs():
    image = torch.rand(28, 28)
    with pytest.raises(ValueError, match="out of the 24px frame"):
        world.render_video(image, "red", "right", (8, 0))
    with pytest.raises(ValueError, match="color must be one of"):
        world.render_video(image, "purple", "right", (0, 0))
    with pytest.raises(ValueError, match="direction must be one of"):
        world.render_video(image, "red", "sideways", (0, 0))
    with pytest.raises(ValueError, match="does not fit"):
        world.start_range("left", num_frames=20)


def test_sample_world_is_deterministic_and_prompts_match_labels():
    videos, labels, prompts = world.sample_world(40, "val", seed=3)
    again, labels2, prompts2 = world.sample_world(40, "val", seed=3)
    other, _, _ = world.sample_world(40, "val", seed=4)
    assert videos.shape == (40, 3, 6, 24, 24) and videos.dtype == torch.float32
    assert torch.equal(videos, again) and prompts == prompts2 and not torch.equal(videos, other)
    assert all(v.dtype == torch.int64 and v.shape == (40,) for v in labels.values())
    for i, prompt in enumerate(prompts):
        assert prompt == world.prompt_for(int(labels["digit"][i]), world.COLOR_NAMES[labels["color"][i]],
                                          world.DIRECTION_NAMES[labels["direction"][i]])
    # the digit is fully inside every frame: its total ink is the same in all frames
    ink = ((videos + 1) / 2).sum(dim=(1, 3, 4))  # (N, F)
    assert torch.allclose(ink, ink[:, :1].expand_as(ink), rtol=1e-4)


def test_sample_world_other_sizes():
    videos, _, _ = world.sample_world(3, "train", seed=0, num_frames=4, size=32)
    assert videos.shape == (3, 3, 4, 32, 32)


def test_balanced_digits_cycles_through_every_digit():
    _, labels, prompts = world.sample_world(25, "val", seed=3, balanced_digits=True)
    assert labels["digit"].tolist() == [i % 10 for i in range(25)]
    assert all(f" {i % 10} " in p for i, p in enumerate(prompts))
    _, plain, _ = world.sample_world(25, "val", seed=3)
    # colours and directions are the same draws as without balancing
    assert torch.equal(plain["color"], labels["color"]) and torch.equal(plain["direction"], labels["direction"])
