"""Timestep selection shared by every sampler, the few-step samplers ``ddim`` and
``dpm-solver`` driven by exact denoisers (diffkit.oracles), and the ``x0`` and ``v``
objectives with min-SNR-γ weighting.

Exact laws. With the Gaussian oracle ε̂ is affine in x_t, so a deterministic sampler
(DDIM with η = 0, DPM-Solver) is an affine map x_out = A x_start + b. Running it on
the rows 0, e_1, …, e_D gives b and the columns of A exactly, hence the exact law of
its output for a Gaussian start N(m_0, C_0): N(A m_0 + b, A C_0 Aᵀ) (:func:`affine_law`).
Starting from the exact marginal of x_{t_0} removes the prior mismatch, so what remains
is the sampler's own discretisation error.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffkit
from diffkit import Schedule, SpecError
from diffkit import diffusion as D
from diffkit.interfaces import TIMESTEP_SPACINGS
from diffkit.oracles import GaussianData
from diffkit.spec import validate_spec

REGISTRY = diffkit.get_registry()
F64 = torch.float64
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLERS = ["ddpm", "ddim", "dpm-solver"]
DETERMINISTIC = [{"type": "ddim"}, {"type": "dpm-solver"}, {"type": "dpm-solver", "order": 1}]

# the 2-D Gaussian of test_samplers: non-zero mean, correlation ≈ 0.85, eigenvalues 1.40, 0.10
MEAN = torch.tensor([1.5, -0.8], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)


def schedule(kind: str = "linear", T: int = 1000) -> Schedule:
    return REGISTRY.build("schedule", {"type": kind, "timesteps": T})


def sampler(config: str | dict, **params):
    config = {"type": config} if isinstance(config, str) else config
    return REGISTRY.build("sampler", {**config, **params})


def affine_law(smp, oracle: GaussianData, sch: Schedule, steps: int | None, t_start: int | None = None):
    """Exact mean and covariance of a deterministic sampler's output (see the module
    docstring), starting from the exact marginal of x at its first visited timestep."""
    rows = torch.cat([torch.zeros(1, oracle.dim, dtype=F64), torch.eye(oracle.dim, dtype=F64)])
    with torch.inference_mode():
        out = smp(oracle.predict(sch), sch, rows.shape, steps=steps, dtype=F64, x_start=rows, t_start=t_start)
    b, A = out[0], (out[1:] - out[0]).T
    t0 = sch.timesteps(steps, smp.params.spacing or "trailing", start=t_start)[0]
    m0, C0 = oracle.marginal(sch.alphas_cumprod[t0].item())
    return A @ m0 + b, A @ C0 @ A.T


def law_error(law, oracle: GaussianData) -> float:
    """Largest error of the mean and covariance, relative to √Σ_ii and √(Σ_ii Σ_jj)."""
    mean, cov = law
    sd = oracle.cov.diag().sqrt()
    return max(
        ((mean - oracle.mean).abs() / sd).max().item(),
        ((cov - oracle.cov).abs() / (sd[:, None] * sd[None, :])).max().item(),
    )


def assert_matches_law(x: torch.Tensor, law, z: float = 5.0) -> None:
    """Empirical mean and covariance within z standard errors of the law's (SE of the
    sample covariance: √((C_ii C_jj + C_ij²)/n), Anderson 2003, Thm. 3.4.4)."""
    mean, cov = law
    n = x.shape[0]
    x = x.reshape(n, -1).double()
    d = cov.diag()
    assert ((x.mean(0) - mean).abs() <= z * (d / n).sqrt()).all(), (x.mean(0), mean)
    se_cov = ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= z * se_cov).all(), (torch.cov(x.T), cov)


# -- timesteps, for any T and any number of steps --------------------------------------------
# The spacings are those of Lin et al. 2024, Table 2, and diffkit's index t is the paper's
# t + 1: the sampler's last update always goes to the clean data (ᾱ = 1, "t = 0" in the
# papers' numbering), whichever timestep it visited last. 'trailing' therefore visits
# 999, 899, …, 99 for T = 1000 and 10 steps and then lands on clean data, as in Lin et al.;
# it is not changed to end on index 0, which would only add a nearly clean step.
@SETTINGS
@given(T=st.integers(2, 1500), data=st.data())
def test_timesteps_properties_for_any_T_and_steps(T, data):
    sch = Schedule(torch.linspace(0.999, 1e-3, T, dtype=F64))
    steps = data.draw(st.integers(1, T), label="steps")
    for spacing in TIMESTEP_SPACINGS:
        ts = sch.timesteps(steps, spacing)
        assert len(ts) == steps
        assert all(0 <= t <= T - 1 for t in ts)
        assert all(a > b for a, b in zip(ts, ts[1:])), f"{spacing} not strictly decreasing: {ts}"
        if spacing in ("linspace", "trailing"):
            assert ts[0] == T - 1  # not 980 for T = 1000: the first step sees pure noise
        if spacing == "leading" or (spacing == "linspace" and steps > 1):
            assert ts[-1] == 0
        if spacing == "trailing":  # even strides of T/steps, rounded: no step longer than ⌈T/steps⌉
            assert ts[-1] <= math.ceil(T / steps) - 1
            assert all(a - b <= math.ceil(T / steps) for a, b in zip(ts, ts[1:]))
        if steps == T:
            assert ts == list(range(T - 1, -1, -1))


class PointMass:
    """Data that is a single point μ: then x̂_0 = μ exactly at every t, and a
    deterministic sampler started from x = √ᾱ_{t_0} μ + √(1 − ᾱ_{t_0}) z must pass
    through x_s = √ᾱ_s μ + √(1 − ᾱ_s) z at every visited s and end on μ (ᾱ = 1). Any
    ᾱ read from a wrong index breaks that identity."""

    def __init__(self, sch: Schedule) -> None:
        self.mu = torch.tensor([0.7, -1.3], dtype=F64)
        self.predict = GaussianData(self.mu, torch.zeros(2, 2, dtype=F64)).predict(sch)
        self.calls: list[int] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        return self.predict(x_t, t)


@SETTINGS
@given(T=st.integers(2, 400), data=st.data())
def test_every_sampler_steps_from_each_timestep_to_the_next_and_ends_on_clean_data(T, data):
    """For every sampler and spacing: the network is called once per visited timestep, in
    order; the callback sees the start and then exactly the next visited timestep after
    each step, ending with −1 (clean); the deterministic samplers use ᾱ of that next
    timestep (the point-mass identity above) and land on the data exactly; DDPM's last
    step (posterior mean with ᾱ_s = 1, no noise) lands on it too."""
    sch = Schedule(torch.linspace(0.999, 1e-3, T, dtype=F64))
    steps = data.draw(st.integers(1, T), label="steps")
    spacing = data.draw(st.sampled_from(TIMESTEP_SPACINGS), label="spacing")
    t_start = data.draw(st.none() | st.integers(0, T - 1), label="t_start")
    name = data.draw(st.sampled_from(SAMPLERS), label="sampler")
    ts = sch.timesteps(steps, spacing, start=t_start)
    abar = {t: sch.alphas_cumprod[t].item() for t in ts} | {-1: 1.0}
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(T), dtype=F64)
    oracle = PointMass(sch)
    seen: list[tuple[int, torch.Tensor]] = []
    x_start = math.sqrt(abar[ts[0]]) * oracle.mu + math.sqrt(1 - abar[ts[0]]) * z
    out = sampler(name, spacing=spacing)(
        oracle,
        sch,
        (6, 2),
        generator=torch.Generator().manual_seed(0),
        steps=steps,
        dtype=F64,
        x_start=x_start,
        t_start=t_start,
        callback=lambda t, x: seen.append((t, x.clone())),
    )
    assert oracle.calls == ts
    assert [t for t, _ in seen] == ts + [-1]
    torch.testing.assert_close(out, oracle.mu.expand(6, 2), rtol=0, atol=1e-9)
    if name != "ddpm":
        for t, x in seen:
            expected = math.sqrt(abar[t]) * oracle.mu + math.sqrt(1 - abar[t]) * z
            torch.testing.assert_close(x, expected, rtol=0, atol=1e-9, msg=f"{name}, {spacing}: state at t = {t}")


@pytest.mark.parametrize("config", DETERMINISTIC + [{"type": "ddim", "eta": 0.5}])
def test_sampler_shapes_dtypes_and_the_given_start_is_untouched(config):
    sch = schedule(T=100)
    oracle = GaussianData(torch.zeros(16, dtype=F64), 0.3 * torch.eye(16, dtype=F64), event_shape=(1, 4, 4))
    for dtype in (torch.float32, torch.float64):
        x_start = torch.randn(5, 1, 4, 4, dtype=dtype)
        kept = x_start.clone()
        out = sampler(config)(oracle.predict(sch), sch, (5, 1, 4, 4), steps=10, dtype=dtype, x_start=x_start, t_start=60)
        assert out.shape == (5, 1, 4, 4) and out.dtype == dtype and torch.isfinite(out).all()
        assert torch.equal(x_start, kept)
        fresh = sampler(config)(oracle.predict(sch), sch, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
        assert fresh.shape == (5, 1, 4, 4) and fresh.dtype == torch.float32


@pytest.mark.parametrize("name, default", [("ddim", 50), ("dpm-solver", 20)])
def test_default_steps_are_few_and_never_more_than_T(name, default):
    for T, expected in ((1000, default), (10, 10)):
        sch = Schedule(torch.linspace(0.99, 0.01, T, dtype=F64))
        calls = []
        sampler(name)(lambda x, t: calls.append(t) or torch.zeros_like(x), sch, (2, 2))
        assert len(calls) == expected


def test_sampler_steps_above_T_are_rejected_when_the_spec_is_validated():
    base = {"data": {"type": "moons"}, "schedule": {"type": "linear", "timesteps": 100}, "denoiser": {"type": "mlp"}}
    for name in ("ddim", "dpm-solver"):
        validate_spec({**base, "sampler": {"type": name, "steps": 100}})
        with pytest.raises(SpecError, match="sampler.steps"):
            validate_spec({**base, "sampler": {"type": name, "steps": 101}})
    with pytest.raises(SpecError, match="sampler.eta"):
        validate_spec({**base, "sampler": {"type": "ddim", "eta": -0.1}})


# -- DDIM --------------------------------------------------------------------------------------
def test_ddim_eta0_is_deterministic_and_draws_no_noise():
    sch = schedule()
    oracle = GaussianData(MEAN, COV)
    x_start = torch.randn(100, 2, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        state = g.get_state()
        outs.append(sampler("ddim")(oracle.predict(sch), sch, (100, 2), generator=g, steps=30, x_start=x_start))
        assert torch.equal(g.get_state(), state)  # no random number was drawn
    assert torch.equal(*outs)


# Discretisation budgets from affine_law for this Σ (linear schedule, exact start):
# DDIM is first order, 4.3e-3 with all 1000 steps (2.6 % with 160 steps); the mean
# error from starting at N(0, I) instead of the exact marginal is √ᾱ_{T−1} |μ| ≈ 1e-2.
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_eta0_maps_the_gaussian_prior_to_the_data_gaussian(kind):
    sch = schedule(kind)
    oracle = GaussianData(MEAN, COV)
    smp = sampler("ddim")
    law = affine_law(smp, oracle, sch, steps=1000)
    assert law_error(law, oracle) < 5e-3
    # the prior the sampler really starts from, N(0, I)
    with torch.inference_mode():
        x = smp(oracle.predict(sch), sch, (20_000, 2), generator=torch.Generator().manual_seed(2), steps=1000)
    assert_matches_law(x, (law[0], law[1]), z=5.0 + 6.0)  # + the prior mismatch, ≤ 1e-2 ≈ 6 SE of the mean
    assert ((x.double().mean(0) - MEAN).abs() < 0.03).all()
    sd = COV.diag().sqrt()
    assert ((torch.cov(x.double().T) - COV).abs() / (sd[:, None] * sd[None, :]) < 0.04).all()


@pytest.mark.parametrize("steps, spacing", [(200, "linspace"), (37, "linspace"), (20, "trailing"), (20, "leading")])
def test_ddim_eta1_is_the_ancestral_sampler(steps, spacing):
    """With η = 1, σ² = β̃ and √(1 − ᾱ_s − σ²) ε̂ + √ᾱ_s x̂_0 is the posterior mean
    (Song et al. 2021, Sec. 4.1), and the noise is drawn in the same order: DDIM(η = 1)
    and DDPM(β̃) give the same samples from the same generator."""
    sch = schedule(T=200)
    oracle = GaussianData(MEAN, COV)
    kw = dict(steps=steps, dtype=F64)
    a = sampler("ddim", eta=1.0, spacing=spacing)(
        oracle.predict(sch), sch, (500, 2), generator=torch.Generator().manual_seed(3), **kw
    )
    b = sampler("ddpm", variance="posterior", spacing=spacing)(
        oracle.predict(sch), sch, (500, 2), generator=torch.Generator().manual_seed(3), **kw
    )
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_eta_between_interpolates_the_noise():
    """0 < η < 1 is random, but the law with the exact denoiser still recovers the data."""
    sch = schedule()
    oracle = GaussianData(MEAN, COV)
    x = sampler("ddim", eta=0.5)(oracle.predict(sch), sch, (20_000, 2), generator=torch.Generator().manual_seed(4), steps=200)
    assert ((x.double().mean(0) - MEAN).abs() < 0.05).all()
    sd = COV.diag().sqrt()
    assert ((torch.cov(x.double().T) - COV).abs() / (sd[:, None] * sd[None, :]) < 0.06).all()


# -- DPM-Solver --------------------------------------------------------------------------------
def test_dpm_solver_first_order_is_ddim():
    sch = schedule("cosine")
    oracle = GaussianData(MEAN, COV)
    x_start = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    for spacing in TIMESTEP_SPACINGS:
        kw = dict(steps=15, dtype=F64, x_start=x_start)
        a = sampler("dpm-solver", order=1, spacing=spacing)(oracle.predict(sch), sch, (64, 2), **kw)
        b = sampler("ddim", spacing=spacing)(oracle.predict(sch), sch, (64, 2), **kw)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_dpm_solver_is_second_order(kind, spacing):
    """With the exact denoiser, the error of DPM-Solver++ 2M's output law falls with every
    doubling of the steps, at an average order near 2 (DDIM's is 1). Measured from 20 to
    160 steps: orders 1.64 (linear, trailing), 1.88 (linear, linspace), 1.85 (cosine,
    trailing), 2.1 (cosine, linspace); each doubling cuts the error 2.6× or more."""
    sch = schedule(kind)
    oracle = GaussianData(MEAN, COV)

    def errors(name: str) -> list[float]:
        smp = sampler(name, spacing=spacing)
        return [law_error(affine_law(smp, oracle, sch, s), oracle) for s in (20, 40, 80, 160)]

    dpm, ddim = errors("dpm-solver"), errors("ddim")
    assert all(a / b > 2.5 for a, b in zip(dpm, dpm[1:])), dpm
    assert math.log2(dpm[0] / dpm[-1]) / 3 > 1.6, dpm
    assert 0.9 < math.log2(ddim[0] / ddim[-1]) / 3 < 1.1, ddim
    assert dpm[-1] < ddim[-1] / 4


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpm_solver_is_accurate_in_few_steps(kind):
    """At its default 20 trailing steps the exact law is within 3 % of the data (DDIM:
    19 % / 13 %), and 20,000 draws from N(0, I) match that law."""
    sch = schedule(kind)
    oracle = GaussianData(MEAN, COV)
    smp = sampler("dpm-solver")
    law = affine_law(smp, oracle, sch, steps=20)
    assert law_error(law, oracle) < 0.03
    assert law_error(affine_law(sampler("ddim"), oracle, sch, steps=20), oracle) > 5 * law_error(law, oracle)
    with torch.inference_mode():
        x = smp(oracle.predict(sch), sch, (20_000, 2), generator=torch.Generator().manual_seed(6), steps=20)
    assert_matches_law(x, law, z=5.0 + 6.0)  # + the prior mismatch, as for DDIM


def test_dpm_solver_from_a_partly_noised_start():
    """SDEdit's entry point: from the exact marginal at t_start = 500, 10 steps below it."""
    sch = schedule()
    oracle = GaussianData(MEAN, COV)
    law = affine_law(sampler("dpm-solver"), oracle, sch, steps=20, t_start=500)
    assert law_error(law, oracle) < 0.03


# -- the x0 and v objectives -------------------------------------------------------------------
def objective(name: str, **params):
    return REGISTRY.build("objective", {"type": name, **params})


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["epsilon", "x0", "v"]),
    shape=st.sampled_from([(7, 2), (3, 1, 4, 4), (2, 3, 2, 5)]),
    kind=st.sampled_from(["linear", "cosine"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_objective_conversions_round_trip(name, shape, kind, seed):
    """The network output that equals the target converts back to the true ε and x_0,
    and to the true score of the one-point posterior, −ε/σ_t (float64)."""
    sch = schedule(kind)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.randint(0, sch.T, (shape[0],), generator=g)
    x_t = sch.q_sample(x0, t, eps)
    obj = objective(name)
    out = obj.target(x0, eps, x_t, t, sch)
    assert out.shape == x0.shape
    torch.testing.assert_close(obj.to_eps(out, x_t, t, sch), eps, rtol=1e-6, atol=1e-6)
    # x̂_0 from ε divides by √ᾱ_t (small at large t); tolerances scale with 1/√ᾱ_t
    scale = 1 / sch.alpha_bar(t, x0).sqrt()
    assert ((obj.to_x0(out, x_t, t, sch) - x0).abs() <= 1e-6 * scale).all()
    torch.testing.assert_close(obj.to_score(out, x_t, t, sch), -eps / sch.alpha_bar(t, x0).neg().add(1).sqrt())
    if name == "v":
        torch.testing.assert_close(out, D.x0_eps_to_v(x0, eps, sch.alpha_bar(t, x0)))


@pytest.mark.parametrize("name", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("gamma", [None, 1.0, 5.0])
def test_min_snr_weight_is_the_same_x0_space_weight_for_every_target(name, gamma):
    """Hang et al. 2023: every objective with min-SNR-γ weighs the x̂_0 error by
    min(SNR, γ). Give each a network whose x̂_0 is off by δ: its weighted squared error
    in its own target must be min(SNR, γ)·‖δ‖² (or SNR·‖δ‖², ε's unweighted loss,
    converted to the other targets' scale, for γ = None only for ε)."""
    sch = schedule("cosine", 200)
    g = torch.Generator().manual_seed(7)
    n = 64
    x0, eps, delta = (torch.randn(n, 3, generator=g, dtype=F64) for _ in range(3))
    t = torch.randint(0, sch.T, (n,), generator=g)
    x_t = sch.q_sample(x0, t, eps)
    a = sch.alpha_bar(t, x0)
    x0_hat = x0 + delta
    eps_hat = D.x0_to_eps(x0_hat, x_t, a)
    output = {"epsilon": eps_hat, "x0": x0_hat, "v": D.x0_eps_to_v(x0_hat, eps_hat, a)}[name]
    obj = objective(name, min_snr_gamma=gamma)
    per_sample = (output - obj.target(x0, eps, x_t, t, sch)).square().sum(1)
    w = obj.weight(t, sch, x0)
    snr = sch.snr[t]
    if gamma is None:
        assert w is None
        factor = {"epsilon": snr, "x0": torch.ones_like(snr), "v": snr + 1}[name]
        torch.testing.assert_close(per_sample, factor * delta.square().sum(1))
    else:
        assert w.shape == (n,) and w.dtype == F64
        torch.testing.assert_close(w * per_sample, snr.clamp(max=gamma) * delta.square().sum(1))


def test_min_snr_weight_formulas_and_errors():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0], dtype=F64)
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "eps"), torch.tensor([1.0, 1.0, 1.0, 0.05], dtype=F64))
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "x0"), torch.tensor([0.01, 1.0, 5.0, 5.0], dtype=F64))
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "v"), torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101], dtype=F64))
    with pytest.raises(ValueError, match="targets"):
        D.min_snr_weight(snr, 5.0, "score")
    with pytest.raises(ValueError, match="positive"):
        D.min_snr_weight(snr, 0.0, "eps")
    base = {"data": {"type": "moons"}, "denoiser": {"type": "mlp"}}
    assert validate_spec({**base, "objective": {"type": "v", "min_snr_gamma": 5}}).objective.min_snr_gamma == 5
    with pytest.raises(SpecError, match="objective.min_snr_gamma"):
        validate_spec({**base, "objective": {"type": "x0", "min_snr_gamma": 0}})


