"""prepare -> shards -> LatentVideoDataModule: shapes, null prompt, reproducible order, clear errors."""
from __future__ import annotations

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.latent_video import EpochShuffleSampler, LatentVideoDataModule, batch_text
from datamodules.shards import METADATA_FILE, prepare_from_videos, prepare_moving_digits
from datamodules.text_encoder import TextEncoder
from models.protocol import TextCond

NUM_TRAIN, NUM_VAL, SHARD = 20, 6, 8


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, encoder):
    out = tmp_path_factory.mktemp("digits")
    prepare_moving_digits(out, num_train=NUM_TRAIN, num_val=NUM_VAL, shard_size=SHARD, seed=0, encoder=encoder)
    return out


@pytest.fixture
def copy_dir(data_dir, tmp_path):
    """A private copy to damage."""
    return shutil.copytree(data_dir, tmp_path / "copy")


def test_prepare_layout(data_dir):
    meta = json.loads((data_dir / METADATA_FILE).read_text())
    assert meta["latent_shape"] == [3, 6, 24, 24]
    assert [s["num_samples"] for s in meta["splits"]["train"]["shards"]] == [8, 8, 4]
    assert meta["splits"]["val"]["num_samples"] == NUM_VAL
    assert meta["vocab"]["colors"][0] == "red" and len(meta["vocab"]["directions"]) == 4
    assert all((data_dir / s["file"]).is_file() for s in meta["splits"]["train"]["shards"])
    assert not list(data_dir.glob("*.tmp"))
    prompts = json.loads((data_dir / "train-00000.json").read_text())
    assert len(prompts) == 8 and prompts[0].startswith("a ")


def test_prepare_is_deterministic(data_dir, encoder, tmp_path):
    prepare_moving_digits(tmp_path, num_train=NUM_TRAIN, num_val=NUM_VAL, shard_size=SHARD, seed=0, encoder=encoder)
    a = json.loads((data_dir / METADATA_FILE).read_text())["splits"]
    b = json.loads((tmp_path / METADATA_FILE).read_text())["splits"]
    assert [s["sha256"] for s in a["train"]["shards"]] == [s["sha256"] for s in b["train"]["shards"]]


def test_batches_and_properties(data_dir):
    dm = LatentVideoDataModule(str(data_dir), batch_size=4, val_batch_size=5)
    dm.setup("fit")
    assert dm.latent_shape == (3, 6, 24, 24)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (4, 3, 6, 24, 24) and batch["latents"].dtype == torch.float32
    assert batch["text_tokens"].shape == (4, 16, 384) and batch["text_mask"].dtype == torch.bool
    assert batch["pooled"].shape == (4, 384)
    for key in ("digit", "color", "direction", "index"):
        assert batch[key].shape == (4,) and batch[key].dtype == torch.int64
    assert len(batch["prompt"]) == 4
    text = batch_text(batch)
    assert isinstance(text, TextCond) and text.batch_size == 4
    assert len(dm.train_dataloader()) == NUM_TRAIN // 4
    val_sizes = [b["latents"].shape[0] for b in dm.val_dataloader()]
    assert val_sizes == [5, 1]  # validation never drops samples

    null = dm.null_text
    assert isinstance(null, TextCond) and null.batch_size == 1 and null.mask.sum() == 2


def test_items_cross_shards_and_match_prompts(data_dir):
    dm = LatentVideoDataModule(str(data_dir))
    dm.setup()
    train = dm.datasets["train"]
    colors, directions = dm.metadata["vocab"]["colors"], dm.metadata["vocab"]["directions"]
    for index in (0, 7, 8, 19):  # first/last of shard 0, first of shard 1, last overall
        item = train[index]
        assert item["index"] == index
        assert item["prompt"] == f"a {colors[item['color']]} {int(item['digit'])} moving {directions[item['direction']]}"
    with pytest.raises(IndexError):
        train[NUM_TRAIN]


