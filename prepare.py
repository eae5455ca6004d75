"""Build the sharded dataset that every stage trains on (SPEC §6).

    python prepare.py --out data/digits --num_train 20000 --num_val 512 --shard_size 4096 --seed 0
    python prepare.py --source videos --video_dir clips/ --vae path/to/vae --out data/clips --num_val 8

`--source videos --pipeline PATH` encodes a folder of videos (mp4/webm/gif/png frames/.npy) with the
VAE and text encoders of a local diffusers pipeline (datamodules/video_source.py); `--vae PATH` alone
encodes `.npy` clips with that VAE and MiniLM prompts. Everything runs offline.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datamodules import moving_digits as world  # noqa: E402
from datamodules.shards import is_shard_file, prepare_from_videos, prepare_moving_digits  # noqa: E402
from datamodules.text_encoder import MAX_LENGTH  # noqa: E402
from datamodules.video_source import add_pipeline_args, prepare_with_pipeline  # noqa: E402
from models.io import check_writable  # noqa: E402


def check_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sizes that would build an empty or broken dataset are refused before anything is written."""
    minimum = {"num_train": 1, "num_val": 0, "shard_size": 1, "max_length": 1, "num_frames": 1, "size": 1,
               "frames": 1, "frame_stride": 1, "height": 1, "width": 1, "text_length": 1}
    meaning = {"frame_stride": " (1 takes every frame, 2 every other one)",
               "text_length": " (or leave it out for the pipeline's own length)"}
    for name, low in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            p.error(f"--{name} must be >= {low}{meaning.get(name, '')}, got {value}")


def check_output_dir(p: argparse.ArgumentParser, out: str, overwrite: bool) -> None:
    """Never write into a directory holding a dataset (metadata.json) or anyone else's files unless
    --overwrite. Shards without metadata.json are an interrupted prepare.py run: those are rewritten."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        p.error(f"--out {out} exists and is not a directory")
    entries = sorted(e.name for e in path.iterdir()) if path.is_dir() else []
    others = [name for name in entries if not is_shard_file(name)]
    if others and not overwrite:
        p.error(f"--out {out} is not empty ({len(entries)} entries, e.g. {others[:3]}); pass --overwrite to "
                f"replace the dataset there (its old shards are removed, other files are kept) or choose another --out")
    try:
        check_writable(path, "--out")  # before any encoding work
    except PermissionError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--source", choices=("moving_digits", "videos"), default="moving_digits")
    p.add_argument("--num_train", type=int, default=20000, help="moving_digits: training videos")
    p.add_argument("--num_val", type=int, default=512, help="validation videos")
    p.add_argument("--shard_size", type=int, default=4096, help="samples per shard file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_length", type=int, default=MAX_LENGTH, help="text tokens per prompt")
    p.add_argument("--num_frames", type=int, default=world.NUM_FRAMES, help="moving_digits: frames")
    p.add_argument("--size", type=int, default=world.FRAME_SIZE, help="moving_digits: frame size in pixels")
    p.add_argument("--balanced_val", action="store_true",
                   help="moving_digits: every digit equally often in val (video i shows digit i mod 10)")
    p.add_argument("--video_dir", help="videos: folder of .npy clips and prompts.json")
    p.add_argument("--vae", help="videos: local diffusers VAE directory")
    p.add_argument("--device", default="cpu", help="videos: device for the VAE")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out")
    add_pipeline_args(p)
    args = p.parse_args(argv)
    check_sizes(p, args)
    check_output_dir(p, args.out, args.overwrite)

    if args.source == "moving_digits":
        meta = prepare_moving_digits(args.out, args.num_train, args.num_val, args.shard_size, args.seed,
                                     args.max_length, num_frames=args.num_frames, size=args.size,
                                     balanced_val=args.balanced_val)
    elif args.pipeline:
        meta = prepare_with_pipeline(args)
    else:
        if not args.video_dir or not args.vae:
            p.error("--source videos needs --video_dir and --vae")
        meta = prepare_from_videos(args.out, args.video_dir, args.vae, args.num_val, args.shard_size, args.seed,
                                   args.max_length, device=args.device)
    counts = {k: v["num_samples"] for k, v in meta["splits"].items()}
    print(f"wrote {args.out}: latents {meta['latent_shape']}, samples {counts}")
    return meta


if __name__ == "__main__":
    main()
