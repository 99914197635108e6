"""The Langevin samplers ``sgld`` and ``pc`` driven by exact scores (diffkit.oracles).

For Gaussian data every step of ``sgld`` is linear-Gaussian, so the exact law of its
output is computable in closed form (:func:`sgld_law`); the tests check the samples
against that law within 5 standard errors (Monte Carlo) and the law against the data
distribution within a stated budget (discretisation), as tests/test_samplers.py does
for DDPM. The mixture tests check what annealing is for: recovering the weights of
well-separated modes, which Langevin dynamics at a single noise level does not.

Most tests call the samplers in the 0.1 style, ``sampler(predict, schedule, shape)`` on a
discrete table, as 0.1's tests did; the tests of the continuous core drive them in
:func:`diffkit.sampling.run` with the exact denoiser of any process
(``GaussianData.denoiser``), on ``ve`` (where ``sgld`` is NCSN's Alg. 1, checked bit for
bit against the algorithm written out by hand) and ``vp``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit
from diffkit.oracles import GaussianData, GaussianMixture
from diffkit.sampling import run
from diffkit_plugins.langevin import least_noisy_sigma, noise_levels, resolve_epsilon, step_sizes

REGISTRY = diffkit.get_registry()
F64 = torch.float64
MEAN = torch.tensor([1.5, -0.8], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)  # eigenvalues ≈ 1.40 and 0.10
GAUSS = GaussianData(MEAN, COV)
# Two far-apart modes with unequal weights (Song & Ermon 2019, Sec. 3.2 and Fig. 3).
MIXTURE = GaussianMixture(torch.tensor([[-2.0, -2.0], [2.0, 2.0]]), torch.tensor([0.3, 0.3]), torch.tensor([0.2, 0.8]))


def linear(T: int = 1000):
    return REGISTRY.build("schedule", {"type": "linear", "timesteps": T})


def ve(sigma_max: float = 10.0, sigma_min: float = 0.01):
    """NCSN's noise levels; σ_max = 10 is about twice the largest distance between draws of
    GAUSS (Song & Ermon 2020, Technique 1)."""
    return REGISTRY.build("schedule", {"type": "ve", "sigma_max": sigma_max, "sigma_min": sigma_min})


def draw_exact(oracle, process, smp, n, seed, **kwargs):
    """Samples of ``smp`` in the core's loop, driven by the exact (x̂_0, ε̂) of ``oracle`` under ``process``."""
    with torch.inference_mode():
        g = torch.Generator().manual_seed(seed)
        return run(smp, oracle.denoiser(process), process, (n, 2), generator=g, **kwargs)


def sampler(kind: str, **params):
    return REGISTRY.build("sampler", {"type": kind, **params})


def draw(oracle, sch, smp, n, seed, **kwargs):
    with torch.inference_mode():
        return smp(oracle.predict(sch), sch, (n, 2), generator=torch.Generator().manual_seed(seed), **kwargs)


def sgld_law(oracle: GaussianData, process, ts, etas, K, denoise, start_var=None):
    """Exact mean and covariance of ``sgld``'s output for Gaussian data and its exact score,
    on any process x_t = α x_0 + σ ε.

    In the eigenbasis (u = Uᵀx, m = Uᵀμ, Σ = U diag(λ) Uᵀ) the score at level t is
    −(u − α m)/c with c = α²λ + σ², so a Langevin step u ← u + (η/2)·score + √η z is
    u ← A u + b + √η z with A = 1 − η/(2c), b = η α m/(2c). K steps give, in closed
    form, M ← A^K M + b (1 − A^K)/(1 − A) and V ← A^{2K} V + η (1 − A^{2K})/(1 − A²).
    Tweedie's step x̂_0 = (u + σ² score)/α is u ← G u + σ² m/c with G = (1 − σ²/c)/α.
    The start is N(0, start_var·I), by default the loop's prior (variance α² + σ² at t_max).
    """
    lam, U = oracle.eigvals, oracle.eigvecs
    m = U.T @ oracle.mean
    start_var = process.prior_std() ** 2 if start_var is None else start_var
    M, V = torch.zeros_like(m), torch.full_like(m, start_var)
    for t, eta in zip(ts, etas):
        a, s = process.alpha_sigma(torch.tensor(float(t), dtype=F64))
        c = a * a * lam + s * s
        A, b = 1 - eta / (2 * c), eta * a * m / (2 * c)
        AK = A**K
        M = AK * M + b * (1 - AK) / (1 - A)
        V = AK**2 * V + eta * (1 - AK**2) / (1 - A**2)
    if denoise:
        a, s = process.alpha_sigma(torch.tensor(float(ts[-1]), dtype=F64))
        c = a * a * lam + s * s
        G = (1 - s * s / c) / a
        M, V = G * M + s * s * m / c, G**2 * V
    return U @ M, U @ torch.diag(V) @ U.T


