"""Build backbones from a config dict and save/load them as safetensors + JSON config.

An export directory holds `model.safetensors` and `config.json` ({"type": ..., ...}). Later
stages load the previous stage's export by path. Nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from safetensors import safe_open
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


def check_writable(directory: str | os.PathLike, setting: str) -> Path:
    """Create `directory` and write (then delete) a probe file there, so that an unwritable output directory
    fails before any work whose result would go there, naming the `setting` that chose it."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"{setting} {str(path)!r} is not writable ({err.strerror or err}); fix its permissions "
                              f"or choose another {setting}") from err
    return path


def _overlaps(a: Path, b: Path) -> bool:
    """`a` is `b`, contains it, or is inside it."""
    return a == b or a in b.parents or b in a.parents


def check_export_target(out: str | os.PathLike, *, kind: str, is_same_kind: Callable[[Path], bool],
                        overwrite: bool, sources: tuple = (), flag: str = "--out", label: str | None = None) -> Path:
    """Refuse an output directory a writer would replace when it is not its own earlier output: one that is,
    contains or is inside a source it reads; an existing directory that is not a previous `kind` export
    (`is_same_kind`); a previous one without `overwrite`. Nothing is written or deleted here. `label` names
    the directory in the messages (default: `flag out`)."""
    label = label or f"{flag} {out}"
    target = Path(out).resolve()
    for source in sources:
        src = Path(source).resolve()
        if _overlaps(target, src):
            how = "is" if target == src else ("contains" if target in src.parents else "is inside")
            raise ValueError(f"{label} {how} the source {source}: writing there would delete what it reads; "
                             f"choose a {flag} outside it")
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        if not target.is_dir() or not is_same_kind(target):
            raise FileExistsError(f"{label} exists and is not a previous {kind} (its files would be deleted); "
                                  f"choose another {flag} or remove it yourself")
        if not overwrite:
            raise FileExistsError(f"{label} holds a previous {kind}; pass --overwrite to replace it, or choose "
                                  f"another {flag}")
    return target


def replace_directory(directory: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Fill a temporary sibling of `directory` with `write(tmp)`, then rename it into place: a kill leaves
    the old directory (or, between the two renames, `.<name>.old`) and never a half-written one. The caller
    has checked that replacing `directory` is allowed (`check_export_target`)."""
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    os.chmod(tmp, file_mode() | 0o111)  # a normal directory (mkdtemp makes it 0700)
    old = out.with_name(f".{out.name}.old")
    try:
        write(tmp)
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_config_files(argv: list[str]) -> None:
    """Parse every `--config FILE` of a command line as YAML first, so that a syntax error names the file
    (jsonargparse parses the file's text and reports `in "<unicode string>"`)."""
    import yaml

    paths = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            continue  # jsonargparse names a missing file itself
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ValueError(f"--config {path}: YAML syntax error{at}: {problem}; fix the file") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"--config {path} is not a text (UTF-8) YAML file: {err}") from None


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


def _check_keys(path: Path, module: nn.Module, found: dict[str, tuple]) -> None:
    """Fail clearly on missing, unexpected or misshapen keys of the file `path` (`found`: name -> shape)
    against `module`'s state dict."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else "",
            ", ".join(f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}" for k in wrong[:5]),
        ]))
        raise ValueError(f"checkpoint {path} does not match the model config: {detail}")


def _file_shapes(f) -> dict[str, list[int]]:
    """Name -> shape of every tensor of an open `safe_open` file, without reading any."""
    return {k: f.get_slice(k).get_shape() for k in f.keys()}


def weights_path(directory: str | os.PathLike) -> Path:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    return path


def load_state(module: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load `model.safetensors` into `module`, failing clearly on missing, unexpected or misshapen keys.
    A deferred `module` (parameters on the meta device) only checks the file and records it as the source
    of those parameters (`distributed.zero_init.materialize` reads them)."""
    path = weights_path(directory)
    if DEFERRED_INIT in module.__dict__ or DEFERRED_WEIGHTS in module.__dict__:
        with safe_open(str(path), framework="pt") as f:
            _check_keys(path, module, _file_shapes(f))
        module.__dict__[DEFERRED_WEIGHTS] = str(path)
        return module
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"cannot read {path}: {err}") from err
    _check_keys(path, module, {k: v.shape for k, v in state.items()})
    module.load_state_dict(state)
    return module


