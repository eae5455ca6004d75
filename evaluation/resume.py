"""Per-method results kept on disk, so that an interrupted evaluation resumes where it stopped.

A full evaluation (`make reproduce`: 520 prompts x 2 seeds, some 30 methods) samples for hours; the
expensive part of each method (sampling every video, counting its cost, timing it against the
reference) is written to `<output_dir>/partial/<method>.safetensors` as soon as it is done: the videos
(float32, exactly as sampled) plus, in the file's metadata, the measured costs and a fingerprint of
everything they depend on. A later run of the same evaluation takes a method's file instead of
sampling again only when the fingerprint is equal; the scores are then computed from the stored videos
exactly as from fresh ones, so a resumed evaluation writes the same numbers as an uninterrupted one.

The fingerprint covers the method's spec and the reference's (the timing is a ratio to it), the
prompt set's tensors (data, prompts, seeds, noise), the export files behind both (name, size and
modification time: a retrained or re-exported model is never mistaken for the old one) and the source
of the code that samples (`SAMPLING_CODE`: models, samplers, caches, data, the diffusers integration,
`evaluation/methods.py` and `efficiency.py`). A file
whose fingerprint differs is stale: it is named in the log and recomputed, never reused.

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
FORMAT = 2
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


def export_signature(path: str | None) -> list | str | None:
    """(relative name, size, mtime_ns) of every file under an export directory; the string itself for
    what is not a directory ('random:tiny', 'reuse', None)."""
    if path is None or not Path(path).is_dir():
        return path
    root = Path(path)
    return [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.is_file()]


COSMETIC_FIELDS = ("name", "label", "train_config", "predictor_train_config", "ablation")
"""MethodSpec fields that name or document a method but do not change what it samples"""


def _spec_entry(spec: MethodSpec) -> dict:
    sampling = {k: v for k, v in asdict(spec).items() if k not in COSMETIC_FIELDS}
    return {"spec": sampling, "model": export_signature(spec.model), "predictor": export_signature(spec.predictor)}


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
                return f.get_tensor("videos"), record
        except (OSError, KeyError, ValueError, SafetensorError) as err:  # unreadable: recompute, say why
            if not quiet:
                self.log(f"{name}: stored result {path} cannot be read ({err}): not used")
            return None

    def save(self, name: str, fingerprint: str, videos: Tensor, record: dict) -> Path:
        """Write atomically (a kill leaves the old file or the new one, never a partial one)."""
        if set(record) != RECORD_KEYS:
            raise ValueError(f"{name}: record keys {sorted(record)}, expected {sorted(RECORD_KEYS)}")
        data = save({"videos": videos.detach().float().cpu().contiguous()},
                    metadata={"fingerprint": fingerprint, "record": json.dumps(record)})
        return atomic_write(self.path(name), data)
