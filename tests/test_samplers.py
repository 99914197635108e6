"""The DDPM sampler driven by exact optimal denoisers (diffkit.oracles).

With ε̂ = E[ε | x_t] exact, every error left in the samples is the sampler's own, so
its output can be compared with the data distribution it should reproduce.

For Gaussian data the whole reverse chain is linear-Gaussian, so the *exact* law of
the sampler's output is computable in closed form (:func:`ddpm_law`). Each test
checks two things:

1. Monte Carlo: the empirical mean and covariance of the samples lie within 5
   standard errors of that exact law (a z-score of 5 has two-sided probability
   5.7e-7; with fixed seeds the outcome is deterministic anyway);
2. discretisation: the exact law is within a stated budget of the data distribution.

Together they bound |empirical − data| by 5 SE + budget, the tolerance each test
asserts against the data directly.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffkit
from diffkit import diffusion as D
from diffkit.oracles import GaussianData, GaussianMixture

REGISTRY = diffkit.get_registry()
F64 = torch.float64

# A 2-D Gaussian with a non-zero mean and correlation 0.6/√0.5 ≈ 0.85;
# eigenvalues of Σ are 0.75 ± √0.4225 ≈ 1.40 and 0.10.
MEAN = torch.tensor([1.5, -0.8], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)
N = 20_000


def make_schedule(kind: str = "linear", T: int = 1000):
    return REGISTRY.build("schedule", {"type": kind, "timesteps": T})


def make_sampler(**params):
    return REGISTRY.build("sampler", {"type": "ddpm", **params})


def draw(oracle, schedule, sampler, shape, seed, *, steps=None, dtype=torch.float32):
    with torch.inference_mode():
        return sampler(
            oracle.predict(schedule),
            schedule,
            shape,
            generator=torch.Generator().manual_seed(seed),
            steps=steps,
            dtype=dtype,
        )


def ddpm_law(oracle: GaussianData, schedule, *, steps=None, spacing="linspace", variance="posterior", t_start=None):
    """Exact mean and covariance of DDPM's output when ε̂ is the Gaussian oracle.

    In the eigenbasis Σ = U diag(λ) Uᵀ write u = Uᵀx, m = Uᵀμ. For a step t → s
    (s the next visited timestep, ᾱ_s = 1 after the last) with α = ᾱ_t/ᾱ_s,
    β = 1 − α, c = ᾱ_t λ + 1 − ᾱ_t, the oracle is ε̂ = √(1−ᾱ_t)(u − √ᾱ_t m)/c per
    coordinate and DDPM's update x ← (x − β/√(1−ᾱ_t) ε̂)/√α + σ z (Ho et al. 2020,
    Alg. 2, respaced) becomes u ← A u + b + σ z with

        A = (1 − β/c)/√α,   b = β √ᾱ_t m / (c √α),

    and σ² = β (variance 'beta') or (1 − ᾱ_s)/(1 − ᾱ_t) β ('posterior'), none on the
    last step. From u ~ N(0, I) the mean and variance follow M ← A M + b and
    V ← A² V + σ², coordinates staying independent. Returns (U M, U diag(V) Uᵀ).

    With ``t_start`` the chain starts instead from the exact marginal of x_{t_start},
    N(√ᾱ μ, ᾱΣ + (1 − ᾱ) I), i.e. M = √ᾱ m, V = ᾱλ + 1 − ᾱ.
    """
    lam, U = oracle.eigvals, oracle.eigvecs
    m = U.T @ oracle.mean
    ts = schedule.timesteps(steps, spacing, start=t_start)
    abar = schedule.alphas_cumprod.tolist()
    M = torch.zeros_like(m)
    V = torch.ones_like(m)
    if t_start is not None:
        a0 = abar[t_start]
        M, V = math.sqrt(a0) * m, a0 * lam + 1 - a0
    for i, t in enumerate(ts):
        a_t = abar[t]
        a_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        alpha, beta = a_t / a_s, 1 - a_t / a_s
        c = a_t * lam + 1 - a_t
        A = (1 - beta / c) / math.sqrt(alpha)
        M = A * M + beta * math.sqrt(a_t) * m / (c * math.sqrt(alpha))
        V = A * A * V
        if i + 1 < len(ts):
            V = V + (beta if variance == "beta" else (1 - a_s) / (1 - a_t) * beta)
    return U @ M, U @ torch.diag(V) @ U.T


def assert_recovers(x, oracle: GaussianData, law, budget: float):
    """Samples ``x`` match the exact ``law`` within 5 SE, the law is within ``budget``
    (relative to the scales √Σ_ii, √(Σ_ii Σ_jj)) of the data, hence the samples are
    within 5 SE + budget of the data.

    Standard errors for n draws from N(m, C): SE(mean_i) = √(C_ii/n) and, for the
    sample covariance, Var(S_ij) = (C_ii C_jj + C_ij²)/n (Anderson 2003, Thm. 3.4.4)."""
    law_mean, law_cov = law
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    mean, cov = x.mean(0), torch.cov(x.T)
    d = law_cov.diag()
    se_mean = (d / n).sqrt()
    se_cov = ((d[:, None] * d[None, :] + law_cov.square()) / n).sqrt()
    assert ((mean - law_mean).abs() <= 5 * se_mean).all(), (mean, law_mean)
    assert ((cov - law_cov).abs() <= 5 * se_cov).all(), (cov, law_cov)

    sd = oracle.cov.diag().sqrt()
    mean_budget, cov_budget = budget * sd, budget * sd[:, None] * sd[None, :]
    assert ((law_mean - oracle.mean).abs() <= mean_budget).all(), "discretisation bias of the mean over budget"
    assert ((law_cov - oracle.cov).abs() <= cov_budget).all(), "discretisation bias of the covariance over budget"
    assert ((mean - oracle.mean).abs() <= 5 * se_mean + mean_budget).all()
    assert ((cov - oracle.cov).abs() <= 5 * se_cov + cov_budget).all()


# -- the oracle the tests rely on -------------------------------------------------------
def test_gaussian_oracle_is_the_exact_denoiser():
    """ε̂ = −σ ∇ log N(x; √ᾱ μ, ᾱΣ + (1−ᾱ)I) by Tweedie, checked against autograd of
    torch's own Gaussian log-density, for a batch of different t."""
    sch = make_schedule()
    oracle = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(64, 2, generator=g, dtype=F64)
    t = torch.randint(0, sch.T, (64,), generator=g)
    a = sch.alphas_cumprod[t]
    marginal = torch.distributions.MultivariateNormal(
        a.sqrt()[:, None] * MEAN, a[:, None, None] * COV + (1 - a)[:, None, None] * torch.eye(2, dtype=F64)
    )
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(marginal.log_prob(xg).sum(), xg)
    expected = -(1 - a).sqrt()[:, None] * grad
    torch.testing.assert_close(oracle.predict(sch)(x, t), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(oracle.score(x, a), grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(oracle.log_prob(x, a), marginal.log_prob(x), rtol=1e-12, atol=1e-12)
    out = oracle.predict(sch)(x.float(), t)
    assert out.dtype == torch.float32


def test_mixture_oracle_is_the_exact_denoiser():
    """Mixture: score = ∇ log p_t by autograd of log_prob; p(k | x_t) is Bayes' rule
    with torch's Gaussians; with one component the mixture is GaussianData(μ, s² I);
    with a label the denoiser is that component's."""
    sch = make_schedule("cosine")
    g = torch.Generator().manual_seed(1)
    K, Dm = 3, 4
    means = 2 * torch.randn(K, Dm, generator=g, dtype=F64)
    stds = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    mix = GaussianMixture(means, stds, weights)
    x = 2 * torch.randn(32, Dm, generator=g, dtype=F64)
    t = torch.randint(0, sch.T, (32,), generator=g)
    a = sch.alphas_cumprod[t]
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(mix.log_prob(xg, a).sum(), xg)
    torch.testing.assert_close(mix.score(x, a), grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(mix.predict(sch)(x, t), -(1 - a).sqrt()[:, None] * grad, rtol=1e-9, atol=1e-10)
    log_joint = torch.stack(
        [
            weights[k].log()
            + torch.distributions.Normal(a.sqrt()[:, None] * means[k], (a * stds[k] ** 2 + 1 - a).sqrt()[:, None])
            .log_prob(x)
            .sum(-1)
            for k in range(K)
        ],
        dim=1,
    )
    torch.testing.assert_close(mix.class_posterior(x, a), log_joint.softmax(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mix.log_prob(x, a), log_joint.logsumexp(1), rtol=1e-12, atol=1e-12)
    for k in range(K):
        single = GaussianData(means[k], stds[k] ** 2 * torch.eye(Dm, dtype=F64))
        labels = torch.full((32,), k)
        torch.testing.assert_close(mix.predict(sch, labels)(x, t), single.predict(sch)(x, t), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            GaussianMixture(means[k : k + 1], stds[k : k + 1]).predict(sch)(x, t), single.predict(sch)(x, t)
        )
    xs, labels = mix.sample(40_000, torch.Generator().manual_seed(2))
    freq = torch.bincount(labels, minlength=K).double() / 40_000
    assert ((freq - weights).abs() <= 5 * (weights * (1 - weights) / 40_000).sqrt()).all()


# -- DDPM recovers a Gaussian -----------------------------------------------------------
# Budgets (relative to √Σ_ii and √(Σ_ii Σ_jj)) for the discretisation bias, from
# ddpm_law for this Σ. All T steps: the mean error is only the prior mismatch
# √ᾱ_{T−1} μ propagated back (< 1e-4); the covariance error is ≈1.0 % (linear) and
# ≈0.6 % (cosine) with β̃_t, ≈0.1 % with β_t: β̃_t omits the posterior variance of x_0
# and so slightly under-disperses (Ho et al. 2020, Sec. 3.2; Bao et al. 2022).
# 100 respaced steps: ≈1.1 % (linear) / 0.6 % (cosine) with β, but ≈8.6 % / 5.1 % with
# β̃, whose under-dispersion grows with the step size.
FULL_BUDGET = 0.015
RESPACED_BUDGET = {"beta": 0.02, "posterior": 0.10}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_recovers_gaussian(kind, variance):
    sch = make_schedule(kind)
    oracle = GaussianData(MEAN, COV)
    x = draw(oracle, sch, make_sampler(variance=variance), (N, 2), seed=10)
    assert x.shape == (N, 2) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert_recovers(x, oracle, ddpm_law(oracle, sch, variance=variance), FULL_BUDGET)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_respaced_recovers_gaussian(kind, variance):
    sch = make_schedule(kind)
    oracle = GaussianData(MEAN, COV)
    x = draw(oracle, sch, make_sampler(variance=variance, steps=100), (N, 2), seed=11)
    law = ddpm_law(oracle, sch, steps=100, variance=variance)
    assert_recovers(x, oracle, law, RESPACED_BUDGET[variance])
    # the `steps` argument of the call overrides the parameter, and means the same
    y = draw(oracle, sch, make_sampler(variance=variance), (N, 2), seed=11, steps=100)
    assert torch.equal(x, y)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_respaced_other_spacings(spacing):
    sch = make_schedule("linear")
    oracle = GaussianData(MEAN, COV)
    x = draw(oracle, sch, make_sampler(variance="beta", steps=100, spacing=spacing), (N, 2), seed=12)
    law = ddpm_law(oracle, sch, steps=100, spacing=spacing, variance="beta")
    assert_recovers(x, oracle, law, RESPACED_BUDGET["beta"])


@pytest.mark.parametrize("steps", [None, 100])
def test_ddpm_from_a_partly_noised_start(steps):
    """x_start ~ q(x_t | x_0) with x_0 from the data, t_start = 400: the chain from there
    recovers the data (the start is the exact marginal, so only discretisation remains),
    and the given x_start is left untouched."""
    sch = make_schedule()
    oracle = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(13)
    t0 = 400
    x0 = oracle.sample(N, g)
    x_start = sch.q_sample(x0, torch.full((N,), t0), torch.randn(x0.shape, generator=g))
    kept = x_start.clone()
    with torch.inference_mode():
        x = make_sampler(variance="beta")(
            oracle.predict(sch), sch, (N, 2), generator=g, steps=steps, x_start=x_start, t_start=t0
        )
    assert torch.equal(x_start, kept)
    law = ddpm_law(oracle, sch, steps=steps, variance="beta", t_start=t0)
    assert_recovers(x, oracle, law, FULL_BUDGET if steps is None else RESPACED_BUDGET["beta"])


def test_ddpm_is_deterministic_given_the_generator():
    sch = make_schedule()
    oracle = GaussianData(MEAN, COV)
    smp = make_sampler(steps=50)
    a = draw(oracle, sch, smp, (500, 2), seed=3)
    b = draw(oracle, sch, smp, (500, 2), seed=3)
    c = draw(oracle, sch, smp, (500, 2), seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() > 0.1  # not merely a rounding difference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ddpm_image_shaped_gaussian(dtype):
    """A [n, 1, 4, 4] Gaussian (D = 16, random correlated Σ) through the flattened
    oracle: shape and dtype are kept, and the flattened moments match."""
    g = torch.Generator().manual_seed(5)
    A = torch.randn(16, 16, generator=g, dtype=F64)
    cov = 0.1 * A @ A.T / 16 + 0.02 * torch.eye(16, dtype=F64)
    oracle = GaussianData(0.3 * torch.randn(16, generator=g, dtype=F64), cov, event_shape=(1, 4, 4))
    sch = make_schedule()
    n = 6000
    x = draw(oracle, sch, make_sampler(variance="beta"), (n, 1, 4, 4), seed=6, dtype=dtype)
    assert x.shape == (n, 1, 4, 4) and x.dtype == dtype and torch.isfinite(x).all()
    # This Σ has eigenvalues 0.02 … 0.26, far from 1, where β_t over-disperses (it is
    # exact for λ = 1): ddpm_law puts the covariance bias at 0.65 % of √(Σ_ii Σ_jj) with
    # all 1000 steps (2.7 % with β̃; 8 % / 19 % with 100 respaced steps), so all steps.
    assert_recovers(x, oracle, ddpm_law(oracle, sch, variance="beta"), 0.01)
    assert oracle.sample(3, g).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
@pytest.mark.parametrize("steps, spacing", [(None, "linspace"), (20, "trailing"), (20, "leading")])
def test_bounded_x0_bounds_the_output(steps, spacing, variance):
    """Driven by a prediction whose x̂_0 the core holds in [−c, c] (diffkit.diffusion.X0Bound,
    what the pipeline applies for clip_denoised = c), the last step returns that x̂_0 itself
    (ᾱ_s = 1 makes the posterior mean's coefficient of x_t zero and no noise is added), so
    every value lies in [−c, c] up to float32 rounding, even for data that mostly lie outside."""
    c = 0.5
    sch = make_schedule()
    oracle = GaussianData(torch.tensor([2.0, -2.0], dtype=F64), 0.5 * torch.eye(2, dtype=F64))
    smp = make_sampler(steps=steps, spacing=spacing, variance=variance)
    bound = D.X0Bound(sch, torch.tensor(-c), torch.tensor(c))
    with torch.inference_mode():
        x = smp(bound(oracle.predict(sch)), sch, (2000, 2), generator=torch.Generator().manual_seed(7))
    assert x.abs().max() <= c + 1e-6
    # the data sit at (2, −2) with sd 0.7, so the bound is active: many samples end on it,
    # on the side of the data's mean, and the bound counted what it moved
    assert (x[:, 0] > c - 1e-6).sum() > 100 and (x[:, 1] < -c + 1e-6).sum() > 100
    assert x[:, 0].mean() > 0 and x[:, 1].mean() < 0
    assert 0 < bound.share <= 1
    # the step itself does not clip: without a bound (clip_denoised: null) the same data are not bounded
    free = draw(oracle, sch, make_sampler(steps=steps, spacing=spacing, clip_denoised=None), (2000, 2), seed=7)
    assert free.abs().max() > 1.0
