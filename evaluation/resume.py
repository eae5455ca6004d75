"""Per-method results kept on disk, so that an interrupted evaluation resumes where it stopped.

A full evaluation (`make reproduce`: 520 prompts x 2 seeds, some 30 methods) samples for hours; the
expensive part of each method (sampling every video, counting its cost, timing it against the
reference) is written to `<output_dir>/partial/<method>.safetensors` as soon as it is done: the videos
(float32, exactly as sampled) plus, in the file's metadata, the measured costs and a fingerprint of
everything they depend on. A later run of the same evaluation takes a method's file instead of
sampling again only when the fingerprint is equal; the scores are then computed from the stored videos
exactly as from fresh ones, so a resumed evaluation writes the same numbers as an uninterrupted one.

The fingerprint covers the method's spec and the reference's (the timing is a ratio to it), the
prompt set's tensors (data, prompts, seeds, noise), every file a method reads besides them: the export
files behind both (name, size, modification time and a sha256 of the contents) and any file its cache
settings name (a TeaCache calibration, wherever it lives), and the source of the code that samples
(`SAMPLING_CODE`: models, samplers, caches, data, the diffusers integration, `evaluation/methods.py` and
`efficiency.py`). A file whose fingerprint differs is stale: it is named in the log and recomputed, never
reused. The stored videos carry a sha256 of their bytes, checked when they are read: a damaged file is
named in the log and recomputed too.

Names and labels are not part of the fingerprint, so an evaluation may also take a method from another
evaluation's store (`reuse_from` in evaluate.py) when it samples the same thing: `make reproduce`'s Figure-1
evaluation takes the teacher and the 20-step distilled model from the main evaluation instead of sampling
their 1,040 videos again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor

from evaluation.methods import MethodSpec, PromptSet
from models.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
SAMPLING_CODE = ("models", "sampling", "caching", "datamodules", "integration", "evaluation/methods.py",
                 "evaluation/efficiency.py")
"""the sources whose change makes stored videos and costs stale (relative to the repository root)"""
FORMAT = 3
"""layout of the stored record; bump it when RECORD_KEYS or their meaning change"""
RECORD_KEYS = frozenset({"efficiency", "method_s", "reference_s", "seconds"})
"""what evaluate.py stores per method: Efficiency fields, interleaved method / reference seconds, and the
wall seconds of sampling, counting and timing the method"""


def code_digest(root: Path = ROOT, sources: tuple[str, ...] = SAMPLING_CODE) -> str:
    """sha256 over the Python files that sample and measure (path and content, in sorted order)."""
    digest = hashlib.sha256()
    for source in sources:
        path = root / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def prompt_digest(prompts: PromptSet) -> str:
    """sha256 over the prompt set's tensors: text, labels, noise and real videos."""
    digest = hashlib.sha256()
    tensors = [prompts.text.tokens, prompts.text.mask, prompts.text.pooled, prompts.noise, prompts.real,
               prompts.null_text.tokens, prompts.null_text.mask, prompts.null_text.pooled,
               *(prompts.labels[k] for k in sorted(prompts.labels))]
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, computed once per (path, inode, size, mtime, ctime) in a process (a 26 GB
    export is read once per evaluation, not once per method; any write changes the ctime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def export_signature(path: str | None) -> list | str | None:
    """(relative name, size, mtime_ns, sha256) of every file under an export directory, or of the file
    itself; the string itself for what is neither ('random:tiny', 'reuse', None)."""
    if path is None or not Path(path).exists():
        return path
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    return [[f.name if f == root else str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns, file_digest(f)]
            for f in files]


def read_files(kwargs: dict) -> dict:
    """The signature of every existing file or directory named by a string in a method's cache settings (a
    TeaCache `calibration`, ...): what the method reads besides its exports."""
    return {k: export_signature(v) for k, v in sorted(kwargs.items()) if isinstance(v, str) and Path(v).exists()}


def videos_digest(videos: Tensor) -> str:
    return hashlib.sha256(videos.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


COSMETIC_FIELDS = ("name", "label", "train_config", "predictor_train_config", "ablation")
"""MethodSpec fields that name or document a method but do not change what it samples"""


def _spec_entry(spec: MethodSpec) -> dict:
    sampling = {k: v for k, v in asdict(spec).items() if k not in COSMETIC_FIELDS}
    return {"spec": sampling, "model": export_signature(spec.model), "predictor": export_signature(spec.predictor),
            "reads": read_files(spec.cache_kwargs)}


def fingerprint(spec: MethodSpec, reference: MethodSpec, context: dict) -> str:
    """What the stored result of `spec` depends on; `context` holds the run's settings that change it
    (prompt digest, device, timing, batch sizes, model seed, code digest). Names and labels are left out
    (COSMETIC_FIELDS), so the same sampler under another name in another evaluation has the same one."""
    payload = {"format": FORMAT, "method": _spec_entry(spec), "reference": _spec_entry(reference),
               "context": context}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class MethodResults:
    """`<directory>/<method>.safetensors`: one method's videos and measured costs (see the module doc)."""

    def __init__(self, directory: str | Path, log: Callable[[str], object] = print,
                 others: list[str | Path] = ()):
        """`others`: stores of other evaluations (their `partial/` directories) to take a method from when
        this store lacks it and theirs has the same fingerprint (under any name)."""
        self.directory = Path(directory)
        self.log = log
        self.others = [Path(o) for o in others]

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.safetensors"

    def load(self, name: str, fingerprint: str) -> tuple[Tensor, dict] | None:
        """(videos, record) stored for `name` under this fingerprint, else one of `others` with the same
        fingerprint (copied into this store), else None (a stale or unreadable file is logged)."""
        found = self._read(name, self.path(name), fingerprint) if self.path(name).is_file() else None
        if found is not None:
            return found
        for other in self.others:  # other evaluations' files are mostly other methods: no log for those
            for path in sorted(other.glob("*.safetensors")):
                found = self._read(name, path, fingerprint, quiet=True)
                if found is not None:
                    self.log(f"{name}: the same sampling was stored by another evaluation, taken from {path}")
                    self.save(name, fingerprint, *found)
                    return found
        return None

    def _read(self, name: str, path: Path, fingerprint: str, quiet: bool = False) -> tuple[Tensor, dict] | None:
        """The file's (videos, record) if it holds this fingerprint in the current layout, else None (logged
        with the reason unless `quiet`)."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fingerprint:
                    if not quiet:
                        self.log(f"{name}: stored result {path} is stale (its method, reference, prompts, exports "
                                 "or sampling code changed): not used")
                    return None
                record = json.loads(meta["record"])
                if set(record) != RECORD_KEYS:
                    raise ValueError(f"record keys {sorted(record)}, expected {sorted(RECORD_KEYS)}")
                videos = f.get_tensor("videos")
            if videos_digest(videos) != meta.get("videos_sha256"):
                if not quiet:
                    self.log(f"{name}: stored result {path} is damaged (its videos do not match their sha256): "
                             "not used")
                return None
            return videos, record
        except (OSError, KeyError, ValueError, SafetensorError) as err:  # unreadable: recompute, say why
            if not quiet:
                self.log(f"{name}: stored result {path} cannot be read ({err}): not used")
            return None

    def save(self, name: str, fingerprint: str, videos: Tensor, record: dict) -> Path:
        """Write atomically (a kill leaves the old file or the new one, never a partial one)."""
        if set(record) != RECORD_KEYS:
            raise ValueError(f"{name}: record keys {sorted(record)}, expected {sorted(RECORD_KEYS)}")
        videos = videos.detach().float().cpu().contiguous()
        data = save({"videos": videos}, metadata={"fingerprint": fingerprint, "record": json.dumps(record),
                                                  "videos_sha256": videos_digest(videos)})
        return atomic_write(self.path(name), data)
