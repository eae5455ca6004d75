"""`LatentVideoDataModule`: the one data module every stage shares (SPEC §6).

It reads a directory written by `prepare.py` (layout in `datamodules/shards.py`), checks it
against its metadata once at setup (files present, sizes and sha256, tensor shapes), and serves
samples straight from memory-mapped safetensors shards.

Data order is a function of (seed, epoch) only: `EpochShuffleSampler` draws a fresh permutation
per epoch from a generator seeded with both, and Lightning calls `set_epoch` on it (also through
its DDP sampler wrapper), so a run resumed at epoch k sees exactly the batches of epoch k.
"""
from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.resumable import ResumableDataLoader
from distributed.sequence_parallel import data_parallel
from datamodules.shards import FORMAT_VERSION, LABEL_KEYS, METADATA_FILE, prepare_moving_digits, sha256_file
from models.protocol import TextCond

TENSOR_KEYS = ("latents", "text_tokens", "text_mask", "pooled") + LABEL_KEYS
REQUIRED_METADATA = ("format_version", "latent_shape", "text", "null_prompt", "splits")


def _expected_shapes(meta: dict, n: int) -> dict[str, list[int]]:
    L_txt, D, D_pool = meta["text"]["length"], meta["text"]["dim"], meta["text"]["pooled_dim"]
    shapes = {"latents": [n, *meta["latent_shape"]], "text_tokens": [n, L_txt, D], "text_mask": [n, L_txt],
              "pooled": [n, D_pool]}
    shapes.update({k: [n] for k in LABEL_KEYS})
    return shapes


def _check_file(path: Path, entry: dict, verify_checksum: bool) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} listed in {METADATA_FILE} is missing; "
                                f"re-run `python prepare.py --out {path.parent}`")
    size = path.stat().st_size
    if size != entry["num_bytes"]:
        raise ValueError(f"dataset file {path} is corrupt: {size} bytes, metadata says {entry['num_bytes']}")
    if verify_checksum and sha256_file(path) != entry["sha256"]:
        raise ValueError(f"dataset file {path} is corrupt: its sha256 does not match {METADATA_FILE}")


def _check_shapes(path: Path, expected: dict[str, list[int]]) -> None:
    with safe_open(str(path), framework="pt") as f:
        for key, shape in expected.items():
            if key not in f.keys():
                raise ValueError(f"{path} has no tensor {key!r} (has {sorted(f.keys())})")
            got = list(f.get_slice(key).get_shape())
            if got != shape:
                raise ValueError(f"{path}: tensor {key!r} has shape {got}, metadata implies {shape}")


def load_metadata(data_dir: str | Path, verify_checksums: bool = True) -> dict:
    """Read metadata.json and check every file it lists; raises with the offending path."""
    data_dir = Path(data_dir)
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the dataset first with `python prepare.py --out {data_dir}`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-run `python prepare.py --out {data_dir}`") from err
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks keys {missing}; re-run `python prepare.py --out {data_dir}`")
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta['format_version']}, this code reads {FORMAT_VERSION}")

    null = meta["null_prompt"]
    _check_file(data_dir / null["file"], null, verify_checksums)
    L_txt, D, D_pool = meta["text"]["length"], meta["text"]["dim"], meta["text"]["pooled_dim"]
    _check_shapes(data_dir / null["file"], {"tokens": [1, L_txt, D], "mask": [1, L_txt], "pooled": [1, D_pool]})
    for split, info in meta["splits"].items():
        counted = sum(s["num_samples"] for s in info["shards"])
        if counted != info["num_samples"]:
            raise ValueError(f"{path}: split {split!r} says {info['num_samples']} samples, its shards hold {counted}")
        for shard in info["shards"]:
            _check_file(data_dir / shard["file"], shard, verify_checksums)
            _check_file(data_dir / shard["prompts"]["file"], shard["prompts"], verify_checksums)
            _check_shapes(data_dir / shard["file"], _expected_shapes(meta, shard["num_samples"]))
    return meta


class ShardedLatentDataset(Dataset):
    """Samples of one split; each shard is opened (memory-mapped) on first use, per process."""

    def __init__(self, data_dir: str | Path, shards: list[dict]):
        self.paths = [Path(data_dir) / s["file"] for s in shards]
        self.prompt_paths = [Path(data_dir) / s["prompts"]["file"] for s in shards]
        self.offsets = np.cumsum([0] + [s["num_samples"] for s in shards]).tolist()  # shard i: [off[i], off[i+1])
        self._handles: dict[int, object] = {}
        self._prompts: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        # open mmap handles do not pickle (spawned workers); each worker reopens its own
        return {**self.__dict__, "_handles": {}}

    def _shard(self, i: int):
        if i not in self._handles:
            self._handles[i] = safe_open(str(self.paths[i]), framework="pt")
            self._prompts[i] = json.loads(self.prompt_paths[i].read_text())
        return self._handles[i]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        i = bisect.bisect_right(self.offsets, index) - 1
        local = index - self.offsets[i]
        f = self._shard(i)
        item = {k: f.get_slice(k)[local] for k in TENSOR_KEYS}
        item["text_mask"] = item["text_mask"].bool()
        item["index"] = torch.tensor(index, dtype=torch.long)
        item["prompt"] = self._prompts[i][local]
        return item