def assert_matches_law(x, mean, cov, k=5.0):
    """Sample mean and covariance within k standard errors of the law N(mean, cov)."""
    x = x.double()
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean).abs() <= k * se_mean).all(), (x.mean(0), mean)
    se_cov = ((cov.square() + torch.outer(cov.diagonal(), cov.diagonal())) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= k * se_cov).all(), (torch.cov(x.T), cov)


# -- noise levels ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(2, 3000), st.data())
def test_geometric_levels(T, data):
    sch = diffkit.Schedule(torch.linspace(0.9999, 1e-4, T, dtype=F64))
    L = data.draw(st.integers(1, T), label="levels")
    ts = noise_levels(sch, L)
    assert all(a > b for a, b in zip(ts, ts[1:])) and 1 <= len(ts) <= L
    assert ts[0] == T - 1 and (L == 1 or ts[-1] == 0)
    start = data.draw(st.integers(0, T - 1), label="start")
    assert noise_levels(sch, L, start=start) == [start] + [t for t in ts if t < start]
    for spacing in ("linspace", "leading", "trailing"):
        assert noise_levels(sch, L, spacing) == sch.timesteps(L, spacing)


def test_geometric_levels_are_evenly_spread_in_log_snr():
    """Noise levels σ_t/√ᾱ_t = SNR^{−1/2} spaced geometrically, as Song & Ermon space σ_i."""
    sch = linear()
    ts = noise_levels(sch, 10)
    assert len(ts) == 10
    log_snr = sch.snr[ts].log()
    gaps = log_snr[1:] - log_snr[:-1]
    assert (gaps > 0).all() and (gaps.max() - gaps.min()) / gaps.mean() < 0.05


def test_step_sizes_follow_sigma_squared():
    sch = linear()
    ts = noise_levels(sch, 20)
    etas = step_sizes(sch, ts, 2e-5)
    sigma2 = 1 - sch.alphas_cumprod[ts]
    torch.testing.assert_close(torch.tensor(etas, dtype=F64), 2e-5 * sigma2 / sigma2.min())
    assert etas[-1] == pytest.approx(2e-5)


# -- Langevin dynamics on a Gaussian ---------------------------------------------------------
def test_plain_langevin_converges_to_the_gaussian():
    """Langevin dynamics at the least noisy level alone (t_start = 0), from N(0, I).

    Its exact law (sgld_law) has converged to within 1e-3 of the mean; its covariance
    carries the unadjusted Langevin algorithm's bias, a factor 1/(1 − η/(4λ)) per
    eigen-direction (2.5% for λ = 0.1, η = 0.01), and the samples match that law. As
    η → 0 with ηK fixed, the law tends to the data's N(μ, Σ).
    """
    sch = linear()
    eta, K = 0.01, 2000
    smp = sampler("sgld", epsilon=eta, steps_per_level=K)
    x_start = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(1))
    x = draw(GAUSS, sch, smp, 10_000, 2, x_start=x_start, t_start=0)
    mean, cov = sgld_law(GAUSS, sch, [0], [eta], K, denoise=True)
    assert_matches_law(x, mean, cov)
    assert (mean - MEAN).abs().max() < 1e-3
    assert relative_cov_error(cov) < 0.03
    mean0, cov0 = sgld_law(GAUSS, sch, [0], [1e-6], 100_000_000, denoise=True)
    assert (mean0 - MEAN).abs().max() < 1e-6
    torch.testing.assert_close(cov0, COV, rtol=2e-4, atol=2e-4)


def relative_cov_error(cov):
    """max |C − Σ|_ij / √(Σ_ii Σ_jj)."""
    return ((cov - COV).abs() / COV.diagonal().sqrt().outer(COV.diagonal().sqrt())).max().item()


