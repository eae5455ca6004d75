"""Shared tiny fixtures: seeded tiny backbones with perturbed weights and tiny text conditions."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is fastest and robust to a busy machine

from models.mmdit import MMDiT  # noqa: E402
from models.protocol import TextCond  # noqa: E402


def perturb(module: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers (adaLN-Zero, output head) random values so outputs are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_text(batch: int = 2, length: int = 5, dim: int = 384, seed: int = 0) -> TextCond:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length - 2:] = False  # one padded prompt
    return TextCond(torch.randn(batch, length, dim, generator=gen), mask, torch.randn(batch, dim, generator=gen))


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one intra-op thread (tiny tensors: more threads only add contention on a
    busy 2-core machine), and a test that changes the count cannot leak it into the next one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_mmdit() -> MMDiT:
    torch.manual_seed(0)
    return perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4)})).eval()


@pytest.fixture
def tiny_video() -> torch.Tensor:
    return torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
