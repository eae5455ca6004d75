"""Build the sharded, memory-mappable dataset that `LatentVideoDataModule` reads (SPEC §6).

Layout of a prepared directory:

    metadata.json              format version, shapes, splits -> shards (+ sample counts, sizes,
                               sha256), null-prompt file, vocabularies, world/VAE parameters
    train-00000.safetensors    latents (N, C, F, H, W) f32, text_tokens (N, L, D) f32,
    train-00000.json           text_mask (N, L) bool, pooled (N, D) f32, digit/color/direction (N,) i64
    ...                        and the prompts of that shard as a JSON list
    val-00000.safetensors
    null_prompt.safetensors    tokens (1, L, D), mask (1, L), pooled (1, D): the CFG null condition

Every file is written atomically (`models.io.atomic_write`), and metadata.json is written last:
a directory with metadata is complete, and an interrupted run leaves none.

Two sources: the moving-digits world (pixel space: latents are the videos themselves) and user
videos encoded by a diffusers VAE loaded from a local path.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from datamodules import moving_digits as world
from datamodules.text_encoder import ENCODER_NAME, MAX_LENGTH, NULL_PROMPT, TextEncoder
from models.io import atomic_write, atomic_write_json

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
NULL_PROMPT_FILE = "null_prompt.safetensors"
VIDEO_PROMPTS_FILE = "prompts.json"
LABEL_KEYS = ("digit", "color", "direction")
MISSING_LABEL = -1  # user videos carry no world attributes

Chunk = tuple[Tensor, dict[str, Tensor], list[str]]  # latents (n, C, F, H, W), labels, prompts


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}))




def _file_entry(path: Path) -> dict:
    return {"file": path.name, "num_bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_split(out: Path, split: str, chunks: Iterable[Chunk], encoder: TextEncoder, max_length: int) -> dict:
    """Write one shard per chunk; returns the split's metadata entry."""
    shards, total = [], 0
    for i, (latents, labels, prompts) in enumerate(chunks):
        tokens, mask, pooled = encoder.encode(prompts, max_length)
        tensors = {"latents": latents.float(), "text_tokens": tokens, "text_mask": mask, "pooled": pooled}
        tensors.update({k: labels[k].long() for k in LABEL_KEYS})
        shard = out / f"{split}-{i:05d}.safetensors"
        prompt_file = out / f"{split}-{i:05d}.json"
        _atomic_save_tensors(tensors, shard)
        atomic_write_json(prompt_file, prompts, indent=1)
        shards.append({**_file_entry(shard), "num_samples": len(prompts), "prompts": _file_entry(prompt_file)})
        total += len(prompts)
    return {"num_samples": total, "shards": shards}


def _chunk_sizes(num: int, shard_size: int) -> list[int]:
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    return [min(shard_size, num - start) for start in range(0, num, shard_size)]


def _finish(out: Path, splits: dict, latent_shape: tuple[int, ...], encoder: TextEncoder, max_length: int,
            source: dict, vocab: dict | None, seed: int) -> dict:
    tokens, mask, pooled = encoder.encode([NULL_PROMPT], max_length)
    _atomic_save_tensors({"tokens": tokens, "mask": mask, "pooled": pooled}, out / NULL_PROMPT_FILE)
    metadata = {
        "format_version": FORMAT_VERSION,
        "latent_shape": list(latent_shape),
        "text": {"encoder": getattr(encoder, "name", ENCODER_NAME), "length": max_length, "dim": tokens.shape[-1],
                 "pooled_dim": pooled.shape[-1], **getattr(encoder, "metadata", {"family": "minilm"})},
        "null_prompt": {**_file_entry(out / NULL_PROMPT_FILE), "prompt": NULL_PROMPT},
        "splits": splits,
        "vocab": vocab,
        "source": source,
        "seed": seed,
    }
    atomic_write_json(out / METADATA_FILE, metadata, indent=1)
    return metadata