def test_annealed_langevin_with_default_settings_follows_its_exact_law():
    """The default sgld (100 levels, 10 steps each, ε = 0.2 σ_0² = 2e-5, Tweedie at the end) from
    N(0, I): the samples follow the exact law of the chain."""
    sch, smp = linear(), sampler("sgld")
    p = smp.params
    ts = noise_levels(sch, p.steps)
    x = draw(GAUSS, sch, smp, 10_000, 3)
    mean, cov = sgld_law(GAUSS, sch, ts, step_sizes(sch, ts, p.epsilon), p.steps_per_level, denoise=True)
    assert_matches_law(x, mean, cov)
    assert p.epsilon is None and resolve_epsilon(sch, None) == pytest.approx(2e-5, rel=1e-9)  # 0.2 σ_0², σ_0² = β_0


@pytest.mark.parametrize(
    "epsilon, K, mean_error, cov_error",
    [
        (2e-5, 10, 0.09, 0.035),  # the defaults: 0.086 and 3.3%
        (1e-4, 10, 0.02, 0.005),
        (1e-4, 100, 0.0025, 0.0007),
        (1e-4, 1000, 0.0004, 0.00015),
    ],
)
def test_annealed_langevin_converges_to_the_gaussian_as_its_budget_grows(epsilon, K, mean_error, cov_error):
    """The exact law of annealed Langevin over the 100 default levels. With a finite
    budget the chain lags behind the levels as they shrink (in the VP form the modes
    also move outward, by √ᾱ_t): at the defaults its mean is 0.086 short of μ and Σ is
    3.3% off. Both errors vanish as the Langevin time ε·K per level grows."""
    sch = linear()
    ts = noise_levels(sch, 100)
    mean, cov = sgld_law(GAUSS, sch, ts, step_sizes(sch, ts, epsilon), K, denoise=True)
    assert (mean - MEAN).abs().max() < mean_error
    assert relative_cov_error(cov) < cov_error


def test_denoising_is_tweedie():
    """denoise=False returns the last Langevin state; True applies x̂_0 = (x + σ² s)/√ᾱ to it."""
    sch = linear(100)
    raw = draw(GAUSS, sch, sampler("sgld", steps=5, denoise=False), 64, 4)
    den = draw(GAUSS, sch, sampler("sgld", steps=5), 64, 4)
    ts = noise_levels(sch, 5)
    a = sch.alphas_cumprod[ts[-1]]
    expected = (raw.double() + (1 - a) * GAUSS.score(raw, a).double()) / a.sqrt()
    torch.testing.assert_close(den.double(), expected, rtol=1e-5, atol=1e-5)


# -- the continuous core: ve (NCSN) and vp ---------------------------------------------------
def test_ve_levels_are_ncsns_geometric_sigmas():
    """On ve the geometric levels are σ_i = σ(t_i) with constant ratio σ_{i+1}/σ_i, from σ_max to
    σ(t_min) = σ_min (σ_max/σ_min)^{t_min} (Song & Ermon 2019, Sec. 4.2), and σ_L is the last."""
    proc = ve()
    ts = noise_levels(proc, 10)
    sig = proc.alpha_sigma(torch.tensor(ts, dtype=F64))[1]
    log_ratio = (sig[1:] / sig[:-1]).log()
    torch.testing.assert_close(log_ratio, log_ratio.mean().expand(9), rtol=1e-12, atol=1e-12)
    assert sig[0].item() == pytest.approx(10.0, rel=1e-14)
    assert sig[-1].item() == pytest.approx(0.01 * 1000.0**proc.t_min, rel=1e-14)
    assert least_noisy_sigma(proc) == sig[-1].item()
    assert noise_levels(proc, 10, start=0.5) == [0.5] + [t for t in ts if t < 0.5]


