"""The ``score`` objective: denoising score matching (Vincent 2011; Song & Ermon 2019).

Its target is ∇ log q(x_t | x_0) = −ε/σ_t, its output converts to ε̂ = −σ_t s_θ, and
with λ(t) = σ_t² its loss *is* the ε loss of the converted output. By default the network
outputs F = σ_t s_θ (``scale_by_sigma``, Song & Ermon 2020, Technique 3), whose target is −ε;
``scale_by_sigma: false`` reads the output as the score itself. The decisive test
trains one small network per objective on a fixed problem and checks that both
convert to the same ε̂: the exact denoiser of the Gaussian data.
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import einsum
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import diffkit
from diffkit import diffusion as D
from diffkit.oracles import GaussianData

REGISTRY = diffkit.get_registry()
F64 = torch.float64
MEAN = torch.tensor([1.5, -0.8], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)


def objective(**params):
    return REGISTRY.build("objective", {"type": "score", **params})


def schedule(kind: str = "linear", T: int = 1000):
    return REGISTRY.build("schedule", {"type": kind, "timesteps": T})


# -- conversions ---------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["linear", "cosine"]), st.integers(2, 1000), st.integers(0, 2**31 - 1), st.booleans())
def test_target_is_the_conditional_score_and_converts_back_to_eps(kind, T, seed, scaled):
    """The score's target is ∇_{x_t} log N(x_t; √ᾱ x_0, σ² I) = −(x_t − √ᾱ x_0)/σ² = −ε/σ:
    the output's target is that (``scale_by_sigma: false``) or σ times it, −ε (the default);
    to_eps of the target gives ε back, to_score the conditional score."""
    sch, obj = schedule(kind, T), objective(scale_by_sigma=scaled)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.randint(0, T, (6,), generator=g)
    x_t = sch.q_sample(x0, t, eps)
    a = sch.alpha_bar(t, x_t)
    expected = -(x_t - a.sqrt() * x0) / (1 - a)
    target = obj.target(x0, eps, x_t, t, sch)
    atol = 1e-6 / (1 - a).sqrt().min().item()
    if scaled:
        torch.testing.assert_close(target, -eps)
        torch.testing.assert_close(obj.to_score(target, x_t, t, sch), expected, rtol=1e-6, atol=atol)
    else:
        torch.testing.assert_close(target, expected, rtol=1e-6, atol=atol)
        assert obj.to_score(target, x_t, t, sch) is target
    torch.testing.assert_close(obj.to_eps(target, x_t, t, sch), eps)
    torch.testing.assert_close(obj.to_x0(target, x_t, t, sch), x0, rtol=1e-6, atol=1e-6)


def test_images_shape():
    sch, obj = schedule(), objective()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = sch.q_sample(x0, t, eps)
    out = obj.target(x0, eps, x_t, t, sch)
    assert out.shape == x0.shape and out.dtype == torch.float32
    torch.testing.assert_close(obj.to_eps(out, x_t, t, sch), eps, rtol=1e-5, atol=1e-5)


# -- any process ----------------------------------------------------------------------------
PROCESSES = {
    "vp": {"type": "vp"},
    "sub-vp": {"type": "sub-vp"},
    "ve": {"type": "ve", "sigma_max": 20.0},
    "edm": {"type": "edm"},
    "rectified-flow": {"type": "rectified-flow"},
    "linear": {"type": "linear", "timesteps": 1000},
}


def process(name: str):
    return REGISTRY.build("schedule", PROCESSES[name])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(PROCESSES)), st.integers(0, 2**31 - 1), st.booleans())
def test_round_trip_on_every_process(name, seed, scaled):
    """On every process x_t = α x_0 + σ ε at random continuous t: the score's target is −ε/σ
    (the output's, σ times it with ``scale_by_sigma``), and denoised(target) gives back (x_0, ε)
    (ε̂ = −σ s, x̂_0 = (x_t + σ² s)/α); to_score is the score, to_velocity is α' x_0 + σ' ε
    (Song et al. 2021, Eq. 13)."""
    proc, obj = process(name), objective(scale_by_sigma=scaled)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    u = torch.rand(5, generator=g, dtype=F64)
    lo = proc.t_min if proc.t_min > 0 else 1e-3
    t = lo + (proc.t_max - lo) * u
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    target = obj.target(x0, eps, x_t, t, proc)
    torch.testing.assert_close(target, -eps if scaled else -eps / s[:, None], rtol=1e-12, atol=0)
    x0_hat, eps_hat = obj.denoised(target, x_t, t, proc)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-7, atol=1e-7 * float((s / a).max()))
    torch.testing.assert_close(obj.to_score(target, x_t, t, proc), -eps / s[:, None], rtol=1e-12, atol=0)
    da, ds = proc.derivatives(t)
    velocity = da[:, None] * x0 + ds[:, None] * eps
    atol = 1e-6 * float((s / a).max())
    torch.testing.assert_close(obj.to_velocity(target, x_t, t, proc), velocity, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("name", ["vp", "ve", "edm", "rectified-flow"])
def test_the_exact_score_converts_to_the_exact_denoiser(name, scaled):
    """A network that outputs the exact score −C⁻¹(x − αμ), C = α²Σ + σ²I, of Gaussian data
    (σ times it with ``scale_by_sigma``) converts through Score.denoised to
    GaussianData.denoiser's exact (x̂_0, ε̂): what a sampler sees is the same whether the
    exact model is written as a score or as a denoiser."""
    proc, obj = process(name), objective(scale_by_sigma=scaled)
    data = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(1)
    t = proc.t_min + 1e-3 + (proc.t_max - proc.t_min - 1e-3) * torch.rand(64, generator=g, dtype=F64)
    x_t = proc.q_sample(data.sample(64, g, dtype=F64), t, torch.randn(64, 2, generator=g, dtype=F64))
    a, s = proc.alpha_sigma(t)
    C = a[:, None, None] ** 2 * COV + s[:, None, None] ** 2 * torch.eye(2, dtype=F64)
    score = -torch.linalg.solve(C, (x_t - a[:, None] * MEAN).unsqueeze(-1)).squeeze(-1)
    x0_hat, eps_hat = obj.denoised(s[:, None] * score if scaled else score, x_t, t, proc)
    exact = data.denoiser(proc)(x_t, t)
    torch.testing.assert_close(eps_hat, exact.eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_hat, exact.x0, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("scaled", [True, False])
@pytest.mark.parametrize("name", ["vp", "ve", "edm", "rectified-flow"])
def test_sigma2_weighting_is_the_eps_loss_on_continuous_processes(name, scaled):
    """λ = σ(t)²: per sample, λ ‖s_θ − target‖² = ‖ε̂ − ε‖² with ε̂ = −σ s_θ, the ε loss of the
    converted output, at t drawn as the process draws it for training (written on the output
    F = σ s_θ with ``scale_by_sigma``: weight λ/σ² = 1 and target −ε)."""
    proc, obj = process(name), objective(scale_by_sigma=scaled)
    g = torch.Generator().manual_seed(2)
    t = obj.sample_t(proc, 64, g, torch.device("cpu")).double().clamp(min=max(proc.t_min, 1e-3))
    x0, eps, out = (torch.randn(64, 2, generator=g, dtype=F64) for _ in range(3))
    a, s = proc.alpha_sigma(t)
    x_t = a[:, None] * x0 + s[:, None] * eps
    dsm = obj.weight(t, proc, x0) * (out - obj.target(x0, eps, x_t, t, proc)).square().sum(1)
    eps_hat = obj.denoised(out, x_t, t, proc)[1]
    torch.testing.assert_close(dsm, (eps_hat - eps).square().sum(1), rtol=1e-10, atol=0)


def test_likelihood_weighting_on_continuous_processes():
    """λ(t) ∝ g(t)² of the forward SDE (Song et al. 2021, Thm. 1): on vp g² = β(t) =
    β_min + t(β_max − β_min), linear in t; on ve g² = 2σ² ln(σ_max/σ_min), so the average of
    λ/σ² is 2 ln(σ_max/σ_min) and the normalised weight is σ² itself, the sigma2 weighting."""
    obj, default = objective(weighting="likelihood", scale_by_sigma=False), objective(scale_by_sigma=False)
    vp = process("vp")
    t = torch.linspace(vp.t_min, 1.0, 50, dtype=F64)
    like = torch.zeros(50, 2, dtype=F64)
    ratio = obj.weight(t, vp, like) / (0.1 + t * 19.9)
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-6, atol=0)
    ve = process("ve")
    torch.testing.assert_close(obj.weight(t, ve, like), default.weight(t, ve, like), rtol=1e-9, atol=0)
    torch.testing.assert_close(default.weight(t, ve, like), ve.alpha_sigma(t)[1].square(), rtol=1e-12, atol=0)
    # on the scaled output F = σ s_θ the same loss weighs by λ/σ²: β(t)/σ² on vp, one for σ² weighting
    scaled = objective(weighting="likelihood").weight(t, vp, like)
    torch.testing.assert_close(scaled, obj.weight(t, vp, like) / vp.alpha_sigma(t)[1].square(), rtol=1e-12, atol=0)
    torch.testing.assert_close(objective().weight(t, vp, like), torch.ones(50, dtype=F64), rtol=0, atol=0)


# -- weights and the loss ------------------------------------------------------------------
@pytest.mark.parametrize("scaled", [True, False])
def test_sigma2_weighting_makes_the_loss_the_eps_loss(scaled):
    """λ = σ_t²: E σ² ‖s_θ + ε/σ‖² = E ‖(−σ s_θ) − ε‖², the ε loss of the network
    whose output is −σ_t s_θ, drawn with the same t and ε; the same with the output read
    as σ_t s_θ (``scale_by_sigma``)."""
    sch = schedule()
    torch.manual_seed(0)
    score_net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def f_score(x, t, cond=None):
        return score_net(x) * (1 + t[:, None] / 1000)

    def f_out(x, t, cond=None):
        return f_score(x, t) * (1 - sch.alpha_bar(t, x)).sqrt().to(x.dtype) if scaled else f_score(x, t)

    def f_eps(x, t, cond=None):
        return D.score_to_eps(f_score(x, t), sch.alpha_bar(t, x))

    x0 = torch.randn(256, 2)
    dsm = objective(scale_by_sigma=scaled).loss(f_out, sch, x0, generator=torch.Generator().manual_seed(3))
    eps_loss = REGISTRY.build("objective", "epsilon").loss(f_eps, sch, x0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(dsm, eps_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_likelihood_weighting_is_proportional_to_beta(kind):
    """λ(t) ∝ β_t = g(t)² of the discretised VP SDE (Song et al. 2021, Thm. 1),
    normalised so that the mean over t of λ/σ_t² is 1."""
    sch, obj = schedule(kind), objective(weighting="likelihood", scale_by_sigma=False)
    t = torch.arange(sch.T)
    w = obj.weight(t, sch, torch.zeros(sch.T, 2)).double()
    ratio = w / sch.betas
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0)
    assert math.isclose((w / sch.sigmas.square()).mean().item(), 1.0, rel_tol=1e-5)
    default = objective(scale_by_sigma=False).weight(t, sch, torch.zeros(sch.T, 2)).double()
    torch.testing.assert_close(default, sch.sigmas.square(), rtol=1e-6, atol=0)


def test_spec_rejects_unknown_weighting():
    with pytest.raises(diffkit.SpecError, match="objective.weighting"):
        REGISTRY.build("objective", {"type": "score", "weighting": "uniform"})


# -- the same minimiser -------------------------------------------------------------------
class PerStepAffine(nn.Module):
    """f(x, t) = W_t x + b_t: one affine map per timestep. For Gaussian data both the
    score −C_t⁻¹(x − √ᾱ_t μ) and the denoiser E[ε | x_t] are affine in x_t, so this
    'network' can represent the minimiser of either objective exactly; what it learns
    is then decided by the objective alone."""

    def __init__(self, T: int, dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(T, dim, dim))
        self.b = nn.Parameter(torch.zeros(T, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return einsum(self.W[t], x, "b i j, b j -> b i") + self.b[t]


def fit_to_eps(objective_section, sch, x0: Tensor):
    """Minimise ``objective_section``'s loss for a PerStepAffine (float64) on the fixed
    sample ``x0`` — the same t and ε on every evaluation, so the loss is one fixed
    quadratic — with L-BFGS, and return the fit converted to ε̂ (a sampler's view)."""
    obj = REGISTRY.build("objective", objective_section)
    net = PerStepAffine(sch.T, 2).double()
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = obj.loss(net, sch, x0, generator=torch.Generator().manual_seed(1))
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    return lambda x, t: obj.to_eps(net(x, t), x, t, sch)


def test_dsm_and_eps_objectives_have_the_same_minimiser():
    """Fitted to the same fixed problem, a score network (DSM, either weighting) and an
    ε network convert to the same ε̂.

    With λ = σ_t² the two losses are one function of ε̂ = −σ_t s_θ, and a per-timestep
    weight cannot move the minimiser of a model with separate parameters per timestep,
    so all three fits must agree up to the optimiser's tolerance (here 1e-5, relative).
    Each is also the exact denoiser ε̂* up to the sampling error of a finite problem:
    its excess risk E‖ε̂ − ε̂*‖² over the Bayes risk E‖ε̂* − ε‖² of each timestep is
    about p/n = 6/2,000 = 0.3% for least squares with p parameters from n examples per
    timestep (20,000 examples over 10 timesteps); it must stay below 1.5%.
    """
    sch = schedule("cosine", 10)
    data = GaussianData(MEAN, COV)
    oracle = data.predict(sch)
    x0 = data.sample(20_000, torch.Generator().manual_seed(0), dtype=F64)
    predictors = {
        "epsilon": fit_to_eps({"type": "epsilon"}, sch, x0),
        "score": fit_to_eps({"type": "score"}, sch, x0),
        "score-unscaled": fit_to_eps({"type": "score", "scale_by_sigma": False}, sch, x0),
        "score-likelihood": fit_to_eps({"type": "score", "weighting": "likelihood"}, sch, x0),
    }

    def rel(a: Tensor, b: Tensor) -> float:
        return ((a - b).square().mean() / b.square().mean()).sqrt().item()

    g = torch.Generator().manual_seed(123)
    x_test = data.sample(4000, g, dtype=F64)
    with torch.no_grad():
        for t in range(sch.T):
            tt = torch.full((x_test.shape[0],), t)
            eps = torch.randn(x_test.shape, generator=g, dtype=F64)
            x_t = sch.q_sample(x_test, tt, eps)
            got = {name: p(x_t, tt) for name, p in predictors.items()}
            for name in ("score", "score-unscaled", "score-likelihood"):
                assert rel(got[name], got["epsilon"]) < 1e-5, (name, t, rel(got[name], got["epsilon"]))
            best = oracle(x_t, tt)
            excess = (got["epsilon"] - best).square().sum(1).mean() / (best - eps).square().sum(1).mean()
            assert excess < 0.015, (t, excess.item())