def _start(out: str | Path) -> Path:
    """Create `out`, drop any old metadata first (so a half-rewritten directory never looks complete),
    then the old dataset's shards (a smaller new dataset must not leave stale ones behind). Other
    files are left alone; prepare.py refuses a non-empty directory unless --overwrite."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    for path in out.iterdir():
        if is_shard_file(path.name):
            path.unlink()
    return out


def is_shard_file(name: str) -> bool:
    """A file this module writes besides metadata.json (shards, prompts, null prompt, a killed write's temp,
    the shard record of an interrupted pipeline prepare: datamodules/video_source.py)."""
    return name in (NULL_PROMPT_FILE, "progress.json") or bool(re.fullmatch(r"(train|val)-\d{5}\.(safetensors|json)|\.\S+\.partial", name))


def _shard_seed(seed: int, split: str, index: int) -> int:
    """Independent per-shard seeds, so adding shards never changes the earlier ones."""
    return int(np.random.SeedSequence([seed, world.SPLITS.index(split), index]).generate_state(1)[0])


def prepare_moving_digits(out: str | Path, num_train: int = 20000, num_val: int = 512, shard_size: int = 4096,
                          seed: int = 0, max_length: int = MAX_LENGTH, encoder: TextEncoder | None = None,
                          num_frames: int = world.NUM_FRAMES, size: int = world.FRAME_SIZE,
                          digit_size: int = world.DIGIT_SIZE, speed: int = world.SPEED,
                          balanced_val: bool = False) -> dict:
    """Render the default world into shards: train from training digits, val from held-out digits
    (`balanced_val`: every digit equally often in val, world.sample_world's `balanced_digits`)."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got num_train={num_train}, num_val={num_val}")
    out = _start(out)
    encoder = encoder or TextEncoder()
    params = world.world_params(num_frames, size, digit_size, speed)
    render = dict(num_frames=num_frames, size=size, digit_size=digit_size, speed=speed)

    def chunks(split: str, num: int) -> Iterator[Chunk]:
        for i, n in enumerate(_chunk_sizes(num, shard_size)):
            yield world.sample_world(n, split, _shard_seed(seed, split, i), **render,
                                     balanced_digits=balanced_val and split == "val")

    splits = {split: _write_split(out, split, chunks(split, num), encoder, max_length)
              for split, num in (("train", num_train), ("val", num_val))}
    vocab = {"digits": list(range(world.NUM_DIGITS)), "colors": list(world.COLOR_NAMES),
             "directions": list(world.DIRECTION_NAMES)}
    latent_shape = (3, num_frames, size, size)
    return _finish(out, splits, latent_shape, encoder, max_length,
                   {**params, "latent_space": "pixels", "balanced_val": balanced_val}, vocab, seed)


# ---- user videos through a diffusers VAE ----

def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """Instantiate the VAE class named in its config.json (AutoencoderKL, AutoencoderKLHunyuanVideo, ...)."""
    import diffusers

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no VAE config.json under {path}; save the VAE with `save_pretrained` first")
    class_name = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ValueError(f"{config_file} names VAE class {class_name!r}, which diffusers does not provide")
    return cls.from_pretrained(str(path), local_files_only=True).to(device).eval()


@torch.inference_mode()
def encode_videos(vae, videos: Tensor) -> Tensor:
    """(N, F, H, W, 3) uint8 -> latents (N, C, F', h, w), scaled as the diffusion model expects.

    A 2-D `AutoencoderKL` encodes each frame as an image; video VAEs take (N, 3, F, H, W) directly.
    The posterior mean is used (no sampling noise in the stored data).
    """
    device = next(vae.parameters()).device
    x = videos.to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (N, 3, F, H, W) in [-1, 1]
    n, _, f, h, w = x.shape
    if type(vae).__name__ == "AutoencoderKL":
        frames = x.transpose(1, 2).reshape(n * f, 3, h, w)
        z = vae.encode(frames).latent_dist.mean  # (N F, C, h', w')
        z = z.reshape(n, f, *z.shape[1:]).transpose(1, 2)  # (N, C, F, h', w')
    else:
        z = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float().cpu()


def read_video_dir(video_dir: str | Path) -> tuple[list[Path], list[str]]:
    """The .npy clips (F, H, W, 3) uint8 of `video_dir` and their prompts from prompts.json {file: prompt}."""
    video_dir = Path(video_dir)
    prompt_file = video_dir / VIDEO_PROMPTS_FILE
    if not prompt_file.is_file():
        raise FileNotFoundError(f"{prompt_file} is missing: it must map each .npy file name to its prompt")
    prompts = json.loads(prompt_file.read_text())
    files = sorted(video_dir.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"no .npy videos in {video_dir}")
    missing = [f.name for f in files if f.name not in prompts]
    if missing:
        raise ValueError(f"{prompt_file} has no prompt for {missing[:5]}")
    return files, [prompts[f.name] for f in files]


def _load_clips(files: list[Path]) -> Tensor:
    clips = [np.load(f) for f in files]
    for f, clip in zip(files, clips):
        if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape != clips[0].shape:
            raise ValueError(f"{f} must be a uint8 (F, H, W, 3) array shaped like {files[0].name} "
                             f"{clips[0].shape}; got {clip.dtype} {clip.shape}")
    return torch.from_numpy(np.stack(clips))


def prepare_from_videos(out: str | Path, video_dir: str | Path, vae_path: str | Path, num_val: int = 1,
                        shard_size: int = 4096, seed: int = 0, max_length: int = MAX_LENGTH,
                        encoder: TextEncoder | None = None, device: str = "cpu") -> dict:
    """Encode user clips with a local diffusers VAE; a seeded random `num_val` of them form val."""
    files, prompts = read_video_dir(video_dir)
    if not 0 <= num_val < len(files):
        raise ValueError(f"num_val must be in [0, {len(files)}) for {len(files)} videos, got {num_val}")
    out = _start(out)
    encoder = encoder or TextEncoder()
    vae = load_vae(vae_path, device)
    order = np.random.default_rng(seed).permutation(len(files))
    members = {"train": order[num_val:], "val": order[:num_val]}

    def chunks(split: str) -> Iterator[Chunk]:
        idx = members[split]
        for start in range(0, len(idx), shard_size):
            part = idx[start:start + shard_size]
            latents = encode_videos(vae, _load_clips([files[i] for i in part]))
            labels = {k: torch.full((len(part),), MISSING_LABEL, dtype=torch.long) for k in LABEL_KEYS}
            yield latents, labels, [prompts[i] for i in part]

    splits = {split: _write_split(out, split, chunks(split), encoder, max_length) for split in ("train", "val")}
    first = out / splits["train"]["shards"][0]["file"]
    with safe_open(str(first), framework="pt") as f:
        latent_shape = tuple(f.get_slice("latents").get_shape()[1:])
    source = {"name": "videos", "video_dir": str(video_dir), "vae": str(vae_path), "vae_class": type(vae).__name__,
              "scaling_factor": vae.config.scaling_factor, "latent_space": "vae"}
    return _finish(out, splits, latent_shape, encoder, max_length, source, None, seed)