@pytest.mark.parametrize("denoise", [False, True])
def test_sgld_on_ve_is_song_and_ermon_algorithm_1_bit_for_bit(denoise):
    """sgld on ve against Alg. 1 of Song & Ermon 2019 written out here, with the same
    generator: x̃ from the loop's prior N(0, (1 + σ_max²) I); for i = 1..L, α_i = ε σ_i²/σ_L²,
    K times z ~ N(0, I), x̃ ← x̃ + (α_i/2) s(x̃, σ_i) + √α_i z; with ``denoise`` then
    x̂_0 = x̃ + σ_L² s(x̃, σ_L) (Song & Ermon 2020, α = 1). The score s(x, σ) = −ε̂/σ is the
    exact one of the Gaussian on p_data ∗ N(0, σ² I): −(Σ + σ² I)⁻¹(x − μ)."""
    proc = ve()
    L, K, epsilon, n = 12, 4, 2e-5, 256
    smp = sampler("sgld", steps=L, steps_per_level=K, epsilon=epsilon, denoise=denoise, clip_denoised=None)
    den = GAUSS.denoiser(proc)
    got = draw_exact(GAUSS, proc, smp, n, 0)

    ts = noise_levels(proc, L)
    sigmas = [float(proc.alpha_sigma(torch.tensor(t, dtype=F64))[1]) for t in ts]

    def s(x, i):
        return -den(x, torch.full((n,), ts[i], dtype=F64)).eps / sigmas[i]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g) * math.sqrt(1.0 + sigmas[0] ** 2)
    for i in range(L):
        alpha_i = epsilon * sigmas[i] ** 2 / sigmas[-1] ** 2
        for _ in range(K):
            z = torch.randn(n, 2, generator=g)
            x = x + (alpha_i / 2) * s(x, i) + math.sqrt(alpha_i) * z
    if denoise:
        x = x + sigmas[-1] ** 2 * s(x, L - 1)
        got, x = got.double(), x.double()
        torch.testing.assert_close(got, x, rtol=0, atol=1e-6)  # x̂_0 via ε̂: (x − σ ε̂)/α, one rounding apart
    else:
        assert torch.equal(got, x)
    closed = -torch.linalg.solve(COV + sigmas[3] ** 2 * torch.eye(2, dtype=F64), (x.double() - MEAN).T).T
    torch.testing.assert_close(s(x.float(), 3).double(), closed, rtol=1e-5, atol=1e-5)


def test_sgld_on_ve_follows_its_exact_law_and_converges_to_the_gaussian():
    """NCSN on ve with the exact score: the samples follow the exact law of the chain (for
    Gaussian data every step is linear-Gaussian, sgld_law), and that law tends to N(μ, Σ) as
    the Langevin time per level grows. On ve the mean has no lag (the levels share the mean
    μ); the covariance lags where σ_i² falls below Σ's small eigenvalue 0.10: 7.9% at the
    defaults (ε = 0.2 σ_L² ≈ 2e-5, K = 10), 1.8% at ε = 1e-4, 0.17% with K = 100, 0.015% with
    K = 1000 (the unadjusted algorithm's O(η) bias)."""
    proc = ve()
    ts = noise_levels(proc, 100)
    smp = sampler("sgld", clip_denoised=None)
    x = draw_exact(GAUSS, proc, smp, 10_000, 20)
    mean, cov = sgld_law(GAUSS, proc, ts, step_sizes(proc, ts, None), 10, denoise=True)
    assert_matches_law(x, mean, cov)
    for epsilon, K, cov_error in ((2e-5, 10, 0.08), (1e-4, 10, 0.018), (1e-4, 100, 0.0018), (1e-4, 1000, 0.0002)):
        mean, cov = sgld_law(GAUSS, proc, ts, step_sizes(proc, ts, epsilon), K, denoise=True)
        assert (mean - MEAN).abs().max() < 1e-6
        assert relative_cov_error(cov) < cov_error, (epsilon, K, relative_cov_error(cov))


@pytest.mark.parametrize("process, budget_mean, budget_cov", [("ve", 0.001, 0.004), ("linear", 0.005, 0.001)])
def test_sgld_recovers_the_gaussian(process, budget_mean, budget_cov):
    """The exact denoiser in the core's loop, 50 levels, ε = 1e-4 and K = 100: the samples'
    mean and covariance are within 5 standard errors plus the law's own distance from the
    data (on ve mean exact, Σ 0.0035 off; on the linear table 0.004 and 0.0006) of N(μ, Σ)."""
    proc = ve() if process == "ve" else linear()
    smp = sampler("sgld", steps=50, epsilon=1e-4, steps_per_level=100, clip_denoised=None)
    x = draw_exact(GAUSS, proc, smp, 4000, 21)
    assert_near_data(x, budget_mean, budget_cov)