def test_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = EpochShuffleSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 3) == order(0, 3)  # a resumed run at epoch 3 sees epoch 3's order
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert list(EpochShuffleSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


class _Recorder(L.LightningModule):
    """Records the sample indices of every training batch."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return (self.w * batch["latents"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_resume_reproduces_epoch_order(data_dir, tmp_path):
    kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, default_root_dir=tmp_path)
    full = _Recorder()
    L.Trainer(max_epochs=3, enable_checkpointing=False, **kw).fit(full, LatentVideoDataModule(str(data_dir), batch_size=4))
    assert full.seen[0] != full.seen[1]

    first = _Recorder()
    trainer = L.Trainer(max_epochs=1, **kw)
    trainer.fit(first, LatentVideoDataModule(str(data_dir), batch_size=4))
    ckpt = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _Recorder()
    L.Trainer(max_epochs=3, **kw).fit(resumed, LatentVideoDataModule(str(data_dir), batch_size=4), ckpt_path=ckpt)
    assert resumed.seen == {1: full.seen[1], 2: full.seen[2]}


def test_missing_metadata_tells_how_to_prepare(tmp_path):
    dm = LatentVideoDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="python prepare.py --out"):
        dm.setup()


def test_missing_shard(copy_dir):
    (copy_dir / "train-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="train-00001.safetensors"):
        LatentVideoDataModule(str(copy_dir)).setup()


def test_corrupted_shard_is_named(copy_dir):
    path = copy_dir / "val-00000.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-100:-90] = bytes(b ^ 0xFF for b in raw[-100:-90])  # same size, different content
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="val-00000.safetensors is corrupt"):
        LatentVideoDataModule(str(copy_dir)).setup()


def test_truncated_shard_is_named(copy_dir):
    path = copy_dir / "train-00002.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-00002.safetensors is corrupt"):
        LatentVideoDataModule(str(copy_dir), verify_checksums=False).setup()


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("splits"), "lacks keys"),
    (lambda m: m.update(format_version=99), "format_version 99"),
    (lambda m: m.update(latent_shape=[3, 6, 32, 32]), "metadata implies"),
    (lambda m: m["splits"]["train"].update(num_samples=21), "shards hold 20"),
])
def test_bad_metadata(copy_dir, damage, message):
    meta = json.loads((copy_dir / METADATA_FILE).read_text())
    damage(meta)
    (copy_dir / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        LatentVideoDataModule(str(copy_dir)).setup()


def test_unparseable_metadata(copy_dir):
    (copy_dir / METADATA_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentVideoDataModule(str(copy_dir)).setup()


def test_prepare_if_missing(tmp_path, monkeypatch, encoder):
    monkeypatch.setattr("datamodules.shards.TextEncoder", lambda: encoder)
    dm = LatentVideoDataModule(str(tmp_path / "auto"), batch_size=2,
                               prepare_if_missing={"num_train": 4, "num_val": 2, "shard_size": 4})
    dm.prepare_data()
    dm.setup()
    assert len(dm.datasets["train"]) == 4


def test_user_videos_through_a_diffusers_vae(tmp_path, encoder):
    import diffusers
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                  norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    prompts = {}
    for i in range(5):
        np.save(clips / f"clip{i}.npy", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
        prompts[f"clip{i}.npy"] = f"clip number {i}"
    (clips / "prompts.json").write_text(json.dumps(prompts))

    meta = prepare_from_videos(tmp_path / "data", clips, tmp_path / "vae", num_val=2, shard_size=2, encoder=encoder)
    assert meta["latent_shape"] == [4, 3, 8, 8]  # (C, F, H/2, W/2): one downsampling block
    dm = LatentVideoDataModule(str(tmp_path / "data"), batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latents"].shape == (3, 4, 3, 8, 8) and (batch["digit"] == -1).all()
    # latents are the scaled posterior mean of each frame
    name = batch["prompt"][0].replace("clip number ", "clip") + ".npy"
    frames = torch.from_numpy(np.load(clips / name)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = vae.encode(frames).latent_dist.mean * vae.config.scaling_factor  # (F, C, h, w)
    assert torch.allclose(batch["latents"][0], expected.transpose(0, 1), atol=1e-5)


def test_user_videos_errors(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    np.save(clips / "a.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="prompts.json"):
        prepare_from_videos(tmp_path / "out", clips, tmp_path / "vae")
    (clips / "prompts.json").write_text(json.dumps({"b.npy": "x"}))
    with pytest.raises(ValueError, match="no prompt for"):
        prepare_from_videos(tmp_path / "out", clips, tmp_path / "vae")