def test_min_snr_needs_to_know_the_target():
    class Score(diffkit.Objective):  # a third-party objective that names no parameterization
        def target(self, x0, eps, x_t, t, schedule):
            return eps

        def to_eps(self, output, x_t, t, schedule):
            return output

    assert Score().weight(torch.tensor([1]), schedule(T=10), torch.zeros(1, 2)) is None
    with pytest.raises(ValueError, match="parameterization"):
        Score(min_snr_gamma=5.0)


@pytest.mark.parametrize("name", ["x0", "v"])
def test_pipelines_train_and_sample_with_the_new_objectives(name):
    """A few optimiser steps with min-SNR weighting run, lower the loss, and the trained
    pipeline samples through every sampler."""
    pipe = diffkit.Pipeline(
        schedule={"type": "cosine", "timesteps": 100},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        objective={"type": name, "min_snr_gamma": 5.0},
        data={"type": "gaussians", "components": 2, "n": 512},
        train={"steps": 60, "batch_size": 128, "preview": 0, "device": "cpu", "log_every": 10, "lr": 3e-3},
    )
    result = pipe.fit(progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for smp in SAMPLERS:
        x = pipe.sample(50, seed=0, sampler=smp, steps=10)
        assert x.shape == (50, 2) and torch.isfinite(x).all()
    assert pipe.spec.objective.min_snr_gamma == 5.0
