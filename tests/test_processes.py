"""Property tests of every noise process x_t = α(t)·x_0 + σ(t)·ε: vp, sub-vp, ve, edm,
rectified-flow and the discrete linear and cosine tables.

Hypothesis draws the processes' parameters and the times; each property is a closed
form the process must satisfy whatever they are.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffkit
from diffkit.process import GRIDS, Process

F64 = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def processes(draw, names=("linear", "cosine", "vp", "sub-vp", "ve", "edm", "rectified-flow")) -> tuple[str, Process]:
    """A registered process with parameters drawn in their valid ranges."""
    name = draw(st.sampled_from(names))
    if name in ("linear", "cosine"):
        kw = {"timesteps": draw(st.integers(20, 1000))}
    elif name in ("vp", "sub-vp"):
        kw = {"beta_min": draw(st.floats(0.05, 1.0)), "beta_max": draw(st.floats(5.0, 30.0))}
    elif name == "ve":
        kw = {"sigma_min": draw(st.floats(0.005, 0.1)), "sigma_max": draw(st.floats(5.0, 100.0))}
    elif name == "edm":
        kw = {"sigma_min": draw(st.floats(0.001, 0.01)), "sigma_max": draw(st.floats(10.0, 100.0))}
    else:
        kw = {"t_max": draw(st.floats(0.9, 0.9999))}
    return name, diffkit.build("schedule", name, **kw)


def _t(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=F64)


def _noisy_range(p: Process) -> tuple[float, float]:
    """[t_min, t_max] where σ > 0 and α > 0 (rectified flow's σ vanishes at t = 0)."""
    lo = p.t_min if float(p.alpha_sigma(_t(p.t_min))[1]) > 0 else p.t_min + 1e-3 * (p.t_max - p.t_min)
    return lo, p.t_max


@st.composite
def process_and_times(draw, names=None, n: int = 2):
    name, p = draw(processes() if names is None else processes(names))
    lo, hi = _noisy_range(p)
    us = [draw(st.floats(0.0, 1.0)) for _ in range(n)]
    return name, p, [lo + u * (hi - lo) for u in us]


# -- λ, α, σ, σ̃ -----------------------------------------------------------------------------------
@SETTINGS
@given(process_and_times())
def test_log_snr_strictly_decreasing(case):
    name, p, (t1, t2) = case
    lo, hi = sorted((t1, t2))
    if hi - lo < 1e-9 * max(1.0, p.t_max):
        hi = min(lo + 1e-3 * (p.t_max - p.t_min), p.t_max)
        lo = hi - 1e-3 * (p.t_max - p.t_min)
    assert float(p.log_snr(_t(lo))) > float(p.log_snr(_t(hi))), (name, lo, hi)


@SETTINGS
@given(processes())
def test_log_snr_strictly_decreasing_along_the_grid(case):
    name, p = case
    ts = p.grid(min(200, int(p.t_max) + 1) if p.discrete else 200)
    ts = ts[ts != p.t_clean]
    lam = p.log_snr(ts)
    assert bool((lam[1:] > lam[:-1]).all()), name  # ts descends, so λ ascends


@SETTINGS
@given(process_and_times(names=("vp", "linear", "cosine"), n=1))
def test_variance_preserving(case):
    """α² + σ² = 1 for vp (Song et al. 2021, Eq. 33) and the tables, between integers too."""
    name, p, (t,) = case
    a, s = p.alpha_sigma(_t(t))
    assert float(a * a + s * s) == pytest.approx(1.0, abs=1e-12), name


@SETTINGS
@given(process_and_times(n=1))
def test_sigma_tilde_round_trip(case):
    """t_of_sigma_tilde inverts σ̃(t) = σ/α on [t_min, t_max]."""
    name, p, (t,) = case
    back = float(p.t_of_sigma_tilde(p.sigma_tilde(_t(t))))
    assert back == pytest.approx(t, rel=1e-7, abs=1e-9 * max(1.0, p.t_max)), name


@SETTINGS
@given(process_and_times(n=1))
def test_derivatives_equal_central_differences(case):
    """(α', σ') against (f(t + h) − f(t − h))/2h. On a table log σ̃ is linear on each
    [k, k + 1], so t is kept inside a segment (t = k + u, u ∈ [0.1, 0.9])."""
    name, p, (t,) = case
    if p.discrete:
        k = min(math.floor(t), int(p.t_max) - 1)
        t = k + 0.1 + 0.8 * (t - math.floor(t))
        h = 1e-5
    else:
        lo, hi = _noisy_range(p)
        h = 1e-6 * (hi - lo)
        t = min(max(t, lo + 2 * h), hi - 2 * h)
    da, ds = p.derivatives(_t(t))
    a1, s1 = p.alpha_sigma(_t(t + h))
    a0, s0 = p.alpha_sigma(_t(t - h))
    fd_a, fd_s = float((a1 - a0) / (2 * h)), float((s1 - s0) / (2 * h))
    scale_a = max(abs(fd_a), 1e-6)
    scale_s = max(abs(fd_s), 1e-6)
    assert abs(float(da) - fd_a) <= 1e-4 * scale_a, (name, t, float(da), fd_a)
    assert abs(float(ds) - fd_s) <= 1e-4 * scale_s, (name, t, float(ds), fd_s)


@SETTINGS
@given(process_and_times(n=1))
def test_diffusion_is_nonnegative(case):
    """g² = 2σσ' − 2(α'/α)σ² = 2σ²·d/dt log σ̃ ≥ 0: σ̃ never decreases in t."""
    name, p, (t,) = case
    _, g2 = p.drift_diffusion(_t(t))
    assert float(g2) >= -1e-12, name


@SETTINGS
@given(st.floats(0.05, 1.0), st.floats(5.0, 30.0), st.floats(1e-3, 1.0))
def test_vp_drift_diffusion_closed_form(beta_min, beta_max, t):
    """The VP SDE dx = −½β(t)x dt + √β(t) dw, β(t) = β_min + t(β_max − β_min)
    (Song et al. 2021, Eq. 11 and 32)."""
    p = diffkit.build("schedule", "vp", beta_min=beta_min, beta_max=beta_max)
    f, g2 = p.drift_diffusion(_t(t))
    beta = beta_min + t * (beta_max - beta_min)
    assert float(f) == pytest.approx(-0.5 * beta, rel=1e-10)
    assert float(g2) == pytest.approx(beta, rel=1e-8)


@SETTINGS
@given(st.floats(0.05, 1.0), st.floats(5.0, 30.0))
def test_vp_is_the_limit_of_the_linear_table(beta_min, beta_max):
    """The discrete chain with β_i = β(i/(T − 1))/T, i = 0..T−1 (the linear table with
    beta_start = β_min/T, beta_end = β_max/T; T = 1000, β_min = 0.1, β_max = 20 is Ho et
    al. 2020's table), has log ᾱ_i = Σ_{j≤i} log(1 − β_j) = −Σ_{j≤i} β_j + O(1/T)
    = −∫_0^{(i+1)/T} β(s) ds + O(1/T) (a Riemann sum of step 1/T), and the VP process has
    log α(t)² = −∫_0^t β(s) ds (Song et al. 2021, Eq. 33). So ᾱ_i → α((i + 1)/T)² with an
    error O(1/T): ten times the steps, about a tenth of the error."""

    def gap(T: int) -> float:
        table = diffkit.build("schedule", "linear", timesteps=T, beta_start=beta_min / T, beta_end=beta_max / T)
        vp = diffkit.build("schedule", "vp", beta_min=beta_min, beta_max=beta_max)
        t = torch.arange(1, T + 1, dtype=F64) / T
        a, _ = vp.alpha_sigma(t)
        return float((table.alphas_cumprod - a * a).abs().max())

    g100, g1000, g10000 = gap(100), gap(1000), gap(10000)
    assert g1000 < g100 / 5 and g10000 < g1000 / 5, (g100, g1000, g10000)
    assert g10000 < 2e-3


def test_default_vp_matches_ho_et_al_table():
    """β_min = 0.1, β_max = 20 over T = 1000 steps is the linear table of Ho et al. 2020
    (β from 1e-4 to 0.02): ᾱ_t and α(t/1000)² agree to the O(1/T) of the sum."""
    table = diffkit.build("schedule", "linear", timesteps=1000)
    vp = diffkit.build("schedule", "vp")
    a, _ = vp.alpha_sigma(torch.arange(1, 1001, dtype=F64) / 1000)
    assert float((table.alphas_cumprod - a * a).abs().max()) < 2e-3


# -- grids ------------------------------------------------------------------------------------------
@SETTINGS
@given(processes(), st.sampled_from(GRIDS), st.integers(1, 40))
def test_grid_descends_to_the_clean_data(case, spacing, steps):
    name, p = case
    if p.discrete:
        steps = min(steps, int(p.t_max) + 1)
    ts = p.grid(steps, spacing)
    assert ts.dtype == F64 and ts.numel() == steps + 1, (name, spacing)
    assert bool((ts[1:] < ts[:-1]).all()), (name, spacing, ts.tolist())
    assert float(ts[-1]) == p.t_clean
    if not (p.discrete and spacing == "leading"):  # 0.1's leading spacing starts below T − 1 by design
        assert float(ts[0]) == pytest.approx(p.t_max), (name, spacing)


@SETTINGS
@given(processes(), st.integers(2, 40), st.floats(2.0, 10.0))
def test_karras_grid_is_eq_5(case, steps, rho):
    """σ̃_i = (σ_max^{1/ρ} + i/(N − 1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, Eq. 5),
    written out here independently of diffkit.process.karras_sigmas."""
    name, p = case
    if p.discrete:
        steps = min(steps, int(p.t_max) + 1)
    ts = p.grid(steps, "karras", rho=rho)[:-1]
    sig = p.sigma_tilde(ts)
    hi, lo = float(sig[0]), float(sig[-1])
    expect = torch.tensor(
        [(hi ** (1 / rho) + i / (steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(steps)],
        dtype=F64,
    )
    torch.testing.assert_close(sig, expect, rtol=1e-6, atol=0.0)


def test_edm_default_grid_is_karras_with_its_endpoints():
    """EDM's 18-step grid runs from σ_max = 80 to σ_min = 0.002, then 0 (Karras et al. 2022, Table 1)."""
    p = diffkit.build("schedule", "edm")
    ts = p.grid(18)
    assert float(ts[0]) == 80.0 and float(ts[-2]) == pytest.approx(0.002) and float(ts[-1]) == 0.0
    i = torch.arange(18, dtype=F64)
    expect = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(ts[:-1], expect, rtol=1e-12, atol=0.0)


# -- q_sample ---------------------------------------------------------------------------------------
@SETTINGS
@given(process_and_times(n=1), st.integers(0, 2**31 - 1))
def test_q_sample_moments(case, seed):
    """x_t | x_0 ~ N(α x_0, σ² I): the sample mean within 5 standard errors σ/√n, the sample
    variance within 5·σ²√(2/n)."""
    name, p, (t,) = case
    n = 20000
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tensor([1.5, -0.7, 0.2], dtype=F64).expand(n, 3)
    noise = torch.randn(n, 3, generator=g, dtype=F64)
    if p.discrete:  # a table's q_sample takes integer timesteps (0.1's convention)
        t = float(round(t))
        tt = torch.full((n,), int(t), dtype=torch.long)
    else:
        tt = torch.full((n,), t, dtype=F64)
    xt = p.q_sample(x0, tt, noise)
    a, s = (float(v) for v in p.alpha_sigma(_t(t)))
    assert torch.allclose(xt.mean(0), a * x0[0], atol=5 * s / math.sqrt(n) + 1e-12), name
    assert torch.allclose(xt.var(0), torch.full((3,), s * s, dtype=F64), atol=5 * s * s * math.sqrt(2 / n) + 1e-12)


# -- objective conversions ----------------------------------------------------------------------------
OBJECTIVES = ("epsilon", "x0", "v", "score", "flow", "edm")


def test_table_q_sample_at_fractional_time_follows_the_process():
    p = diffkit.build("schedule", "linear", timesteps=1000)
    x0, eps = torch.ones(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64)
    t = torch.full((2,), 10.5, dtype=F64)
    torch.testing.assert_close(p.q_sample(x0, t, eps), Process.q_sample(p, x0, t, eps))


@SETTINGS
@given(process_and_times(n=1), st.sampled_from(OBJECTIVES), st.integers(0, 2**31 - 1), st.booleans())
def test_objective_round_trip(case, objective, seed, integral):
    """target(x_0, ε) read back through denoised gives x_0 and ε, for every process; on a
    table at an integer timestep (int64, 0.1's formulas) or a fractional float t."""
    name, p, (t,) = case
    kw = {"sigma_data": 1.0} if objective == "edm" else {}
    obj = diffkit.build("objective", objective, **kw)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 2, generator=g, dtype=F64)
    eps = torch.randn(4, 2, generator=g, dtype=F64)
    tt = torch.full((4,), t, dtype=F64)
    if p.discrete and integral:
        tt = tt.round().long()
    x_t = p.q_sample(x0, tt, eps) if p.discrete and integral else Process.q_sample(p, x0, tt, eps)
    out = obj.target(x0, eps, x_t, tt, p)
    x0_hat, eps_hat = obj.denoised(out, x_t, tt, p)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7, msg=lambda m: f"{name}/{objective}: x0 {m}")
    torch.testing.assert_close(eps_hat, eps, rtol=1e-7, atol=1e-7, msg=lambda m: f"{name}/{objective}: eps {m}")
    # the score and velocity of the same output: −ε/σ and α'x_0 + σ'ε
    a, s = p.alpha_sigma(tt.to(F64))
    da, ds = p.derivatives(tt.to(F64))
    torch.testing.assert_close(obj.to_score(out, x_t, tt, p), -eps / s[:, None], rtol=1e-7, atol=1e-7)
    velocity = da[:, None] * x0 + ds[:, None] * eps
    torch.testing.assert_close(obj.to_velocity(out, x_t, tt, p), velocity, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("m, s", [(0.0, 1.0), (-0.5, 0.6)])
def test_rectified_flow_trains_on_logit_normal_t(m, s):
    """logit(t) ~ N(m, s²) (Esser et al. 2024, Eq. 19) with no uniform share: a
    Kolmogorov–Smirnov test accepts it, and rejects the same draws against uniform t and
    against a shifted mean."""
    from scipy import stats

    spec = {"type": "rectified-flow", "logit_mean": m, "logit_std": s, "uniform_fraction": 0}
    t = diffkit.build("schedule", spec).sample_t(20_000, generator=torch.Generator().manual_seed(3))
    assert t.dtype == F64 and bool(((t > 0) & (t <= 0.999)).all())
    logit = torch.logit(t).numpy()
    assert stats.kstest(logit, "norm", args=(m, s)).pvalue > 1e-3
    assert stats.kstest(logit, "norm", args=(m + 0.1, s)).pvalue < 1e-6
    assert stats.kstest(t.numpy(), "uniform", args=(0.0, 0.999)).pvalue < 1e-6


def test_rectified_flow_default_t_is_logit_normal_with_a_uniform_share():
    """The default: t ~ 0.8·logit-normal(0, 1) + 0.2·U[0, t_max], whose CDF is
    F(t) = 0.8·Φ(logit t) + 0.2·t/t_max; the pure logit-normal CDF is rejected."""
    from scipy import stats

    process = diffkit.build("schedule", "rectified-flow")
    t = process.sample_t(40_000, generator=torch.Generator().manual_seed(5)).numpy()

    def mixture(x):
        return 0.8 * stats.norm.cdf(stats.logistic.ppf(x)) + 0.2 * x / 0.999

    assert stats.kstest(t, mixture).pvalue > 1e-3
    assert stats.kstest(t, lambda x: stats.norm.cdf(stats.logistic.ppf(x))).pvalue < 1e-6
    # the clean end keeps its draws: a fifth of uniform's density near t = 0
    assert 0.2 * 0.02 * 0.9 < float((t < 0.02).mean()) < 0.2 * 0.02 * 1.3 + 1e-3


def test_rectified_flow_uniform_t_is_an_option():
    t = diffkit.build("schedule", {"type": "rectified-flow", "t_sampling": "uniform"}).sample_t(
        20_000, generator=torch.Generator().manual_seed(4)
    )
    from scipy import stats

    assert stats.kstest(t.numpy(), "uniform", args=(0.0, 0.999)).pvalue > 1e-3
    with pytest.raises(Exception) as info:
        diffkit.build("schedule", {"type": "rectified-flow", "t_sampling": "lognorm"})
    assert "t_sampling" in str(info.value) and "logit-normal" in str(info.value)
