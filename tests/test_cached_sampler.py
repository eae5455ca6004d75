"""DisCa cached sampling (sampling/cached.py): schedules, NFE accounting, exactness, one-tensor cache."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from models.mmdit import MMDiT
from models.predictor import PREDICTOR_PRESETS, Predictor, ReusePredictor
from models.protocol import TextCond
from sampling.cached import (OFFICIAL_HUNYUAN_SCHEDULE, PAPER_FULL_COUNTS, SCHEDULE_PRESETS, CachedVelocity,
                             check_schedule, paper_schedule, schedule_from_interval)
from sampling.sampler import ModelVelocity, sample, time_grid

TINY = {"guidance_embed": True, "r_embed": "average", "text_dim": 16, "pooled_dim": 8, "patch_size": [1, 4, 4]}


@pytest.fixture(scope="module")
def model() -> MMDiT:
    torch.manual_seed(0)
    m = MMDiT(size="tiny", config=TINY)
    gen = torch.Generator().manual_seed(0)
    for p in m.parameters():  # adaLN-Zero init outputs zeros: perturb
        p.data.normal_(0, 0.05, generator=gen)
    return m.requires_grad_(False).eval()


@pytest.fixture(scope="module")
def text() -> TextCond:
    gen = torch.Generator().manual_seed(3)
    return TextCond(torch.randn(2, 5, 16, generator=gen), torch.ones(2, 5, dtype=torch.bool),
                    torch.randn(2, 8, generator=gen))


def noise() -> Tensor:
    return torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(7))


class FullModelPredictor(torch.nn.Module):
    """A 'predictor' that ignores the cache and runs the full model: the cached sampler must then be exact."""

    def forward(self, backbone, x, t, r, text, cache, guidance):
        return backbone.run(x, t, text, r, guidance).velocity


# --- schedules --------------------------------------------------------------------------------------
def test_rule_reproduces_the_official_list_and_the_papers_counts():
    assert schedule_from_interval(20, 4, warmup=3) == list(OFFICIAL_HUNYUAN_SCHEDULE)
    assert SCHEDULE_PRESETS["official_hunyuan"] == [0, 1, 2, 5, 9, 13, 17, 19]
    for n, full in PAPER_FULL_COUNTS.items():  # appendix 6.3: N=2 13/7, N=3 11/9, N=4 8/12
        steps = paper_schedule(n)
        assert len(steps) == full and 20 - len(steps) == {2: 7, 3: 9, 4: 12}[n]
        assert SCHEDULE_PRESETS[f"disca_n{n}"] == steps
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        assert max(gaps) == n and steps[0] == 0 and steps[-1] == 19  # N = the maximum cache interval


def test_rule_edge_cases():
    assert schedule_from_interval(5, 1, warmup=1) == [0, 1, 2, 3, 4]  # N = 1: no caching
    assert schedule_from_interval(1, 4, warmup=1) == [0]
    assert schedule_from_interval(10, 100, warmup=1) == [0, 1, 9]
    for bad in [dict(num_steps=0, interval=2, warmup=1), dict(num_steps=5, interval=0, warmup=1),
                dict(num_steps=5, interval=2, warmup=0)]:
        with pytest.raises(ValueError):
            schedule_from_interval(**bad)
    with pytest.raises(ValueError, match="N in"):
        paper_schedule(5)


def test_check_schedule():
    assert check_schedule((0, 3, 5), num_steps=6) == [0, 3, 5]
    with pytest.raises(ValueError, match="start with full step 0"):
        check_schedule([1, 2])
    with pytest.raises(ValueError, match="ascending"):
        check_schedule([0, 3, 3])
    with pytest.raises(ValueError, match="out of range"):
        check_schedule([0, 20], num_steps=20)


# --- the sampler ------------------------------------------------------------------------------------
def test_with_a_full_model_predictor_it_reproduces_the_meanflow_sampler(model, text):
    grid = time_grid(20, shift=3.0)
    ref_v = ModelVelocity(model, text, mode="meanflow", guidance=4.0)
    reference = sample(ref_v, noise(), grid)
    cached_v = CachedVelocity(model, FullModelPredictor(), text, SCHEDULE_PRESETS["official_hunyuan"], guidance=4.0,
                              num_steps=20)
    out = sample(cached_v, noise(), grid)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert ref_v.nfe == 20
    assert cached_v.nfe == 8 and cached_v.predictor_calls == 12  # full-model calls of the predictor are not NFE


@pytest.mark.parametrize("n", [2, 3, 4])
def test_nfe_counts_equal_the_schedule(model, text, n):
    schedule = paper_schedule(n)
    pred = Predictor(model, **PREDICTOR_PRESETS["tiny"])
    v = CachedVelocity(model, pred, text, schedule, guidance=4.0)
    out = sample(v, noise(), time_grid(20))
    assert torch.isfinite(out).all()
    assert v.nfe == len(schedule) == PAPER_FULL_COUNTS[n] and v.predictor_calls == 20 - len(schedule)


def test_the_cache_is_exactly_one_tensor_refreshed_on_full_steps(model, text):
    schedule = [0, 1, 4]
    v = CachedVelocity(model, ReusePredictor(), text, schedule, guidance=4.0)
    seen = []

    class Recording:
        nfe = 0.0

        def __call__(self, x, t, r, step):
            out = v(x, t, r, step)
            seen.append(v.cache)
            return out

    sample(Recording(), noise(), time_grid(6))
    held = [k for k, val in vars(v).items() if isinstance(val, Tensor)]
    assert held == ["cache"]  # nothing else tensor-valued is kept between steps
    assert v.cache.shape == (2, 2 * 2 * 2 + 5, model.hidden_size)  # final hidden state: image + text tokens
    assert v.cache_bytes() == 2 * 13 * 32 * 4
    ids = [id(c) for c in seen]
    assert ids[1] != ids[0] and ids[2] == ids[3] == ids[1] and ids[4] != ids[3] and ids[5] == ids[4]


def test_reuse_ablation_is_head_of_cache(model, text):
    """At a cached step the training-free ablation returns head(C, vec(t, r)): with C from the same input and
    times it is the full model's output exactly."""
    x = noise()
    t, r = torch.tensor(0.6), torch.tensor(0.5)
    v = CachedVelocity(model, ReusePredictor(), text, [0], guidance=4.0)
    full = v(x, t, r, 0)
    torch.testing.assert_close(v(x, t, r, 1), full, rtol=0, atol=0)
    assert v.nfe == 1 and v.predictor_calls == 1


def test_plain_mode_passes_no_r(model, text):
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, backbone, x, t, r, text, cache, guidance):
            calls.append(r)
            return torch.zeros_like(x)

    v = CachedVelocity(model, Spy(), text, [0], guidance=4.0, mode="plain")
    sample(v, noise(), time_grid(2))
    assert calls == [None]
    with pytest.raises(ValueError, match="mode"):
        CachedVelocity(model, Spy(), text, [0], mode="cfg")
