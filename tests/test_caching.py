"""Training-free caches (caching/): exactness at interval 1, schedules and NFE, FLOPs, bytes held,
the Taylor forecast, parameter errors, and the diffusers HunyuanVideo adapter."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from caching import CACHE_METHODS, cache_cost, flop_counter, make_cache, measure_call_flops
from caching.taylorseer import taylor_forecast, update_taylor_factors
from models.hunyuan_video import HunyuanVideoBackbone
from models.mmdit import MMDiT
from models.protocol import PLAIN, FeatureHook
from sampling.sampler import ModelVelocity, sample, time_grid
from tests.conftest import perturb, tiny_text

MODES = ("cfg", "plain", "meanflow")
STEPS = 7  # uniform grid: t = 1, .857, .714, .571, .429, .286, .143
# interval 1 / threshold 0: every method must compute every step
EXACT = {"none": {}, "fora": dict(interval=1), "delta_dit": dict(interval=1), "pab": dict(interval=1),
         "teacache": dict(threshold=0.0, coefficients=[1.0, 0.0]), "taylorseer": dict(interval=1)}
# interval 3 on 7 steps (tiny MMDiT: 1 double + 1 single block = 4 block units per call)
CACHED = {"none": {}, "fora": dict(interval=3), "delta_dit": dict(interval=3),
          "pab": dict(interval=3, t_range=(0.5, 0.9)), "teacache": dict(threshold=1e9, coefficients=[1.0, 0.0]),
          "taylorseer": dict(interval=3, warmup=2)}
EXPECTED_FULL_STEPS = {"none": (0, 1, 2, 3, 4, 5, 6), "fora": (0, 3, 6), "delta_dit": (0, 3, 6),
                       "pab": (0, 3, 4, 5, 6),  # t = .857 and .714 in range reuse attention; t < .5 always computes
                       "teacache": (0, 6), "taylorseer": (0, 1, 4)}
EXPECTED_COMPUTED_UNITS = {"none": 28, "fora": 12, "delta_dit": 3 * 4 + 4 * 2, "pab": 28 - 2 * 2, "teacache": 8,
                           "taylorseer": 12}


@pytest.fixture(scope="module")
def models() -> dict[str, MMDiT]:
    torch.manual_seed(0)
    teacher = perturb(MMDiT(size="tiny", config={"patch_size": (1, 4, 4)})).eval()
    torch.manual_seed(1)
    student = MMDiT(size="tiny", config={"patch_size": (1, 4, 4)})
    student.enable_guidance_embedding()
    student.enable_r_embedding("sum")
    return {"teacher": teacher, "student": perturb(student, seed=1).eval()}


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))  # 8 image tokens


TEXT, NULL = tiny_text(2, 5), tiny_text(1, 3, seed=5)


def velocity(models: dict, mode: str, hook) -> ModelVelocity:
    if mode == "cfg":
        return ModelVelocity(models["teacher"], TEXT, mode="cfg", cfg_scale=4.0, null_text=NULL, hook=hook)
    return ModelVelocity(models["student"], TEXT, mode=mode, guidance=4.0, hook=hook)


def run(models: dict, mode: str, noise: torch.Tensor, name: str | None, **kwargs):
    """Sample with cache `name` (None: the plain hook, no cache at all)."""
    hook = make_cache(name, num_steps=STEPS, count_flops=False, **kwargs) if name else PLAIN
    vel = velocity(models, mode, hook)
    return sample(vel, noise, time_grid(STEPS)), hook, vel


@pytest.mark.parametrize("mode", MODES)
def test_interval_one_reproduces_the_plain_sampler(models, noise, mode):
    reference, _, _ = run(models, mode, noise, None)
    for name, kwargs in EXACT.items():
        out, hook, vel = run(models, mode, noise, name, **kwargs)
        assert torch.equal(out, reference), name
        assert hook.full_steps == list(range(STEPS)), name
        assert cache_cost(hook, vel).nfe == vel.nfe == STEPS * (2 if mode == "cfg" else 1)


@pytest.mark.parametrize("mode", ["cfg", "meanflow"])
def test_schedules_and_effective_nfe(models, noise, mode):
    per_call = 2.0 if mode == "cfg" else 1.0
    reference, _, _ = run(models, mode, noise, None)
    for name, kwargs in CACHED.items():
        out, hook, vel = run(models, mode, noise, name, **kwargs)
        units = hook.units_per_call
        assert units == 2 * models["teacher"].num_blocks == 4
        for record in hook.records:  # every call accounts for every block unit exactly once
            assert record.computed_units + sum(hook.units(k) for k in record.reused) == units
        cost = cache_cost(hook, vel)
        assert cost.full_steps == EXPECTED_FULL_STEPS[name], name
        assert cost.nominal_nfe == vel.nfe == per_call * STEPS
        assert cost.nfe == pytest.approx(per_call * EXPECTED_COMPUTED_UNITS[name] / units), name
        if name != "none":
            assert not torch.equal(out, reference), name  # the cache really changed the computation
        again = sample(vel, noise, time_grid(STEPS))  # step 0 resets the cache: a second run is identical
        assert torch.equal(again, out) and cache_cost(hook, vel).nfe == cost.nfe, name


def test_flops_match_a_counter_around_the_whole_run(models, noise):
    grid = time_grid(STEPS)
    for name, kwargs in CACHED.items():
        hook = make_cache(name, num_steps=STEPS, **kwargs)
        vel = velocity(models, "cfg", hook)
        with flop_counter() as counter:
            out = sample(vel, noise, grid)
        if name == "none":  # counting FLOPs does not change the numbers
            assert torch.equal(out, run(models, "cfg", noise, None)[0])
        call = measure_call_flops(vel, noise, grid[0], grid[1])
        cost = cache_cost(hook, vel, call)
        assert cost.flops == counter.get_total_flops(), name
        assert cost.flops_uncached == STEPS * call
        assert vel.nfe == 2 * STEPS  # measuring the call did not count as an NFE
    assert hook.stack_flops() == hook.key_flops["blocks"] < call
    teacache = make_cache("teacache", num_steps=STEPS, **CACHED["teacache"])
    vel = velocity(models, "cfg", teacache)
    sample(vel, noise, grid)
    assert cache_cost(teacache, vel, call).flops == STEPS * call - (STEPS - 2) * teacache.key_flops["blocks"]
    assert cache_cost(teacache, vel).flops is None


def test_cache_bytes_match_the_tensors_held(models, noise):
    # independent count from the shapes: CFG batch 2B = 4, tokens = 8 image + 5 text, width 32, float32
    rows, n_img, n_txt, width = 4, 8, 5, 32
    full = rows * (n_img + n_txt) * width * 4
    leaves, attn = 4, 2  # (attn, mlp) x (double0, single0)
    expected = {"none": 0, "fora": leaves * full, "delta_dit": full, "pab": attn * full,
                "teacache": full + rows * n_img * width * 4, "taylorseer": 2 * leaves * full}  # F and D_1 per leaf
    held = {}
    for name, kwargs in CACHED.items():
        _, hook, _ = run(models, "cfg", noise, name, **kwargs)
        assert hook.cache_bytes() == hook.peak_bytes == expected[name], name
        held[name] = hook.peak_bytes
    assert min(held["fora"], held["pab"], held["taylorseer"]) > max(held["teacache"], held["delta_dit"])
    # a second-order TaylorSeer holds F, D_1, D_2 for each block update once three full steps exist
    _, hook, _ = run(models, "cfg", noise, "taylorseer", interval=2, order=2, warmup=0)
    assert hook.peak_bytes == 3 * leaves * full


# --- TaylorSeer: the forecast formula (DisCa §3.1) ------------------------------------------------
def paper_forecast(history: list[torch.Tensor], n: int, k: int, order: int) -> torch.Tensor:
    """F_pred,m(x_{t-k}) = F(x_t) + sum_i Delta^i F(x_t) / (i! N^i) (-k)^i, with history = features at
    the full steps s, s - N, s - 2N, ... and Delta^i the differences in timestep direction
    (Delta F(x_t) = F(x_{t+N}) - F(x_t), x_{t+N} being N steps earlier)."""
    diffs = [list(history)]
    for _ in range(order):
        prev = diffs[-1]
        diffs.append([prev[j + 1] - prev[j] for j in range(len(prev) - 1)])
    return history[0] + sum(diffs[i][0] / (math.factorial(i) * n ** i) * (-k) ** i for i in range(1, order + 1))


def factors_at(feature, steps: list[int], order: int) -> list[torch.Tensor]:
    factors, last = None, None
    for s in steps:
        factors = update_taylor_factors(factors, feature(s), None if last is None else s - last, order)
        last = s
    return factors


def test_taylor_forecast_matches_the_paper_and_is_exact_on_linear_features():
    a, b, c = torch.tensor([0.7, -1.3], dtype=torch.float64), torch.tensor([0.2, 0.5], dtype=torch.float64), 0.3

    def linear(s):
        return a + b * s

    def quadratic(s):
        return a + b * s + c * s ** 2

    n, steps = 3, [0, 3, 6, 9]
    for order in (1, 2):
        factors = factors_at(linear, steps, order)
        for k in (1, 2, 3, 5):
            torch.testing.assert_close(taylor_forecast(factors, k), linear(9 + k), rtol=0, atol=1e-12)
    for order in (1, 2, 3):
        factors = factors_at(quadratic, steps, order)
        history = [quadratic(s) for s in reversed(steps)]
        for k in (1, 2):
            torch.testing.assert_close(taylor_forecast(factors, k), paper_forecast(history, n, k, order),
                                       rtol=0, atol=1e-12)
    # order 2 captures a quadratic's curvature exactly; the backward-difference slope lags by N/2
    f2 = factors_at(quadratic, steps, 2)
    torch.testing.assert_close(f2[2], torch.full((2,), 2 * c, dtype=torch.float64), rtol=0, atol=1e-12)
    for k in (1, 2):
        err1 = taylor_forecast(factors_at(quadratic, steps, 1), k) - quadratic(9 + k)
        err2 = taylor_forecast(f2, k) - quadratic(9 + k)
        torch.testing.assert_close(err2, torch.full((2,), -c * n * k, dtype=torch.float64), rtol=0, atol=1e-12)
        assert (err2.abs() < err1.abs()).all()


def test_taylorseer_hook_forecasts_a_linear_feature_exactly():
    hook = make_cache("taylorseer", num_steps=12, interval=3, warmup=3)
    feature = lambda s: torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.25 * s  # noqa: E731
    computed = []
    for s in range(12):
        hook.begin_step(s, 1 - s / 12)

        def fn(s=s):
            computed.append(s)
            return feature(s)

        torch.testing.assert_close(hook.delta("double0.attn", fn), feature(s), rtol=0, atol=1e-12)
    assert computed == hook.full_steps == [0, 1, 2, 5, 8, 11]


def test_teacache_accumulates_the_rescaled_change():
    # rescale doubles the relative L1; per-step relative changes 0.05, 0.05, 0.05, 0.2, 0.01 -> rescaled 0.1, ...
    hook = make_cache("teacache", num_steps=7, threshold=0.25, coefficients=[2.0, 0.0])
    x, computed = torch.ones(3), []
    for s, change in enumerate([None, 0.05, 0.05, 0.05, 0.2, 0.01, 0.01]):
        hook.begin_step(s, 1 - s / 7)
        x = x if change is None else x * (1 + change)
        hook.observe("modulated_input", x)
        hook.delta("blocks", lambda s=s: computed.append(s) or torch.zeros(2))
    # acc: s1 0.1 skip, s2 0.2 skip, s3 0.3 compute+reset, s4 0.4 compute+reset, s5 0.02 skip, s6 last
    assert computed == [0, 3, 4, 6]


# --- errors -------------------------------------------------------------------------------------
def test_make_cache_rejects_unknown_names_and_bad_parameters():
    with pytest.raises(ValueError, match="known: \\['delta_dit', 'fora', 'none', 'pab', 'taylorseer', 'teacache'\\]"):
        make_cache("deepcache", num_steps=10)
    assert sorted(CACHE_METHODS) == ["delta_dit", "fora", "none", "pab", "taylorseer", "teacache"]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="interval must be an integer >= 1"):
            make_cache("fora", num_steps=10, interval=bad)
    with pytest.raises(ValueError, match="has no parameter.*'threshold'.*its parameters"):
        make_cache("fora", num_steps=10, threshold=0.1)
    with pytest.raises(ValueError, match="needs num_steps"):
        make_cache("fora", interval=2)
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        make_cache("none", num_steps=0)
    with pytest.raises(ValueError, match="exactly one of coefficients"):
        make_cache("teacache", num_steps=10, threshold=0.1)
    with pytest.raises(ValueError, match="exactly one of coefficients"):
        make_cache("teacache", num_steps=10, coefficients=[1.0, 0.0], calibration="x.json")
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        make_cache("teacache", num_steps=10, threshold=-0.1, coefficients=[1.0, 0.0])
    with pytest.raises(FileNotFoundError, match="calibrate_teacache"):
        make_cache("teacache", num_steps=10, calibration="/nonexistent/teacache_cfg_10.json")
    with pytest.raises(ValueError, match="t_range"):
        make_cache("pab", num_steps=10, t_range=(0.9, 0.1))
    with pytest.raises(ValueError, match="t_range"):
        make_cache("pab", num_steps=10, t_range=(0.1,))
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        make_cache("taylorseer", num_steps=10, order=0)
    with pytest.raises(ValueError, match="warmup must be an integer >= 0"):
        make_cache("taylorseer", num_steps=10, warmup=-1)


def test_hooks_refuse_misuse(models, noise):
    hook = make_cache("fora", num_steps=3)
    with pytest.raises(RuntimeError, match="before begin_step"):
        hook.delta("blocks", lambda: torch.zeros(1))
    with pytest.raises(ValueError, match="num_steps=3 but the sampler is at step 3"):
        sample(velocity(models, "cfg", hook), noise, time_grid(5))
    hook.begin_step(0, 1.0)
    hook.begin_step(1, 0.5)
    with pytest.raises(ValueError, match="steps must increase"):
        hook.begin_step(1, 0.5)
    delta_dit = make_cache("delta_dit", num_steps=4, interval=2)  # a backbone without single-stream blocks
    delta_dit.begin_step(0, 1.0)
    delta_dit.delta("blocks", lambda: torch.zeros(1))
    with pytest.raises(ValueError, match="routed no 'single_blocks'"):
        delta_dit.begin_step(1, 0.5)


# --- the diffusers HunyuanVideo adapter ---------------------------------------------------------
HV_CONFIG = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                 num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                 text_embed_dim=24, pooled_projection_dim=20, rope_axes_dim=(4, 6, 6), guidance_embeds=False)


def test_fora_on_the_hunyuan_video_adapter():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoBackbone(perturb(HunyuanVideoTransformer3DModel(**HV_CONFIG), std=0.1)).eval()
    gen = torch.Generator().manual_seed(3)
    text = tiny_text(1, 6, dim=24, seed=3)
    text = type(text)(text.tokens, text.mask, torch.randn(1, 20, generator=gen))
    noise = torch.randn(1, 4, 2, 8, 8, generator=gen)
    grid = time_grid(4)

    def go(hook):
        vel = ModelVelocity(model, text, mode="plain", hook=hook)
        return sample(vel, noise, grid), vel

    reference, _ = go(make_cache("none", num_steps=4))
    out, _ = go(make_cache("fora", num_steps=4, interval=1))
    assert torch.equal(out, reference)
    hook = make_cache("fora", num_steps=4, interval=2)
    out, vel = go(hook)
    # FORA's reference schedule: first step, then anchored to the last step (i = 3 - s, i % 2 == 0)
    assert hook.units_per_call == 2 * model.num_blocks and hook.full_steps == [0, 1, 3]
    assert cache_cost(hook, vel).nfe == 3.0 and not torch.equal(out, reference)
    # TeaCache reads the adapter's observed modulated input
    out, _ = go(make_cache("teacache", num_steps=4, threshold=0.0, coefficients=[1.0, 0.0]))
    assert torch.equal(out, reference)
    hook = make_cache("teacache", num_steps=4, threshold=1e9, coefficients=[1.0, 0.0])
    go(hook)
    assert hook.full_steps == [0, 3]


# --- what the block keys carry, and the reference schedules ---------------------------------------
class _Scale(FeatureHook):
    """Multiplies the given keys' outputs by 2."""

    def __init__(self, keys):
        self.keys = set(keys)

    def delta(self, key, fn):
        return 2 * fn() if key in self.keys else fn()


