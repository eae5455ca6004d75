"""The user's diffusers transformer in and out of this framework.

- `load_transformer(pipeline, ...)`: the transformer of a LOCAL diffusers pipeline directory as a backbone
  (the HunyuanVideo or Wan adapter, chosen from model_index.json): what the stage configs in
  configs/hunyuan_video/ and configs/wan/ build their teacher from.
- `export_diffusers(backbone, directory)`: a trained stage as a diffusers `save_pretrained` transformer
  directory. `HunyuanVideoTransformer3DModel.from_pretrained(directory)` (or Wan's) loads it back as a
  plain diffusers model, guidance embedder included where diffusers has one (HunyuanVideo's
  `guidance_embeds`); the embedders diffusers has no slot for (the r embedder `time_r_in` of stage 2,
  Wan's added `guidance_in`) are stored beside it in `disca_embedders.safetensors`, described by
  `disca.json` (kept out of diffusers' config.json, which diffusers would warn about), so
  `load_diffusers_export` / `integration.attach.apply_disca` restore them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from datamodules.video_source import PIPELINES, pipeline_class
from datamodules.video_source import torch_dtype as _to_dtype
from models.io import check_export_target, replace_directory

EMBEDDERS_FILE = "disca_embedders.safetensors"
DISCA_FILE = "disca.json"  # which adapter, r / guidance embedders, the embedder weights file


def _adapter_class(kind: str):
    if kind == "hunyuan_video":
        from models.hunyuan_video import HunyuanVideoBackbone

        return HunyuanVideoBackbone
    if kind == "wan":
        from models.wan import WanBackbone

        return WanBackbone
    raise ValueError(f"no diffusers adapter for backbone type {kind!r}; expected 'hunyuan_video' or 'wan'")


def load_transformer(pipeline: str, r_embed: str | None = None, guidance_embed: bool | None = None,
                     torch_dtype: str | None = None, attention_backend: str = "sdpa") -> nn.Module:
    """The transformer of the local pipeline directory `pipeline` as a backbone (nothing is downloaded).
    `guidance_embed=True` adds a zero-initialised guidance embedder where the model has none (stage 1);
    `r_embed` adds the stage-2 r embedder."""
    family = PIPELINES[pipeline_class(pipeline)][0]
    kwargs = {"torch_dtype": _to_dtype(torch_dtype)} if torch_dtype else {}
    return _adapter_class(family).from_pretrained(pipeline, "transformer", r_embed=r_embed,
                                                  guidance_embed=guidance_embed,
                                                  attention_backend=attention_backend, **kwargs)


def export_diffusers(backbone: nn.Module, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `backbone` (a diffusers adapter) as a diffusers transformer directory, atomically (a temporary
    sibling directory renamed into place). An existing `directory` is replaced only when it is a previous
    export of this kind and `overwrite` is set (`models.io.check_export_target`)."""
    cfg = backbone.config
    _adapter_class(cfg["type"])  # refuses the built-in MMDiT: it has no diffusers form
    check_export_target(directory, kind="diffusers export (export-diffusers)", is_same_kind=is_diffusers_export_dir,
                        overwrite=overwrite)

    def write(tmp: Path) -> None:
        backbone.model.save_pretrained(str(tmp), safe_serialization=True)
        extra = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()
                 if not k.startswith("model.")}
        if extra:
            save_file(extra, str(tmp / EMBEDDERS_FILE))
        info = {"type": cfg["type"], "r_embed": cfg.get("r_embed"), "guidance_embed": cfg.get("guidance_embed"),
                "embedders": EMBEDDERS_FILE if extra else None, "embedder_keys": sorted(extra)}
        (tmp / DISCA_FILE).write_text(json.dumps(info, indent=2))

    return replace_directory(directory, write)


def is_diffusers_export_dir(directory: Path) -> bool:
    """An `export_diffusers` directory and nothing else: disca.json, config.json, the safetensors weights
    (sharded ones with their index) and the embedders file."""
    names = {p.name for p in Path(directory).iterdir()}
    ours = {n for n in names if n in (DISCA_FILE, "config.json", EMBEDDERS_FILE)
            or (n.startswith("diffusion_pytorch_model") and n.endswith((".safetensors", ".safetensors.index.json")))}
    return DISCA_FILE in names and names == ours


def is_disca_export(directory: str | os.PathLike) -> bool:
    return (Path(directory) / DISCA_FILE).is_file() and (Path(directory) / "config.json").is_file()


def read_disca_config(directory: str | os.PathLike) -> dict:
    if not is_disca_export(directory):
        raise FileNotFoundError(f"{directory} has no {DISCA_FILE} and config.json: expected a transformer directory "
                                "written by `python -m integration export-diffusers`")
    return json.loads((Path(directory) / DISCA_FILE).read_text())


def attach_embedders(backbone: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the added embedders of an export into `backbone` (an adapter already holding the diffusers weights)."""
    info = read_disca_config(directory)
    if not info.get("embedders"):
        return backbone
    state = load_file(str(Path(directory) / info["embedders"]))
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("model.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{directory}/{info['embedders']} does not match the backbone: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    backbone.load_state_dict(state, strict=False)
    return backbone


def wrap_diffusers(model: nn.Module, directory: str | os.PathLike, attention_backend: str = "sdpa") -> nn.Module:
    """An adapter around an already loaded diffusers transformer `model` (e.g. `pipe.transformer`) with the
    added embedders of the export at `directory` (no copy of the diffusers weights is made)."""
    info = read_disca_config(directory)
    backbone = _adapter_class(info["type"])(model, r_embed=info.get("r_embed"),
                                            guidance_embed=info.get("guidance_embed") or None,
                                            attention_backend=attention_backend)
    return attach_embedders(backbone, directory)


def load_diffusers_export(directory: str | os.PathLike, torch_dtype: str | None = None,
                          attention_backend: str = "sdpa") -> nn.Module:
    """Rebuild the backbone of an `export_diffusers` directory."""
    info = read_disca_config(directory)
    kwargs = {"torch_dtype": _to_dtype(torch_dtype)} if torch_dtype else {}
    backbone = _adapter_class(info["type"]).from_pretrained(directory, None, r_embed=info.get("r_embed"),
                                                            guidance_embed=info.get("guidance_embed") or None,
                                                            attention_backend=attention_backend, **kwargs)
    return attach_embedders(backbone, directory)