_DEFERRED = contextvars.ContextVar("deferred_loading", default=False)
DEFERRED_WEIGHTS = "deferred_weights"  # attribute of a deferred backbone: the safetensors file of its meta parameters
DEFERRED_INIT = "deferred_init"  # attribute of a deferred random backbone: (class, args, kwargs, CPU RNG state)


@contextlib.contextmanager
def deferred_loading(enabled: bool = True) -> Iterator[None]:
    """Inside this context `load_backbone` returns deferred backbones (see `load_backbone_deferred`).
    train.py enables it while it builds a stage that will run under DeepSpeed ZeRO-3."""
    token = _DEFERRED.set(enabled)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def defer_init(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """`cls(*args, **kwargs)`; inside `deferred_loading()` with its parameters on the meta device instead,
    and the call and the global CPU RNG state recorded so that `distributed.zero_init.materialize` replays
    it partitioned, to the same values (train.py instantiates `models.mmdit.MMDiT` through this)."""
    if not _DEFERRED.get():
        return cls(*args, **kwargs)
    from accelerate import init_empty_weights

    rng = torch.get_rng_state()
    with init_empty_weights(include_buffers=False):
        module = cls(*args, **kwargs)
    module.__dict__[DEFERRED_INIT] = (cls, args, kwargs, rng)
    return module


def load_backbone(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a backbone from `config.json` and load its safetensors weights (deferred inside
    `deferred_loading()`)."""
    if _DEFERRED.get():
        return load_backbone_deferred(directory)
    with torch.random.fork_rng(devices=[]):  # the throw-away random init must not move the global RNG: layers a
        model = build_backbone(read_config(directory))  # stage draws after loading get the same values as when deferred
    return load_state(model, directory).to(map_location)


def load_backbone_deferred(directory: str | os.PathLike) -> nn.Module:
    """A backbone whose transformer blocks (`shard_blocks()`, nearly all of its weights) are on the meta
    device, holding no memory, and whose other parameters and buffers (embedders, head: small) are loaded.
    The file is recorded in `deferred_weights`; `distributed.zero_init.materialize` later builds the
    network partitioned under `deepspeed.zero.Init` and reads each rank's slice of every tensor from it.
    Copies (`copy.deepcopy`) stay deferred, and methods that read only the loaded parts work on it (the
    stages' `enable_guidance_embedding` / `enable_r_embedding` read the timestep embedder). A backbone
    without per-block units is loaded eagerly."""
    from accelerate import init_empty_weights

    config = read_config(directory)
    path = weights_path(directory)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (e.g. RoPE tables) computed
        model = build_backbone(config)
    blocks = list(model.shard_blocks()) if hasattr(model, "shard_blocks") else []
    if not blocks:
        with deferred_loading(False):
            return load_backbone(directory)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    try:
        with safe_open(str(path), framework="pt") as f:
            _check_keys(path, model, _file_shapes(f))
            persistent_buffers = [(n, b) for n, b in model.named_buffers() if n in f.keys()]
            for name, tensor in [*model.named_parameters(), *persistent_buffers]:
                if id(tensor) not in in_blocks:
                    _replace_tensor(model, name, f.get_tensor(name))
    except ValueError:
        raise
    except Exception as err:  # safetensors' own error types for corrupt files
        raise ValueError(f"cannot read {path}: {err}") from err
    model.__dict__[DEFERRED_WEIGHTS] = str(path)
    return model


def _replace_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter or buffer `name`, keeping requires_grad."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value