def _double_gate_rows(mod, chunks: int, index: int) -> None:
    h = mod.lin.weight.shape[0] // chunks
    with torch.no_grad():
        mod.lin.weight[index * h:(index + 1) * h] *= 2
        mod.lin.bias[index * h:(index + 1) * h] *= 2


def test_block_keys_carry_the_output_before_the_gate(models, noise):
    """Doubling a block key's output == doubling that block's adaLN gate: the hook sees the pre-gate
    output and the backbone multiplies it by the current step's gate (FORA / TaylorSeer / PAB references)."""
    model = models["teacher"]
    t = torch.full((2,), 0.6)
    for keys, patch in [(["double0.attn"], lambda m: (_double_gate_rows(m.double_blocks[0].img.mod, 6, 2),
                                                      _double_gate_rows(m.double_blocks[0].txt.mod, 6, 2))),
                        (["double0.mlp"], lambda m: (_double_gate_rows(m.double_blocks[0].img.mod, 6, 5),
                                                     _double_gate_rows(m.double_blocks[0].txt.mod, 6, 5))),
                        (["single0.attn", "single0.mlp"], lambda m: _double_gate_rows(m.single_blocks[0].mod, 3, 2))]:
        patched = copy.deepcopy(model)
        patch(patched)
        with torch.no_grad():
            hooked = model.run(noise, t, TEXT, hook=_Scale(keys)).velocity
            expected = patched.run(noise, t, TEXT).velocity
            plain = model.run(noise, t, TEXT).velocity
        torch.testing.assert_close(hooked, expected, rtol=1e-5, atol=1e-6)
        assert (hooked - plain).abs().max() > 1e-3, keys