@pytest.mark.parametrize("name", ["edm", "rectified-flow"])
def test_sgld_with_its_defaults_follows_its_exact_law_on_other_processes(name):
    """sgld's defaults on edm (σ from 80 down to 0.002) and rectified flow (levels down to
    σ̃ = 0.002): ε = 0.2 σ_L² keeps every step stable, and the samples follow the chain's
    exact law (sgld_law, from the loop's prior N(0, (α² + σ²) I) at t_max)."""
    proc = REGISTRY.build("schedule", name)
    ts = noise_levels(proc, 100)
    x = draw_exact(GAUSS, proc, sampler("sgld", clip_denoised=None), 4000, 27)
    mean, cov = sgld_law(GAUSS, proc, ts, step_sizes(proc, ts, None), 10, denoise=True)
    assert_matches_law(x, mean, cov)


def test_sgld_on_the_table_is_the_same_in_the_core_loop():
    """The linear table driven by GaussianData.denoiser in the core's loop gives the samples of
    the 0.1 call driven by the ε-oracle on the table, from the same seed (two codings of one
    exact denoiser, so equal to float rounding)."""
    sch = linear()
    smp = sampler("sgld", steps=20, steps_per_level=3)
    a = draw(GAUSS, sch, smp, 512, 22)
    b = draw_exact(GAUSS, sch, smp, 512, 22)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "process, predictor, budget_mean, budget_cov",
    [
        ("ve", "ancestral", 0.005, 0.01),
        ("ve", "reverse-diffusion", 0.005, 0.01),
        ("vp", "ancestral", 0.005, 0.01),
        ("vp", "reverse-diffusion", 0.005, 0.01),
    ],
)
def test_pc_on_continuous_processes_recovers_the_gaussian(process, predictor, budget_mean, budget_cov):
    """pc (200 predictor steps, one corrector step each) with the exact denoiser of ve and of vp
    (Song et al. 2021, Alg. 2 and 3): mean and covariance within 5 SE plus the discretisation
    budget of the data's."""
    proc = ve() if process == "ve" else REGISTRY.build("schedule", "vp")
    smp = sampler("pc", steps=200, predictor=predictor, clip_denoised=None)
    x = draw_exact(GAUSS, proc, smp, 4000, 24)
    assert_near_data(x, budget_mean, budget_cov)


def test_pc_reverse_diffusion_on_ve_is_algorithm_2():
    """One predictor step of reverse-diffusion on ve is Alg. 2's
    x ← x + (σ_t² − σ_s²) s(x, σ_t) + √(σ_t² − σ_s²) z, followed by Alg. 4's corrector."""
    proc = ve()
    smp = sampler("pc", steps=3, predictor="reverse-diffusion", corrector_steps=0, clip_denoised=None)
    den = GAUSS.denoiser(proc)
    n = 64
    got = draw_exact(GAUSS, proc, smp, n, 25, levels=torch.tensor([1.0, 0.5, proc.t_clean], dtype=F64))
    g = torch.Generator().manual_seed(25)
    s_t, s_s = (float(proc.alpha_sigma(torch.tensor(t, dtype=F64))[1]) for t in (1.0, 0.5))
    x = torch.randn(n, 2, generator=g) * proc.prior_std()
    score = -den(x, torch.full((n,), 1.0, dtype=F64)).eps / s_t
    x = 1.0 * x + (s_t**2 - s_s**2) * score + math.sqrt(s_t**2 - s_s**2) * torch.randn(n, 2, generator=g)
    x = den(x, torch.full((n,), 0.5, dtype=F64)).x0
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)


def test_clip_denoised_bounds_the_score_implied_x0():
    """With clip_denoised = c the Langevin steps follow the score implied by the clipped
    x̂_0, (α x̂_0 − x)/σ²: for data at (5, −5), far outside [−1, 1], the last Langevin state
    (denoise: false) sits at the clipped x̂_0 (1, −1) within the last levels' noise, where
    without the bound it sits at the data."""
    far = GaussianData(torch.tensor([5.0, -5.0], dtype=F64), 0.01 * torch.eye(2, dtype=F64))
    proc, den = ve(), far.denoiser(ve())
    corner = torch.tensor([1.0, -1.0], dtype=F64)

    def predict(x, t):
        return den(x, t).eps

    def sample(clip):
        smp = sampler("sgld", steps=20, denoise=False, clip_denoised=clip)
        with torch.inference_mode():
            return smp(predict, proc, (256, 2), generator=torch.Generator().manual_seed(26)).double()

    x = sample(1.0)
    assert (x.mean(0) - corner).abs().max() < 0.02 and (x - corner).abs().max() < 0.1, x.mean(0)
    assert (sample(None).mean(0) - far.mean).abs().max() < 0.05


