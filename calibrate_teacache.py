"""Calibrate TeaCache's rescale polynomial for an exported model (caching/teacache_calibration.py).

    python calibrate_teacache.py --model_dir exports/teacher --data_dir data/digits --num_steps 20 \
        --mode cfg --cfg_scale 5.0 --num_prompts 8

Runs full sampling for the first `num_prompts` validation prompts (seeded noise), fits the
polynomial and writes `<model_dir>/teacache_<mode>_<num_steps>.json` (or `--out`), which
`make_cache("teacache", num_steps=..., threshold=..., calibration=PATH)` loads.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from jsonargparse import CLI  # noqa: E402

from caching.teacache_calibration import calibrate_teacache, calibration_path  # noqa: E402
from datamodules.latent_video import LatentVideoDataModule, batch_text  # noqa: E402
from models.io import check_config_files, load_backbone  # noqa: E402
from sampling.sampler import ModelVelocity  # noqa: E402


def main(model_dir: str, data_dir: str, num_steps: int = 20, mode: str = "cfg", cfg_scale: float | None = None,
         guidance: float | None = None, shift: float = 1.0, num_prompts: int = 8, degree: int = 4, seed: int = 0,
         device: str = "cpu", out: str | None = None) -> str:
    """Fit and save the TeaCache rescale polynomial; returns the JSON path.

    Args:
        model_dir: exported backbone (models.io.save_backbone layout).
        data_dir: dataset directory (prepare.py); prompts come from its validation split.
        num_steps: sampler steps the cache will be used with.
        mode: ModelVelocity mode: 'cfg' (teacher, needs cfg_scale), 'plain' or 'meanflow' (distilled).
        cfg_scale: CFG scale for mode 'cfg'.
        guidance: guidance input of a CFG-distilled model (modes 'plain' / 'meanflow').
        shift: timestep shift of the sampling grid (must match the evaluation).
        num_prompts: validation prompts (one sampling batch).
        degree: polynomial degree.
        seed: noise seed.
        device: torch device.
        out: output JSON (default <model_dir>/teacache_<mode>_<num_steps>.json).
    """
    if mode not in ModelVelocity.MODES:
        raise ValueError(f"mode {mode!r} not in {ModelVelocity.MODES}")
    if mode == "cfg" and cfg_scale is None:
        raise ValueError("mode 'cfg' needs --cfg_scale (the scale the cached sampler will use)")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    # only a few validation prompts are read: skip hashing every training shard
    data = LatentVideoDataModule(data_dir, batch_size=num_prompts, val_batch_size=num_prompts, verify_checksums=False)
    batch = next(iter(data.val_dataloader()))
    text = batch_text(batch).to(device=device)
    null_text = data.null_text.to(device=device) if mode == "cfg" else None
    model = load_backbone(model_dir, map_location=device).eval()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch["latents"].shape, generator=gen).to(device)
    result = calibrate_teacache(model, text, noise, num_steps=num_steps, mode=mode, shift=shift, cfg_scale=cfg_scale,
                                null_text=null_text, guidance=guidance, degree=degree)
    path = result.save(out or calibration_path(model_dir, mode, num_steps))
    print(f"wrote {path}: coefficients {result.coefficients}, rmse {result.rmse:.4g} over {result.num_points} "
          f"points, x in [{result.x_range[0]:.4g}, {result.x_range[1]:.4g}]")
    return str(path)


if __name__ == "__main__":
    check_config_files(sys.argv[1:])  # a YAML syntax error names its file
    CLI(main, as_positional=False)