def test_fora_schedule_computes_first_and_last_and_anchors_at_the_end():
    from caching.fora import fora_full_steps

    assert fora_full_steps(20, 3) == [0, 1, 4, 7, 10, 13, 16, 19]  # i = 19 - s: i == 19 or i % 3 == 0
    assert fora_full_steps(20, 6) == [0, 1, 7, 13, 19]
    assert fora_full_steps(5, 1) == [0, 1, 2, 3, 4]
    hook = make_cache("fora", num_steps=8, interval=3, count_flops=False)
    for s in range(8):
        hook.begin_step(s, 1 - s / 8)
        hook.delta("double0.attn", lambda: torch.zeros(1))
    assert hook.full_steps == [0, 1, 4, 7]


def test_pab_counts_absolute_steps_and_its_range_is_strict():
    hook = make_cache("pab", num_steps=8, interval=2, t_range=(0.25, 0.75), count_flops=False)
    times = [1.0, 0.75, 0.7, 0.6, 0.5, 0.4, 0.25, 0.2]  # 0.75 and 0.25 are on the bounds: outside
    for s, t in enumerate(times):
        hook.begin_step(s, t)
        hook.delta("double0.attn", lambda: torch.zeros(1))
        hook.delta("double0.mlp", lambda: torch.zeros(1))  # PAB never reuses MLPs
    assert hook.full_steps == [0, 1, 2, 4, 6, 7]  # inside the range: reuse at odd (absolute) steps 3 and 5
    assert make_cache("pab", num_steps=2).t_range == (0.1, 0.8)  # diffusers' default (100, 800) / 1000


def test_taylorseer_schedules():
    def full(**kwargs):
        hook = make_cache("taylorseer", num_steps=12, count_flops=False, **kwargs)
        for s in range(12):
            hook.begin_step(s, 1 - s / 12)
            hook.delta("double0.attn", lambda: torch.zeros(1))
        return hook.full_steps

    assert full(interval=3, warmup=3) == [0, 1, 2, 5, 8, 11]  # official: every N from the last full step
    assert full(interval=3, warmup=3, schedule="diffusers") == [0, 1, 2, 4, 7, 10]  # (s - 3 - 1) % 3 == 0
    assert full(interval=2, warmup=3) == full(interval=2, warmup=3, schedule="diffusers")
    with pytest.raises(ValueError, match="schedule 'x' not in"):
        make_cache("taylorseer", num_steps=4, schedule="x")
