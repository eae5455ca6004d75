"""TeaCache calibration (caching/teacache_calibration.py): the polynomial fit, the (x, y) pairs of a real
sampling run, and the JSON that make_cache('teacache', calibration=...) loads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caching import make_cache
from caching.teacache import rescale
from caching.teacache_calibration import (calibrate_teacache, calibration_path, collect_pairs,
                                          fit_rescale_polynomial, rowwise_relative_l1)
from models.mmdit import MMDiT
from sampling.sampler import ModelVelocity, sample, time_grid
from tests.conftest import perturb, tiny_text


@pytest.fixture(scope="module")
def student() -> MMDiT:
    torch.manual_seed(2)
    model = MMDiT(size="tiny", config={"patch_size": (1, 4, 4)})
    model.enable_guidance_embedding()
    model.enable_r_embedding("average")
    return perturb(model, seed=2).eval()


def test_fit_recovers_a_known_polynomial():
    truth = [40.0, -25.0, 6.0, 0.8, 0.01]  # highest degree first
    x = np.linspace(0.01, 0.4, 60)
    y = np.polyval(truth, x)
    np.testing.assert_allclose(fit_rescale_polynomial(x, y, degree=4), truth, rtol=1e-6, atol=1e-8)
    noisy = y + np.random.default_rng(0).normal(0, 1e-4, x.shape)
    fit = fit_rescale_polynomial(x, noisy, degree=4)
    assert max(abs(rescale(fit, v) - np.polyval(truth, v)) for v in x) < 1e-3  # rescale == numpy.polyval
    np.testing.assert_allclose(fit_rescale_polynomial(x, 3 * x + 1, degree=1), [3.0, 1.0], atol=1e-10)
    with pytest.raises(ValueError, match="more than 4 distinct x values"):
        fit_rescale_polynomial([0.1, 0.2, 0.2, 0.3], [1, 2, 2, 3], degree=4)
    with pytest.raises(ValueError, match="degree must be an integer >= 1"):
        fit_rescale_polynomial(x, y, degree=0)
    with pytest.raises(ValueError, match="non-finite"):
        fit_rescale_polynomial([0.1, float("nan"), 0.3], [1, 2, 3], degree=1)


def test_pairs_are_the_relative_changes_of_a_full_run(student):
    text, steps = tiny_text(2, 5), 5
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    grid = time_grid(steps)
    x, y = collect_pairs(student, text, noise, grid, mode="plain", guidance=3.0)
    assert x.shape == y.shape == ((steps - 1) * 2,)
    # y independently: in 'plain' mode the sampler's velocity is the raw model output
    velocity, outputs = ModelVelocity(student, text, mode="plain", guidance=3.0), []

    def recording(xt, t, r, step):
        outputs.append(velocity(xt, t, r, step))
        return outputs[-1]

    sample(recording, noise, grid)
    expected = torch.cat([rowwise_relative_l1(outputs[i], outputs[i - 1]) for i in range(1, steps)])
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-6)
    assert (x > 0).all() and (y > 0).all()


def test_calibration_writes_a_json_that_make_cache_loads(student, tmp_path):
    teacher = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4)}), seed=3).eval()
    text, null = tiny_text(2, 5), tiny_text(1, 3, seed=5)
    noise = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    result = calibrate_teacache(teacher, text, noise, num_steps=6, mode="cfg", cfg_scale=4.0, null_text=null, degree=2)
    assert result.num_points == 5 * 4  # 5 transitions x (2 cond + 2 uncond rows)
    assert len(result.coefficients) == 3 and np.isfinite(result.coefficients).all()
    path = result.save(calibration_path(tmp_path, "cfg", 6))
    assert path.name == "teacache_cfg_6.json"
    saved = json.loads(path.read_text())
    assert saved["num_steps"] == 6 and saved["mode"] == "cfg" and saved["degree"] == 2
    cache = make_cache("teacache", num_steps=6, threshold=0.1, calibration=str(path))
    assert cache.coefficients == result.coefficients
    out = sample(ModelVelocity(teacher, text, mode="cfg", cfg_scale=4.0, null_text=null, hook=cache), noise,
                 time_grid(6))
    assert torch.isfinite(out).all() and cache.full_steps[0] == 0 and cache.full_steps[-1] == 5
    with pytest.raises(ValueError, match="calibrated for num_steps=6"):
        make_cache("teacache", num_steps=10, threshold=0.1, calibration=str(path))
    # distilled models: the meanflow sampler calibrates the same way
    mf = calibrate_teacache(student, text, noise, num_steps=4, mode="meanflow", guidance=3.0, degree=1)
    assert mf.num_points == 3 * 2 and mf.guidance == 3.0
