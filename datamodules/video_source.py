"""User videos -> the sharded latent dataset, encoded by the user's own diffusers pipeline (SPEC §6).

    python prepare.py --source videos --video_dir clips/ --pipeline path/to/HunyuanVideo --out data/clips \
        --num_frames 33 --height 320 --width 512

A local diffusers pipeline directory (`save_pretrained` layout: model_index.json + one folder per
component) provides both encoders, so the data matches what the pipeline itself feeds its transformer:

- latents: the pipeline's VAE (posterior mean), normalised exactly as the pipeline un-normalises before
  decoding (HunyuanVideo: `* scaling_factor`; Wan: `(z - latents_mean) / latents_std`);
- prompts: the pipeline's own `encode_prompt` path. HunyuanVideo: LLaMA hidden states (third-to-last
  layer) of the prompt inside diffusers' DEFAULT_PROMPT_TEMPLATE with its `crop_start`, plus CLIP's pooled
  output; Wan: UMT5 last hidden states, zero-padded (no pooled vector: a zero (1,) placeholder is stored).
  The null prompt "" goes through the same path.

Videos: `*.mp4 *.webm *.mkv *.mov *.avi *.gif` (decoded with PyAV), a folder of `*.png` frames (a PNG
sequence, sorted by name) or a `.npy` uint8 (F, H, W, 3) array. Captions: a JSON file {name: prompt}
(default `video_dir/prompts.json`); every video must have one. Frames: `num_frames` frames every
`frame_stride`-th frame from the start; `num_frames` must follow the VAE's rule (4k + 1), and a clip
that is too short is an error naming the file. Resize (shorter side to cover) + centre crop to
(height, width).

Resumable: each shard is written atomically and recorded in `progress.json` with a fingerprint of the
inputs and settings; a re-run with the same arguments skips the recorded shards (a killed prepare
continues after its last complete shard). metadata.json is written last.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.shards import (LABEL_KEYS, METADATA_FILE, MISSING_LABEL, VIDEO_PROMPTS_FILE, _atomic_save_tensors,
                                _file_entry, _finish)
from models.io import atomic_write_json

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
PROGRESS_FILE = "progress.json"
PIPELINES = {  # diffusers pipeline class -> (family, text components that must exist, default text length)
    "HunyuanVideoPipeline": ("hunyuan_video", ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"), 256),
    "WanPipeline": ("wan", ("text_encoder", "tokenizer"), 512),
}
FAMILY_OF_BACKBONE = {"hunyuan_video": "hunyuan_video", "wan": "wan"}  # backbone config type -> text family


# ---- reading videos --------------------------------------------------------------------------------
def list_videos(video_dir: str | Path) -> list[Path]:
    """Video files, PNG-sequence folders and .npy arrays directly inside `video_dir`, sorted by name."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video directory {video_dir} does not exist")
    found = [p for p in sorted(video_dir.iterdir())
             if (p.is_file() and p.suffix.lower() in (*VIDEO_EXTENSIONS, ".npy"))
             or (p.is_dir() and any(p.glob("*.png")))]
    if not found:
        raise FileNotFoundError(f"no videos in {video_dir} (expected {', '.join(VIDEO_EXTENSIONS)}, .npy, or "
                                "folders of .png frames)")
    return found


def read_captions(videos: Sequence[Path], captions: str | Path) -> list[str]:
    """The prompt of every video from a JSON file {video name: prompt}; names every video without one."""
    captions = Path(captions)
    if not captions.is_file():
        raise FileNotFoundError(f"captions file {captions} is missing: it must map each video's file name to its "
                                "prompt, e.g. {\"clip1.mp4\": \"a dog runs on a beach\"}")
    try:
        table = json.loads(captions.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"captions file {captions} is not valid JSON: {err}") from err
    if not isinstance(table, dict):
        raise ValueError(f"captions file {captions} must hold a JSON object {{video name: prompt}}")
    missing = [v.name for v in videos if not isinstance(table.get(v.name), str)]
    if missing:
        raise ValueError(f"captions file {captions} has no prompt for {len(missing)} video(s): {missing[:10]}")
    return [table[v.name] for v in videos]


def decode_video(path: Path) -> np.ndarray:
    """All frames of one video as uint8 (F, H, W, 3); any decoding failure names the file."""
    try:
        if path.is_dir():
            import imageio.v3 as iio

            frames = [np.asarray(iio.imread(p))[..., :3] for p in sorted(path.glob("*.png"))]
            clip = np.stack(frames)
        elif path.suffix.lower() == ".npy":
            clip = np.load(path, allow_pickle=False)
        else:
            import av

            with av.open(str(path)) as container:
                clip = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    except Exception as err:  # decoders raise many types; the user needs the file name
        raise ValueError(f"cannot read video {path}: {type(err).__name__}: {err}") from err
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] == 0:
        raise ValueError(f"video {path} must decode to uint8 (F, H, W, 3) frames, got {clip.dtype} {clip.shape}")
    return clip


