"""Build backbones from a config dict and save/load them as safetensors + JSON config.

An export directory holds `model.safetensors` and `config.json` ({"type": ..., ...}). Later
stages load the previous stage's export by path. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from safetensors.torch import load_file, save
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _build_mmdit(cfg: dict) -> nn.Module:
    from models.mmdit import MMDiT

    return MMDiT(config=cfg)


def _build_hunyuan(cfg: dict) -> nn.Module:
    from models.hunyuan_video import HunyuanVideoBackbone

    return HunyuanVideoBackbone.from_config(cfg)


def _build_wan(cfg: dict) -> nn.Module:
    from models.wan import WanBackbone

    return WanBackbone.from_config(cfg)


BACKBONE_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "mmdit": _build_mmdit,
    "hunyuan_video": _build_hunyuan,
    "wan": _build_wan,
}


def build_backbone(config: dict) -> nn.Module:
    """Instantiate a backbone (random weights) from its config dict."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind not in BACKBONE_BUILDERS:
        raise ValueError(f"backbone config 'type' is {kind!r}; expected one of {sorted(BACKBONE_BUILDERS)}")
    return BACKBONE_BUILDERS[kind](cfg)


def file_mode() -> int:
    """0o666 minus the process umask: what `open()` would give a new file (exports, checkpoints and
    shards are meant to be shared; `mkstemp` alone would leave them 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def remove_partial_files(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that a process killed while writing `path` left next to it."""
    path = Path(path)
    orphans = list(path.parent.glob(f".{path.name}.*.partial")) if path.parent.is_dir() else []
    for orphan in orphans:
        orphan.unlink(missing_ok=True)
    return orphans


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (bytes, or a function writing to a binary file) to `path` so that a crash or SIGKILL
    at any moment leaves either the old file or the complete new one, never a partial one.

    The temporary file `.<name>.<random>.partial` lives in `path`'s own directory (a rename across
    filesystems, e.g. from a tmpfs `$TMPDIR`, is a copy over the old file), is flushed and fsynced,
    renamed with `os.replace`, and the directory is fsynced. It gets the permissions `open()` would give
    (0666 minus umask), not mkstemp's 0600. A temporary file left by a kill is deleted by the next write
    of the same target (and when a checkpoint is resumed). Every writer of checkpoints, exports and
    dataset shards goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_partial_files(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> Path:
    return atomic_write(path, json.dumps(obj, indent=indent, default=list).encode())


def save_module(module: nn.Module, directory: str | os.PathLike, config: dict,
                state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `module`'s state dict (or `state`, e.g. gathered from a sharded module) as safetensors and
    `config` as JSON, each atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = module.state_dict() if state is None else state
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(out / WEIGHTS_NAME, save(state))
    atomic_write_json(out / CONFIG_NAME, config)
    return out


def save_backbone(model: nn.Module, directory: str | os.PathLike) -> Path:
    return save_module(model, directory, model.config)


def read_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in export directory {str(d)!r}: is this a model export?")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from err


def load_state(module: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load `model.safetensors` into `module`, failing clearly on missing, unexpected or misshapen keys."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path}: {err}") from err
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
            ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:5]),
        ]))
        raise ValueError(f"checkpoint {path} does not match the model config: {detail}")
    module.load_state_dict(state)
    return module


def load_backbone(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a backbone from `config.json` and load its safetensors weights."""
    model = build_backbone(read_config(directory))
    return load_state(model, directory).to(map_location)