# -- annealing against a single level, on two modes ------------------------------------------
def mode_fraction(x):
    return (x.sum(dim=1) > 0).double().mean().item()


def test_annealed_langevin_recovers_both_modes_with_their_weights():
    """Weights 0.2 / 0.8: default annealed Langevin puts 0.80 ± 0.04 of the samples in the
    heavier mode (5 SE ≈ 0.02 plus 0.02 of the sampler's own bias, about 0.015 here),
    with each mode's mean and spread right."""
    x = draw(MIXTURE, linear(), sampler("sgld"), 10_000, 5)
    frac = mode_fraction(x)
    assert abs(frac - 0.8) < 0.04, frac
    for sign, mu in ((1, 2.0), (-1, -2.0)):
        part = x[(x.sum(1) > 0) == (sign > 0)].double()
        assert (part.mean(0) - mu).abs().max() < 0.05
        assert (part.std(0) - 0.3).abs().max() < 0.03


def test_plain_langevin_gets_the_weights_wrong():
    """The failure that annealing fixes (Song & Ermon 2019, Sec. 3.2.2): at the least
    noisy level alone the score carries no information about the relative weight of
    modes separated by a region of negligible density, so chains stay in the mode they
    start near. From N(0, I), symmetric between the modes, about half end in each —
    not 0.8 — though each mode on its own is sampled correctly."""
    sch = linear()
    smp = sampler("sgld", epsilon=1e-3, steps_per_level=1000)
    x_start = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(6))
    x = draw(MIXTURE, sch, smp, 10_000, 7, x_start=x_start, t_start=0)
    frac = mode_fraction(x)
    assert abs(frac - 0.5) < 0.05, frac
    part = x[x.sum(1) > 0].double()
    assert (part.mean(0) - 2.0).abs().max() < 0.05 and (part.std(0) - 0.3).abs().max() < 0.03


# -- predictor–corrector ---------------------------------------------------------------------
def assert_near_data(x, budget_mean, budget_cov, k=5.0):
    """Sample mean and covariance within k standard errors plus a bias budget of N(μ, Σ)."""
    x = x.double()
    n = x.shape[0]
    se_mean = (COV.diagonal() / n).sqrt()
    se_cov = ((COV.square() + torch.outer(COV.diagonal(), COV.diagonal())) / n).sqrt()
    assert ((x.mean(0) - MEAN).abs() <= k * se_mean + budget_mean).all(), x.mean(0)
    assert ((torch.cov(x.T) - COV).abs() <= k * se_cov + budget_cov).all(), torch.cov(x.T)


def test_pc_recovers_the_gaussian():
    """pc with the exact denoiser, default settings (1000 predictor steps, one corrector
    step each, r = 0.16): within 5 SE plus 0.01 of μ and Σ. (The bias measured with
    40,000 samples is under 0.008 in every entry, the size of DDPM's own at T = 1000.)"""
    x = draw(GAUSS, linear(), sampler("pc"), 20_000, 8)
    assert_near_data(x, 0.01, 0.01)


def test_pc_with_fewer_steps_and_more_corrector_steps():
    """100 predictor steps with 3 corrector steps each: the respaced predictor's coarser
    steps leave a larger bias (0.023 in Σ, measured with 40,000 samples)."""
    x = draw(GAUSS, linear(), sampler("pc", steps=100, corrector_steps=3), 20_000, 9)
    assert_near_data(x, 0.015, 0.03)


def test_pc_without_corrector_is_ddpm():
    """With corrector_steps = 0 the predictor alone is ancestral sampling: the same
    numbers as the ddpm sampler from the same seed, up to float rounding."""
    sch = linear(100)
    a = draw(GAUSS, sch, sampler("pc", corrector_steps=0, steps=30), 256, 10)
    b = draw(GAUSS, sch, sampler("ddpm", steps=30), 256, 10)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# -- the sampler contract --------------------------------------------------------------------