def check_frame_rule(num_frames: int, temporal_ratio: int) -> None:
    if num_frames < 1 or (num_frames - 1) % temporal_ratio:
        raise ValueError(f"num_frames={num_frames} does not follow the VAE's frame rule {temporal_ratio}k + 1 "
                         f"(e.g. {temporal_ratio + 1}, {2 * temporal_ratio + 1}, {8 * temporal_ratio + 1})")


def sample_frames(clip: np.ndarray, num_frames: int, stride: int, name: str) -> np.ndarray:
    """`num_frames` frames, every `stride`-th from the start; a clip that is too short is an error."""
    need = (num_frames - 1) * stride + 1
    if clip.shape[0] < need:
        raise ValueError(f"video {name} has {clip.shape[0]} frames, fewer than the {need} needed for "
                         f"num_frames={num_frames} at frame_stride={stride}")
    return clip[:need:stride]


def resize_crop(clip: np.ndarray, height: int, width: int) -> Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, height, width) in [-1, 1]: scale the shorter side to cover, centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()  # (F, 3, H, W)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    x = x[:, :, top:top + height, left:left + width].clamp(0, 255)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3)


# ---- the pipeline's own encoders ----------------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16, with a clear error for anything else."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype {name!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
    return dtype


def pipeline_class(path: str | Path) -> str:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: --pipeline must be a local diffusers pipeline directory "
                                "(save_pretrained layout)")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{index} names pipeline {name!r}; supported: {sorted(PIPELINES)}")
    return name


