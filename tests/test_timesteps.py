"""Each --timestep_sampling method against its formula (Kolmogorov–Smirnov distance to the exact CDF, fixed
seed, deterministic), the min/max mapping, the t+0.001 convention, noisy inputs and loss weighting."""

from __future__ import annotations

import math

import pytest
import torch

from engine.spec.errors import OptionError
from engine.train.timesteps import (TimestepSampler, loss_weighting, noisy_input, qwen_shift,
                                    schedule_timesteps)

N = 100_000
KS_LIMIT = 0.008            # 1.36/√N ≈ 0.0043 is the 5 % critical value; the wrong formulas below give > 0.03
HW = (128, 128)             # latent size of a 1024² image


def _phi(x):
    return torch.special.ndtr(x.double())


def _sample(method, **kw):
    s = TimestepSampler(method, **kw)
    t, timesteps = s.sample(N, HW, torch.Generator().manual_seed(0))
    return t.double(), timesteps.double()


def _ks(samples, cdf):
    x, _ = samples.sort()
    f = cdf(x.clamp(1e-12, 1 - 1e-12))
    n = len(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return torch.maximum(upper - f, f - (upper - 1 / n)).abs().max().item()


def _cdf_sigmoid(scale):
    return lambda x: _phi(torch.logit(x) / scale)


def _cdf_shift(scale, s):
    # t' = s·t / (1 + (s−1)·t)  ⇔  t = t' / (s − (s−1)·t')
    return lambda x: _cdf_sigmoid(scale)(x / (s - (s - 1) * x))


def _cdf_logsnr(mean, std):
    # t = σ(−λ/2) ≤ x  ⇔  λ ≥ −2·logit(x)
    return lambda x: 1 - _phi((-2 * torch.logit(x) - mean) / std)


@pytest.mark.parametrize("method, kw, cdf, wrong", [
    ("uniform", {}, lambda x: x, lambda x: x ** 1.1),
    ("sigmoid", {"sigmoid_scale": 1.5}, _cdf_sigmoid(1.5), _cdf_sigmoid(1.0)),
    ("shift", {"discrete_flow_shift": 2.2, "sigmoid_scale": 1.0}, _cdf_shift(1.0, 2.2), _cdf_shift(1.0, 1 / 2.2)),
    ("qwen_shift", {}, _cdf_shift(1.0, qwen_shift(*HW)), _cdf_shift(1.0, 3.0)),
    ("logsnr", {"logit_mean": -1.0, "logit_std": 2.0}, _cdf_logsnr(-1.0, 2.0), _cdf_logsnr(1.0, 2.0)),
    ("qinglong_qwen", {}, lambda x: 0.95 * _cdf_shift(1.0, qwen_shift(*HW))(x) + 0.05 * _cdf_logsnr(5.36, 1.0)(x),
     _cdf_shift(1.0, qwen_shift(*HW))),
])
def test_continuous_methods_follow_their_formula(method, kw, cdf, wrong):
    t, timesteps = _sample(method, **kw)
    assert _ks(t, cdf) < KS_LIMIT
    assert _ks(t, wrong) > 0.03                       # the check can tell a wrong formula apart
    torch.testing.assert_close(timesteps, t * 1000 + 1)    # the DiT sees t + 0.001


def test_qwen_shift_values():
    assert qwen_shift(166, 166) == pytest.approx(2.303, abs=1e-3)      # 1328²: "typically around 2.2"
    assert qwen_shift(128, 128) == pytest.approx(math.exp(0.6935), abs=1e-3)


def test_min_max_maps_linearly():
    t, timesteps = _sample("sigmoid", min_timestep=200, max_timestep=600)
    assert t.min() >= 0.2 and t.max() <= 0.6
    assert _ks((t - 0.2) / 0.4, _cdf_sigmoid(1.0)) < KS_LIMIT
    t, _ = _sample("sigmoid", min_timestep=200, max_timestep=600, preserve_distribution_shape=True)
    assert t.min() >= 0.2 and t.max() <= 0.6
    # rejection sampling keeps the shape: the truncated sigmoid-normal CDF
    lo, hi = _cdf_sigmoid(1.0)(torch.tensor(0.2)), _cdf_sigmoid(1.0)(torch.tensor(0.6))
    assert _ks(t, lambda x: (_cdf_sigmoid(1.0)(x) - lo) / (hi - lo)) < KS_LIMIT
    with pytest.raises(OptionError):
        TimestepSampler("uniform", min_timestep=700, max_timestep=300)


def test_sigma_method_uses_the_unshifted_grid():
    t, timesteps = _sample("sigma", discrete_flow_shift=3.0)          # shift is ignored by `sigma`
    grid = set(schedule_timesteps().tolist())
    assert set(timesteps.unique().tolist()) <= grid
    torch.testing.assert_close(t, timesteps / 1000)
    # weighting none: u ~ U(0,1), idx = floor(1000u), timestep = 1000 − idx → uniform on {1, …, 1000}
    assert abs(timesteps.mean().item() - 500.5) < 2.0
    assert _ks(t, lambda x: x) < KS_LIMIT
    t, timesteps = _sample("sigma", min_timestep=100, max_timestep=300)
    assert timesteps.min() >= 701 and timesteps.max() <= 900           # idx ∈ [100, 300)


def test_sigma_with_logit_normal_and_mode():
    t, _ = _sample("sigma", weighting_scheme="logit_normal", logit_mean=0.5, logit_std=1.2)
    # t = 1 − floor(1000u)/1000 with u = σ(N(0.5, 1.2)): P(t ≤ x) = P(u ≥ 1 − x) up to one grid step
    assert _ks(t, lambda x: 1 - _phi((torch.logit(1 - x + 0.0005) - 0.5) / 1.2)) < KS_LIMIT
    t, _ = _sample("sigma", weighting_scheme="mode", mode_scale=1.29)
    # u' = 1 − u − s(cos²(πu/2) − 1 + u) is decreasing in u for s = 1.29, so quantile q of u' is f(1 − q)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    f = lambda u: 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)      # noqa: E731
    expected_t = 1 - f(1 - (1 - q))           # t ≈ 1 − u'; quantile q of t ↔ quantile 1 − q of u'
    torch.testing.assert_close(torch.quantile(t, q), expected_t, atol=0.01, rtol=0)


def test_deterministic_with_seed():
    s = TimestepSampler("qinglong_qwen")
    a = s.sample(64, HW, torch.Generator().manual_seed(7))
    b = s.sample(64, HW, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_noisy_input_and_target():
    x0 = torch.randn(3, 16, 1, 4, 4)
    eps = torch.randn(3, 16, 1, 4, 4)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt, target = noisy_input(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], eps[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(target, eps - x0)


def test_loss_weighting():
    timesteps = torch.tensor([1000.0, 500.0, 250.4, 101.0])     # 250.4 snaps to 250
    sigma = torch.tensor([1.0, 0.5, 0.25, 0.101])
    torch.testing.assert_close(loss_weighting("sigma_sqrt", timesteps), sigma ** -2)
    torch.testing.assert_close(loss_weighting("cosmap", timesteps), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2)))
    for scheme in ("none", "logit_normal", "mode"):
        assert loss_weighting(scheme, timesteps) is None