class EpochShuffleSampler(DistributedSampler):
    """A permutation drawn from (seed, epoch): resuming at epoch k reproduces epoch k's order.

    Without `set_epoch` every pass repeats epoch 0's order (as torch's DistributedSampler does).
    With `num_replicas` > 1, replica `rank` takes positions rank, rank + num_replicas, ... of that one
    permutation (the tail that does not divide evenly is dropped), so with a per-rank batch of 1 the
    ranks together see exactly the 1-process order, rank k drawing what micro-batch k of one process
    accumulating num_replicas micro-batches draws. It is a DistributedSampler so that Lightning uses it
    as is instead of wrapping it in a second, differently shuffled one.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, num_replicas={num_replicas})")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(self.num_samples))
        return iter(order[: len(self) * self.num_replicas][self.rank::self.num_replicas])


def collate(items: list[dict]) -> dict:
    """Stack samples into a batch: latents (B, C, F, H, W), text_tokens (B, L, D), text_mask (B, L) bool,
    pooled (B, D), digit/color/direction/index (B,) int64, prompt list[str]."""
    batch = {k: torch.stack([item[k] for item in items]) for k in TENSOR_KEYS + ("index",)}
    batch["prompt"] = [item["prompt"] for item in items]
    return batch


def batch_text(batch: dict) -> TextCond:
    return TextCond(batch["text_tokens"], batch["text_mask"], batch["pooled"])


class LatentVideoDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str, batch_size: int = 32, num_workers: int = 0, val_batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = True, verify_checksums: bool = True,
                 prepare_if_missing: dict | None = None):
        """The sharded dataset written by prepare.py.

        Args:
            data_dir: directory written by prepare.py (metadata.json + shards).
            batch_size: training samples per batch (per process).
            num_workers: DataLoader worker processes.
            val_batch_size: validation batch size (default: batch_size).
            shuffle: draw a fresh (seed, epoch) permutation each epoch.
            seed: seed of the data order.
            drop_last: drop the last incomplete training batch (validation always sees every sample).
            verify_checksums: hash every shard against metadata.json at setup.
            prepare_if_missing: kwargs of `prepare_moving_digits` (num_train, num_val, shard_size) used
                when data_dir holds no dataset yet (tests, smoke runs).
        """
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.shuffle, self.seed, self.drop_last = num_workers, shuffle, seed, drop_last
        self.verify_checksums = verify_checksums
        self.prepare_if_missing = prepare_if_missing
        self._metadata: dict | None = None
        self._null_text: TextCond | None = None
        self.datasets: dict[str, ShardedLatentDataset] = {}

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node, before `setup`."""
        if self.prepare_if_missing is not None and not (self.data_dir / METADATA_FILE).is_file():
            prepare_moving_digits(self.data_dir, **self.prepare_if_missing)

    def setup(self, stage: str | None = None) -> None:
        if self._metadata is None:  # validation hashes every shard: do it once
            self._metadata = load_metadata(self.data_dir, self.verify_checksums)
            self.datasets = {split: ShardedLatentDataset(self.data_dir, info["shards"])
                             for split, info in self._metadata["splits"].items()}
        if stage == "fit":
            self._check_fit_splits()

    def _check_fit_splits(self) -> None:
        """Fail before training, not after it: a training split with no full batch would "finish" at
        once with no export, and a missing validation split used to surface as a bare StopIteration at
        the first validation."""
        train = len(self._split("train"))
        if train == 0 or (self.drop_last and train < self.batch_size):
            raise ValueError(f"{self.data_dir}: the train split has {train} samples, fewer than one batch of "
                             f"{self.batch_size}{' (drop_last)' if self.drop_last else ''}: no training step would run")
        limit = getattr(self.trainer, "limit_val_batches", 1) if self.trainer is not None else 1
        if limit and len(self.datasets.get("val", ())) == 0:
            raise ValueError(f"{self.data_dir} has no validation samples (splits: "
                             f"{ {k: len(v) for k, v in self.datasets.items()} }); rebuild it with "
                             f"`prepare.py --num_val N` (N >= 1) or set --trainer.limit_val_batches 0")

    @property
    def metadata(self) -> dict:
        self.setup()
        return self._metadata

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, F, H, W) of one sample."""
        return tuple(self.metadata["latent_shape"])

    @property
    def null_text(self) -> TextCond:
        """The empty prompt's condition, batch 1: the unconditional branch of CFG."""
        if self._null_text is None:
            with safe_open(str(self.data_dir / self.metadata["null_prompt"]["file"]), framework="pt") as f:
                self._null_text = TextCond(f.get_tensor("tokens"), f.get_tensor("mask").bool(), f.get_tensor("pooled"))
        return self._null_text

    def _split(self, split: str) -> ShardedLatentDataset:
        self.setup()
        if split not in self.datasets:
            raise ValueError(f"{self.data_dir} has no split {split!r} (has {sorted(self.datasets)})")
        return self.datasets[split]

    def _batches_done(self) -> int:
        """Batches of the current epoch the trainer has trained on (for mid-epoch resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def _replicas(self) -> tuple[int, int]:
        """(number of data-parallel replicas, this rank) from the attached trainer; (1, 0) without one. The S
        ranks of a sequence-parallel group are one replica (distributed/sequence_parallel.py)."""
        return data_parallel(self.trainer) if self.trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        data = self._split("train")
        return ResumableDataLoader(data, batch_size=self.batch_size,
                                   sampler=EpochShuffleSampler(len(data), self.seed, self.shuffle, *self._replicas()),
                                   num_workers=self.num_workers, collate_fn=collate, drop_last=self.drop_last,
                                   persistent_workers=self.num_workers > 0, progress=self._batches_done)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._split("val"), batch_size=self.val_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate, drop_last=False,
                          persistent_workers=self.num_workers > 0)