class PipelineEncoder:
    """The VAE and text encoders of a local diffusers pipeline (its transformer is not loaded).

    `encode(prompts, max_length)` -> tokens (N, L, D), mask (N, L) bool, pooled (N, D_pool), the interface of
    `datamodules.text_encoder.TextEncoder`, so the shard writer treats both alike."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        import diffusers

        path = Path(path)
        self.class_name = pipeline_class(path)
        self.family, text_parts, self.default_length = PIPELINES[self.class_name]
        index = json.loads((path / "model_index.json").read_text())
        for part in ("vae", *text_parts):
            if not index.get(part) or index[part][0] is None or not (path / part).is_dir():
                kind = "VAE" if part == "vae" else ("tokenizer" if "tokenizer" in part else "text encoder")
                raise FileNotFoundError(f"pipeline directory {path} has no {kind} {part!r} (expected {path / part}, "
                                        f"listed in model_index.json): {self.class_name} needs {('vae', *text_parts)}")
        skip = {k: None for k in ("transformer", "transformer_2") if k in index}
        self.pipe = getattr(diffusers, self.class_name).from_pretrained(str(path), local_files_only=True,
                                                                       dtype=dtype, **skip)
        self.pipe.to(device)
        self.path, self.device = path, torch.device(device)
        self.vae = self.pipe.vae.eval()
        vc = self.vae.config
        if self.family == "hunyuan_video":
            self.temporal_ratio, self.spatial_ratio = vc.temporal_compression_ratio, vc.spatial_compression_ratio
        else:
            self.temporal_ratio, self.spatial_ratio = vc.scale_factor_temporal, vc.scale_factor_spatial
        parts = "+".join(type(getattr(self.pipe, p)).__name__ for p in text_parts if "encoder" in p)
        self.name = f"{self.class_name}:{parts}"

    @property
    def metadata(self) -> dict:
        """What `metadata.json` records about the text encoder (its family is what stages check)."""
        meta = {"family": self.family, "pipeline": str(self.path)}
        if self.family == "hunyuan_video":
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

            meta["prompt_template"] = DEFAULT_PROMPT_TEMPLATE
        return meta

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, got a single string")
        pipe = self.pipe
        if self.family == "hunyuan_video":
            tokens, pooled, mask = pipe.encode_prompt(prompts, device=self.device, max_sequence_length=max_length)
        else:
            tokens = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_length, device=self.device)
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            mask = pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                                  truncation=True, add_special_tokens=True, return_tensors="pt").attention_mask
            pooled = torch.zeros(len(prompts), 1)
        return tokens.float().cpu(), mask.bool().cpu(), pooled.float().cpu()

    @torch.inference_mode()
    def encode_video(self, video: Tensor) -> Tensor:
        """(3, F, H, W) in [-1, 1] -> latents (C, F', h, w), normalised as the pipeline's transformer sees them."""
        vae = self.vae
        z = vae.encode(video[None].to(self.device, vae.dtype)).latent_dist.mean.float()
        if self.family == "hunyuan_video":
            z = z * vae.config.scaling_factor
        else:
            mean = torch.tensor(vae.config.latents_mean, device=z.device).view(1, -1, 1, 1, 1)
            std = torch.tensor(vae.config.latents_std, device=z.device).view(1, -1, 1, 1, 1)
            z = (z - mean) / std
        return z[0].cpu()


# ---- writing shards, resumably ------------------------------------------------------------------------
@dataclass
class VideoJob:
    files: list[Path]
    prompts: list[str]
    num_frames: int
    frame_stride: int
    height: int
    width: int


def source_signature(path: Path) -> list:
    """(name, size, mtime_ns) of a video file, or of every file of a PNG-sequence folder: a clip replaced
    under the same name changes it."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _fingerprint(job: VideoJob, encoder: PipelineEncoder, split: str, members: list[int], max_length: int) -> str:
    key = json.dumps([str(encoder.path), encoder.name, split, [job.files[i].name for i in members],
                      [source_signature(job.files[i]) for i in members],
                      [job.prompts[i] for i in members], job.num_frames, job.frame_stride, job.height, job.width,
                      max_length])
    return hashlib.sha256(key.encode()).hexdigest()


def _load_clip(job: VideoJob, i: int) -> Tensor:
    clip = decode_video(job.files[i])
    return resize_crop(sample_frames(clip, job.num_frames, job.frame_stride, str(job.files[i])), job.height, job.width)


def prepare_from_pipeline(out: str | Path, video_dir: str | Path, pipeline: str | Path, *,
                          captions: str | Path | None = None,
                          num_frames: int = 33, frame_stride: int = 1, height: int = 320, width: int = 512,
                          num_val: int = 1, shard_size: int = 64, seed: int = 0, max_length: int | None = None,
                          device: str = "cpu", dtype: str = "float32", progress: bool = True) -> dict:
    """Encode the videos of `video_dir` with the VAE and text encoders of the pipeline at `pipeline`."""
    from tqdm.auto import tqdm

    for name, value in (("frames", num_frames), ("frame_stride", frame_stride), ("height", height), ("width", width),
                        ("text_length", max_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    files = list_videos(video_dir)
    prompts = read_captions(files, captions or Path(video_dir) / VIDEO_PROMPTS_FILE)
    if not 0 <= num_val < len(files):
        raise ValueError(f"num_val must be in [0, {len(files)}) for {len(files)} videos, got {num_val}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    encoder = PipelineEncoder(pipeline, device, torch_dtype(dtype))
    check_frame_rule(num_frames, encoder.temporal_ratio)
    if height % encoder.spatial_ratio or width % encoder.spatial_ratio:
        raise ValueError(f"height x width {height}x{width} must be divisible by the VAE's spatial compression "
                         f"{encoder.spatial_ratio}")
    max_length = encoder.default_length if max_length is None else max_length
    job = VideoJob(files, prompts, num_frames, frame_stride, height, width)
    for i in range(len(files)):  # fail on an unreadable or short video before any encoding work
        clip = decode_video(files[i])
        sample_frames(clip, num_frames, frame_stride, str(files[i]))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / METADATA_FILE).unlink(missing_ok=True)
    progress_path = out / PROGRESS_FILE
    done = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    order = np.random.default_rng(seed).permutation(len(files)).tolist()
    members = {"train": order[num_val:], "val": order[:num_val]}
    splits = {}
    for split, idx in members.items():
        shards = []
        chunks = [idx[s:s + shard_size] for s in range(0, len(idx), shard_size)]
        for c, part in enumerate(tqdm(chunks, desc=f"{split} shards", disable=not progress)):
            name = f"{split}-{c:05d}"
            fp = _fingerprint(job, encoder, split, part, max_length)
            entry = done.get(name)
            if entry and entry["fingerprint"] == fp and all(
                    (out / e["file"]).is_file() and (out / e["file"]).stat().st_size == e["num_bytes"]
                    for e in (entry["shard"], entry["shard"]["prompts"])):
                shards.append(entry["shard"])
                continue
            latents = torch.stack([encoder.encode_video(_load_clip(job, i))
                                   for i in tqdm(part, desc=name, leave=False, disable=not progress)])
            texts = [prompts[i] for i in part]
            tokens, mask, pooled = encoder.encode(texts, max_length)
            tensors = {"latents": latents, "text_tokens": tokens, "text_mask": mask, "pooled": pooled}
            tensors.update({k: torch.full((len(part),), MISSING_LABEL, dtype=torch.long) for k in LABEL_KEYS})
            _atomic_save_tensors(tensors, out / f"{name}.safetensors")
            atomic_write_json(out / f"{name}.json", texts, indent=1)
            shard = {**_file_entry(out / f"{name}.safetensors"), "num_samples": len(part),
                     "prompts": _file_entry(out / f"{name}.json")}
            shards.append(shard)
            done[name] = {"fingerprint": fp, "shard": shard}
            atomic_write_json(progress_path, done, indent=1)
        splits[split] = {"num_samples": len(idx), "shards": shards}
    from safetensors import safe_open

    with safe_open(str(out / splits["train"]["shards"][0]["file"]), framework="pt") as f:
        latent_shape = tuple(f.get_slice("latents").get_shape()[1:])
    source = {"name": "videos", "video_dir": str(video_dir), "pipeline": str(pipeline),
              "pipeline_class": encoder.class_name, "vae_class": type(encoder.vae).__name__, "latent_space": "vae",
              "num_frames": num_frames, "frame_stride": frame_stride, "height": height, "width": width}
    meta = _finish(out, splits, latent_shape, encoder, max_length, source, None, seed)
    progress_path.unlink(missing_ok=True)
    return meta


# ---- the dataset must match the backbone -----------------------------------------------------------------
def backbone_text_dims(config: dict) -> tuple[str, int, int | None]:
    """(family, token dim, pooled dim or None) a backbone config expects of its text condition."""
    kind = config.get("type")
    d = config.get("diffusers_config", {})
    if kind == "hunyuan_video":
        return "hunyuan_video", int(d["text_embed_dim"]), int(d["pooled_projection_dim"])
    if kind == "wan":
        return "wan", int(d["text_dim"]), None
    if "text_dim" in config:
        return str(kind), int(config["text_dim"]), config.get("pooled_dim", config["text_dim"])
    raise ValueError(f"cannot tell which text condition a {kind!r} backbone expects")


def check_dataset_matches(metadata: dict, backbone_config: dict, data_dir: str | Path = "dataset") -> None:
    """Refuse a dataset encoded for another backbone: text family (encoder) and dims must agree."""
    family, dim, pooled = backbone_text_dims(backbone_config)
    text = metadata["text"]
    want = FAMILY_OF_BACKBONE.get(family)
    have = text.get("family")
    if want is not None and have != want:
        raise ValueError(f"dataset {data_dir} was encoded by {text.get('encoder')!r} (family {have!r}) but the "
                         f"{family} backbone needs text from its own pipeline's encoders (family {want!r}): "
                         f"re-run prepare.py --source videos --pipeline <your {family} pipeline>")
    if text["dim"] != dim or (pooled is not None and text["pooled_dim"] != pooled):
        raise ValueError(f"dataset {data_dir} has text dim {text['dim']} / pooled {text['pooled_dim']} "
                         f"(encoder {text.get('encoder')!r}) but the {family} backbone expects {dim} / {pooled}")


# ---- prepare.py's `--source videos --pipeline PATH` --------------------------------------------------------
def add_pipeline_args(parser) -> None:
    g = parser.add_argument_group("videos encoded by a diffusers pipeline (--source videos --pipeline PATH)")
    g.add_argument("--pipeline", help="local diffusers pipeline directory (HunyuanVideo or Wan) whose VAE and text "
                                      "encoders encode the videos and prompts")
    g.add_argument("--captions", help="JSON {video file name: prompt} (default VIDEO_DIR/prompts.json)")
    g.add_argument("--frames", type=int, default=33, help="frames per clip, 4k+1 (default 33)")
    g.add_argument("--frame_stride", type=int, default=1, help="take every n-th frame (>= 1)")
    g.add_argument("--height", type=int, default=320, help="frame height in pixels (a multiple of the VAE's factor)")
    g.add_argument("--width", type=int, default=512, help="frame width in pixels (a multiple of the VAE's factor)")
    g.add_argument("--encoder_dtype", default="float32", help="dtype of the VAE and text encoders (e.g. bfloat16 on GPU)")
    g.add_argument("--text_length", type=int, default=None,
                   help="prompt tokens (default: the pipeline's, 256 HunyuanVideo / 512 Wan)")


def prepare_with_pipeline(args) -> dict:
    if not args.video_dir:
        raise ValueError("--source videos --pipeline needs --video_dir")
    return prepare_from_pipeline(args.out, args.video_dir, args.pipeline, captions=args.captions,
                                 num_frames=args.frames, frame_stride=args.frame_stride, height=args.height,
                                 width=args.width, num_val=args.num_val, shard_size=args.shard_size, seed=args.seed,
                                 max_length=args.text_length, device=args.device, dtype=args.encoder_dtype)