@pytest.mark.parametrize("kind, params", [("sgld", {"steps": 4, "steps_per_level": 2}), ("pc", {"steps": 4})])
def test_callback_start_and_determinism(kind, params):
    sch, smp = linear(50), sampler(kind, **params)
    seen = []
    x = draw(GAUSS, sch, smp, 8, 11, callback=lambda t, x: seen.append(t))
    assert seen[-1] == -1 and seen[0] == sch.T - 1
    assert all(a >= b for a, b in zip(seen, seen[1:]))
    torch.testing.assert_close(draw(GAUSS, sch, smp, 8, 11), x)  # same seed, same samples
    # a returned tensor replaces the state: pin the state at zero throughout
    pinned = draw(GAUSS, sch, smp, 8, 11, callback=lambda t, x: torch.zeros_like(x))
    assert (pinned == 0).all()
    # starting from a given state does not modify it
    x_start = torch.ones(8, 2)
    starts = []
    draw(GAUSS, sch, smp, 8, 12, x_start=x_start, t_start=10, callback=lambda t, x: starts.append((t, x.clone())))
    assert starts[0][0] == 10 and torch.equal(starts[0][1], x_start) and (x_start == 1).all()
    assert all(t <= 10 for t, _ in starts)


def test_images_shape():
    sch = linear(20)
    oracle = GaussianData(torch.zeros(16, dtype=F64), torch.eye(16, dtype=F64), event_shape=(1, 4, 4))
    for kind in ("sgld", "pc"):
        smp = sampler(kind, steps=3)
        x = smp(oracle.predict(sch), sch, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert x.shape == (5, 1, 4, 4) and torch.isfinite(x).all()


# -- validation ------------------------------------------------------------------------------
def spec(sampler_section):
    return {
        "data": {"type": "moons"},
        "schedule": {"type": "linear", "timesteps": 1000},
        "denoiser": "mlp",
        "objective": "score",
        "sampler": sampler_section,
    }


@pytest.mark.parametrize(
    "section, path",
    [
        ({"type": "sgld", "steps_per_level": 0}, "sampler.steps_per_level"),
        ({"type": "sgld", "epsilon": 0}, "sampler.epsilon"),
        ({"type": "sgld", "steps": 1001}, "sampler.steps"),
        ({"type": "sgld", "spacing": "log"}, "sampler.spacing"),
        ({"type": "pc", "snr": -1}, "sampler.snr"),
        ({"type": "pc", "corrector_steps": -1}, "sampler.corrector_steps"),
    ],
)
def test_invalid_parameters_name_their_field(section, path):
    with pytest.raises(diffkit.SpecError, match=path.replace(".", r"\.")):
        diffkit.spec.validate_spec(spec(section))


def test_too_large_a_step_is_caught_at_validation_and_at_call():
    """ε = 1e-3 makes the noisiest level's step η_1 = ε σ_1²/σ_L² ≈ 10 on this schedule."""
    with pytest.raises(diffkit.SpecError, match="Lower epsilon to at most 0.0001"):
        diffkit.spec.validate_spec(spec({"type": "sgld", "epsilon": 1e-3}))
    with pytest.raises(ValueError, match="η"):
        draw(GAUSS, linear(), sampler("sgld", epsilon=1e-3), 4, 0)


def test_pipeline_samples_with_every_objective_through_the_conversions():
    """A sampler never knows the objective: sgld and pc run on a pipeline trained (a few
    steps) with the score objective, and on one trained with ε."""
    for objective in ("score", "epsilon"):
        pipe = diffkit.Pipeline(
            schedule={"type": "linear", "timesteps": 50},
            denoiser={"type": "mlp", "hidden": 16, "depth": 1},
            objective=objective,
            data={"type": "moons", "n": 256},
            train={"steps": 2, "batch_size": 64, "preview": 0},
        )
        pipe.fit(progress=False)
        for smp in ({"type": "sgld", "steps": 5, "steps_per_level": 2}, {"type": "pc", "steps": 5}):
            x = pipe.sample(16, seed=0, sampler=smp)
            assert x.shape == (16, 2) and torch.isfinite(x).all()
