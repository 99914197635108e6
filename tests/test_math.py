"""Property tests of the shared diffusion mathematics and the built-in schedules.

Every expected value below is derived independently of the code under test: from
the definitions of the forward process (Ho et al. 2020, Eq. 2 and 4), from direct
Gaussian conditioning, or from the closed forms of the schedules' papers.

Index convention (diffkit.diffusion): index t = 0..T-1 is the paper's step t + 1,
and ᾱ at index -1 is 1 (clean data).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import diffkit
from diffkit import Schedule, SpecError
from diffkit import diffusion as D
from diffkit.interfaces import TIMESTEP_SPACINGS
from diffkit.spec import validate_spec

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REGISTRY = diffkit.get_registry()
F64 = torch.float64


def build_schedule(**config) -> Schedule:
    return REGISTRY.build("schedule", config)


# -- strategies ---------------------------------------------------------------------
# float64 can hold ᾱ only while Σ_t −log(1 − β_t) < ~708 (below that it underflows to
# 0) and only while β_t ≫ 2⁻⁵³ (else 1 − β_t rounds to 1 and ᾱ is not strictly
# decreasing). The strategies stay inside that numerically representable region; what
# happens outside it is the subject of the spec tests at the end.
@st.composite
def linear_params(draw) -> dict:
    T = draw(st.integers(2, 2000))
    # β_end ≤ 1 − e^{−700/T} keeps Σ −log(1 − β_t) ≤ T · (700 / T) = 700.
    hi = min(0.999, -math.expm1(-700.0 / T))
    beta_end = draw(st.floats(1e-10, hi))
    beta_start = draw(st.floats(min(1e-12, beta_end), beta_end))
    return {"type": "linear", "timesteps": T, "beta_start": beta_start, "beta_end": beta_end}


@st.composite
def cosine_params(draw) -> dict:
    T = draw(st.integers(2, 2000))
    s = draw(st.floats(0.0, 1.0))
    max_beta = draw(st.one_of(st.just(0.999), st.floats(1e-6, 0.999)))
    return {"type": "cosine", "timesteps": T, "s": s, "max_beta": max_beta}


schedule_params = st.one_of(linear_params(), cosine_params())


def cosine_f(t: float, T: int, s: float) -> float:
    """f(t) = cos²(π/2 · (t/T + s)/(1 + s))  (Nichol & Dhariwal 2021, Eq. 17)."""
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


# -- schedules: shape of ᾱ, β, SNR ---------------------------------------------------
@SETTINGS
@given(schedule_params)
def test_schedule_quantities_are_in_range_and_monotone(params):
    sch = build_schedule(**params)
    abar, betas, snr = sch.alphas_cumprod, sch.betas, sch.snr
    assert abar.dtype == F64 and sch.T == params["timesteps"] == abar.numel()
    assert ((abar > 0) & (abar < 1)).all()
    assert (abar[1:] < abar[:-1]).all(), "ᾱ_t must be strictly decreasing"
    assert ((betas > 0) & (betas < 1)).all()
    assert (snr[1:] < snr[:-1]).all(), "SNR must be strictly decreasing"
    # the derived quantities agree with their definitions
    torch.testing.assert_close(sch.sigmas, (1 - abar).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(snr, abar / (1 - abar), rtol=1e-12, atol=0)
    torch.testing.assert_close(sch.alphas_cumprod_prev[1:], abar[:-1], rtol=0, atol=0)
    assert sch.alphas_cumprod_prev[0].item() == 1.0


@SETTINGS
@given(linear_params())
@example({"type": "linear", "timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02})
@example({"type": "linear", "timesteps": 2, "beta_start": 0.3, "beta_end": 0.3})
def test_linear_betas_are_linear_with_the_given_endpoints(params):
    sch = build_schedule(**params)
    T, b0, b1 = params["timesteps"], params["beta_start"], params["beta_end"]
    betas = sch.betas  # recovered from ᾱ as 1 − ᾱ_t/ᾱ_{t−1}: absolute error ~ a few ulp of 1
    tol = dict(rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(betas[0], torch.tensor(b0, dtype=F64), **tol)
    torch.testing.assert_close(betas[-1], torch.tensor(b1, dtype=F64), **tol)
    # linear: β_t = β_0 + t (β_end − β_0)/(T − 1)
    expected = b0 + torch.arange(T, dtype=F64) * ((b1 - b0) / (T - 1))
    torch.testing.assert_close(betas, expected, **tol)


@SETTINGS
@given(cosine_params())
@example({"type": "cosine", "timesteps": 1000, "s": 0.008, "max_beta": 0.999})
@example({"type": "cosine", "timesteps": 2, "s": 0.0, "max_beta": 0.999})
def test_cosine_matches_its_closed_form(params):
    sch = build_schedule(**params)
    T, s, max_beta = params["timesteps"], params["s"], params["max_beta"]
    f = [cosine_f(t, T, s) for t in range(T + 1)]
    # index t is the paper's step t + 1: ᾱ_t = f(t + 1)/f(0), β_t = 1 − f(t + 1)/f(t),
    # and the schedule clips β_t at max_beta (Nichol & Dhariwal 2021, Sec. 3.2).
    beta_closed = torch.tensor([1 - f[t + 1] / f[t] for t in range(T)], dtype=F64)
    torch.testing.assert_close(sch.betas, beta_closed.clamp(max=max_beta), rtol=1e-9, atol=1e-12)
    # before the first clipped step ᾱ is the closed form itself
    clipped = (beta_closed > max_beta).nonzero()
    first = clipped[0].item() if clipped.numel() else T
    abar_closed = torch.tensor([f[t + 1] / f[0] for t in range(first)], dtype=F64)
    torch.testing.assert_close(sch.alphas_cumprod[:first], abar_closed, rtol=1e-9, atol=0)
    # the last step always reaches f(T) = cos²(π/2) ≈ 0, so it is always clipped
    assert sch.betas[-1].item() == pytest.approx(max_beta, rel=1e-9)


# -- the forward process: composing one-step kernels ---------------------------------
@SETTINGS
@given(schedule_params)
def test_one_step_kernels_compose_to_the_marginal(params):
    """q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t) composed from x_0: by induction the mean
    is (∏_{i≤t} √α_i) x_0 and the variance follows v_t = α_t v_{t−1} + β_t, v_{−1} = 0;
    both must equal the closed form N(√ᾱ_t x_0, 1 − ᾱ_t) (Ho et al. 2020, Eq. 4)."""
    sch = build_schedule(**params)
    alphas, betas, abar = sch.alphas, sch.betas, sch.alphas_cumprod
    torch.testing.assert_close(torch.cumprod(alphas.sqrt(), 0), abar.sqrt(), rtol=1e-10, atol=0)
    v, var = 0.0, []
    for a, b in zip(alphas.tolist(), betas.tolist()):
        v = a * v + b
        var.append(v)
    # ᾱ from a cumulative product carries up to ~T ulp of 1 of absolute error, and so
    # does the sum v accumulated over T steps: allow 4·T·2⁻⁵² absolute
    torch.testing.assert_close(torch.tensor(var, dtype=F64), 1 - abar, rtol=1e-10, atol=4 * sch.T * 2.0**-52)


def test_composed_one_step_draws_match_q_sample():
    """Monte Carlo: k ancestral one-step draws from x_0 vs Schedule.q_sample at t = k−1,
    compared in mean and variance per coordinate (independent noise for each)."""
    sch = build_schedule(type="linear", timesteps=1000)
    g = torch.Generator().manual_seed(1234)
    n, k = 50_000, 300
    x0 = torch.tensor([-1.5, 0.0, 2.0], dtype=F64).expand(n, 3)
    x = x0.clone()
    for a, b in zip(sch.alphas[:k].tolist(), sch.betas[:k].tolist()):
        x = math.sqrt(a) * x + math.sqrt(b) * torch.randn(x.shape, generator=g, dtype=F64)
    t = torch.full((n,), k - 1)
    y = sch.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=F64))
    abar = sch.alphas_cumprod[k - 1].item()
    mean, var = math.sqrt(abar) * x0[0], 1 - abar
    for draws in (x, y):
        # 5 standard errors: SE(mean) = √(v/n), SE(sample variance) = v √(2/(n−1))
        assert ((draws.mean(0) - mean).abs() <= 5 * math.sqrt(var / n)).all()
        assert ((draws.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (n - 1))).all()
    # two-sample: the difference of means has SE √(2v/n)
    assert ((x.mean(0) - y.mean(0)).abs() <= 5 * math.sqrt(2 * var / n)).all()


# -- the posterior q(x_s | x_t, x_0) -------------------------------------------------
def conditioned(abar_s: torch.Tensor, abar_t: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor):
    """q(x_s | x_t, x_0) by conditioning the joint Gaussian of (x_s, x_t) given x_0.

    x_s = √ᾱ_s x_0 + √(1−ᾱ_s) ε₁ and x_t = √α_{t|s} x_s + √(1−α_{t|s}) ε₂ with
    α_{t|s} = ᾱ_t/ᾱ_s, so per coordinate
        E x_s = √ᾱ_s x_0,  Var x_s = 1 − ᾱ_s,  E x_t = √ᾱ_t x_0,  Var x_t = 1 − ᾱ_t,
        Cov(x_s, x_t) = √α_{t|s} (1 − ᾱ_s),
    and the Gaussian conditional is E x_s + C/Var x_t · (x_t − E x_t), Var x_s − C²/Var x_t
    (Bishop 2006, Eq. 2.81–2.82)."""
    vs, vt = 1 - abar_s, 1 - abar_t
    cov = (abar_t / abar_s).sqrt() * vs
    mean = abar_s.sqrt() * x0 + cov / vt * (x_t - abar_t.sqrt() * x0)
    var = vs - cov**2 / vt
    return mean, var, vs


@SETTINGS
@given(schedule_params, st.data())
def test_posterior_equals_gaussian_conditioning(params, data):
    sch = build_schedule(**params)
    T = sch.T
    B = data.draw(st.integers(1, 8), label="batch")
    t = torch.tensor(data.draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B), label="t"))
    # s = t − 1 by default; else any s in [−1, t − 1] (−1 is the clean data)
    use_s = data.draw(st.booleans(), label="explicit s")
    if use_s:
        s = torch.tensor([data.draw(st.integers(-1, ti - 1), label="s") for ti in t.tolist()])
    else:
        s = t - 1
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    x0 = torch.randn(B, 3, generator=g, dtype=F64)
    x_t = torch.randn(B, 3, generator=g, dtype=F64) * 2
    mean, var = sch.posterior(x0, x_t, t, s) if use_s else sch.posterior(x0, x_t, t)

    abar_ext = torch.cat([torch.ones(1, dtype=F64), sch.alphas_cumprod])
    a_s, a_t = abar_ext[s + 1][:, None], abar_ext[t + 1][:, None]
    ref_mean, ref_var, vs = conditioned(a_s, a_t, x0, x_t)
    # Rounding: both sides form differences of numbers near 1 (1 − ᾱ_t, 1 − ᾱ_t/ᾱ_s, or
    # Var x_s − C²/Var x_t), each good to a few ulp of 1, so their relative error is
    # ~ulp/(the smaller of 1 − ᾱ_t and β_{t|s}); a formula error would be O(1) relative.
    beta_ts = 1 - a_t / a_s
    kappa = 2.0**-52 / torch.minimum(beta_ts, 1 - a_t)
    var = var.expand_as(ref_var)
    assert ((mean - ref_mean).abs() <= 1e-10 * ref_mean.abs() + 1e-12 + 32 * kappa * (x0.abs() + x_t.abs())).all()
    var_tol = (1e-10 + 32 * kappa) * ref_var.abs() + 4 * 2.0**-52 * vs
    assert ((var - ref_var).abs() <= var_tol).all()
    if not use_s:
        # s = t − 1: β̃_t of Ho et al. 2020, Eq. 7, as tabulated by the schedule
        assert ((var - sch.posterior_variance[t][:, None]).abs() <= var_tol).all()
    # s = −1 means x_0 is known: the posterior is the point mass at x_0
    clean = s == -1
    if clean.any():
        torch.testing.assert_close(mean[clean], x0[clean], rtol=0, atol=1e-12)
        assert (var[clean] == 0).all()


def test_posterior_coefficients_are_float64_even_for_float32_data():
    """Coefficients are formed from float64 ᾱ and only then cast: for float32 data the
    result is the float64 result up to float32 rounding (a few ulp), not the ~1e-4
    relative error of forming 1 − ᾱ_t or ᾱ_t/ᾱ_s in float32 when ᾱ is close to 1."""
    sch = build_schedule(type="linear", timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, x_t, eps = (torch.randn(4, 3, generator=g) for _ in range(3))
    t = torch.tensor([0, 1, 10, 999])
    mean32, var32 = sch.posterior(x0, x_t, t)
    mean64, var64 = sch.posterior(x0.double(), x_t.double(), t)
    assert mean32.dtype == var32.dtype == torch.float32
    torch.testing.assert_close(var32, var64.float(), rtol=2e-6, atol=0)
    torch.testing.assert_close(mean32, mean64.float(), rtol=2e-6, atol=1e-6)
    # q_sample's two terms separately (together the small noise term of t = 0 would
    # hide under the rounding of the data term)
    zeros = torch.zeros_like(x0)
    for data, noise in ((x0, zeros), (zeros, eps)):
        q32, q64 = sch.q_sample(data, t, noise), sch.q_sample(data.double(), t, noise.double())
        assert q32.dtype == torch.float32
        torch.testing.assert_close(q32, q64.float(), rtol=2e-6, atol=1e-30)
    a = sch.alpha_bar(t, x_t)
    score32 = D.eps_to_score(eps, a)
    assert score32.dtype == torch.float32
    torch.testing.assert_close(score32, D.eps_to_score(eps.double(), a).float(), rtol=2e-6, atol=0)


# -- conversions between ε, x_0, score and v -----------------------------------------
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@SETTINGS
@given(shapes, st.integers(0, 2**31 - 1))
def test_conversions_round_trip(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    # ᾱ per sample in [1e-4, 1 − 1e-4]: the conversions divide by √ᾱ and √(1 − ᾱ)
    abar = D.expand_like(1e-4 + (1 - 2e-4) * torch.rand(shape[0], generator=g, dtype=F64), x0)
    x_t = D.q_sample(x0, abar, eps)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(D.eps_to_x0(eps, x_t, abar), x0, **tol)
    torch.testing.assert_close(D.x0_to_eps(x0, x_t, abar), eps, **tol)
    score = D.eps_to_score(eps, abar)
    torch.testing.assert_close(score, -eps / (1 - abar).sqrt(), **tol)
    torch.testing.assert_close(D.score_to_eps(score, abar), eps, **tol)
    v = D.x0_eps_to_v(x0, eps, abar)
    torch.testing.assert_close(D.v_to_eps(v, x_t, abar), eps, **tol)
    torch.testing.assert_close(D.v_to_x0(v, x_t, abar), x0, **tol)
    # (x_t, v) is a rotation of (x_0, ε) by the angle φ with cos φ = √ᾱ: norms are kept
    torch.testing.assert_close(x_t.square() + v.square(), x0.square() + eps.square(), **tol)


@SETTINGS
@given(st.lists(st.integers(1, 3), min_size=1, max_size=6).map(tuple), st.integers(0, 2**31 - 1))
def test_expand_like_broadcasts_per_sample(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=F64)
    v = torch.randn(shape[0], generator=g, dtype=F64)
    e = D.expand_like(v, x)
    assert e.shape == (shape[0],) + (1,) * (len(shape) - 1)
    prod = e * x
    assert prod.shape == x.shape
    for b in range(shape[0]):
        assert torch.equal(prod[b], v[b] * x[b])
    assert D.expand_like(torch.tensor(2.0), x).shape == (1,) * len(shape)


def test_gather_and_alpha_bar_index_convention():
    sch = build_schedule(type="linear", timesteps=10)
    x = torch.zeros(3, 2, 5, dtype=torch.float32)
    t = torch.tensor([0, 4, 9])
    got = D.gather(sch.alphas_cumprod, t, x)
    assert got.shape == (3, 1, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.flatten(), sch.alphas_cumprod[t].float())
    a = sch.alpha_bar(torch.tensor([-1, 0, 9]), x.double())
    assert a.shape == (3, 1, 1)
    assert a[0].item() == 1.0  # t = −1 is the clean data
    assert a[1].item() == sch.alphas_cumprod[0].item() == 1 - sch.betas[0].item()
    assert a[2].item() == sch.alphas_cumprod[-1].item()


# -- Schedule validation -------------------------------------------------------------
@pytest.mark.parametrize(
    "abar, message",
    [
        ([0.9, 0.95, 0.5], "strictly decreasing"),
        ([0.9, 0.9], "strictly decreasing"),
        ([1.0, 0.5], "strictly inside"),
        ([0.5, 0.0], "strictly inside"),
        ([0.5, -0.1], "strictly inside"),
        ([1.5, 0.5], "strictly inside"),
        ([0.9, float("nan")], "strictly inside"),
        ([0.9, float("inf")], "strictly inside"),
        ([0.5], "at least 2"),
        ([[0.9, 0.5]], "1-D"),
    ],
)
def test_schedule_rejects_invalid_alpha_bar(abar, message):
    with pytest.raises(ValueError, match=message):
        Schedule(torch.tensor(abar, dtype=F64))


@SETTINGS
@given(st.integers(3, 200), st.data())
def test_schedule_rejects_any_non_monotone_alpha_bar(T, data):
    abar = torch.linspace(0.99, 0.01, T, dtype=F64)
    Schedule(abar)  # the strictly decreasing original is accepted
    i = data.draw(st.integers(1, T - 1), label="i")
    bad = abar.clone()
    bad[i] = data.draw(st.floats(abar[i - 1].item(), 0.999), label="value")  # ≥ its predecessor
    with pytest.raises(ValueError, match="strictly decreasing"):
        Schedule(bad)


# -- timesteps -----------------------------------------------------------------------
@SETTINGS
@given(st.integers(2, 3000), st.data())
def test_timesteps_properties(T, data):
    sch = Schedule(torch.linspace(0.999, 1e-3, T, dtype=F64))
    steps = data.draw(st.integers(1, T), label="steps")
    for spacing in TIMESTEP_SPACINGS:
        ts = sch.timesteps(steps, spacing)
        assert isinstance(ts, list) and all(isinstance(t, int) for t in ts)
        assert len(ts) == steps, spacing
        assert all(0 <= t <= T - 1 for t in ts), spacing
        assert all(a > b for a, b in zip(ts, ts[1:])), f"{spacing} not strictly decreasing: {ts}"
        if spacing != "leading":
            assert ts[0] == T - 1, spacing
        if spacing != "trailing" and (spacing == "leading" or steps >= 2):
            # (one linspace step cannot both start at T−1 and end at 0: it starts at T−1)
            assert ts[-1] == 0, spacing
        if steps == T:
            assert ts == list(range(T - 1, -1, -1)), spacing
    assert sch.timesteps() == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError, match="steps must be between 1"):
        sch.timesteps(T + data.draw(st.integers(1, 10), label="excess"))
    with pytest.raises(ValueError, match="steps must be between 1"):
        sch.timesteps(data.draw(st.integers(-5, 0), label="nonpositive"))


@SETTINGS
@given(st.integers(2, 3000), st.data())
def test_timesteps_from_a_start(T, data):
    """``start`` begins the walk at that timestep, then follows the visited timesteps
    below it (for samplers that start from a partly noised input)."""
    sch = Schedule(torch.linspace(0.999, 1e-3, T, dtype=F64))
    steps = data.draw(st.integers(1, T), label="steps")
    start = data.draw(st.integers(0, T - 1), label="start")
    for spacing in TIMESTEP_SPACINGS:
        full = sch.timesteps(steps, spacing)
        ts = sch.timesteps(steps, spacing, start=start)
        assert ts == [start] + [t for t in full if t < start]
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="start"):
        sch.timesteps(steps, start=T + data.draw(st.integers(0, 5), label="past the end"))
    with pytest.raises(ValueError, match="start"):
        sch.timesteps(steps, start=-1 - data.draw(st.integers(0, 5), label="negative"))


@pytest.mark.parametrize(
    "T, steps, spacing, expected",
    [
        # Lin et al. 2024, Table 2 (T = 1000, 10 steps), shifted from 1-based to 0-based
        (1000, 10, "linspace", [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        (1000, 10, "leading", [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        (1000, 10, "trailing", [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        # non-integer T/steps: trailing rounds T − i·T/steps to the nearest integer
        # (as diffusers' `trailing` does): 1000, 666.7, 333.3 -> 999, 666, 332
        (1000, 3, "trailing", [999, 666, 332]),
        (1000, 3, "linspace", [999, 500, 0]),
        (1000, 3, "leading", [666, 333, 0]),
        (10, 4, "linspace", [9, 6, 3, 0]),
        (10, 4, "leading", [6, 4, 2, 0]),
        (10, 4, "trailing", [9, 7, 4, 1]),  # 10, 7.5, 5, 2.5 -> round half to even: 10, 8, 5, 2
    ],
)
def test_timesteps_reference_values(T, steps, spacing, expected):
    sch = Schedule(torch.linspace(0.999, 1e-3, T, dtype=F64))
    assert sch.timesteps(steps, spacing) == expected


@SETTINGS
@given(st.integers(2, 3000), st.data())
def test_timesteps_crowded_towards_the_clean_end(T, data):
    """``quadratic`` visits round((T−1)(1 − i/(S−1))²) and ``logsnr`` the timestep nearest
    in λ = ½ log SNR to S values evenly spaced from λ_{T−1} to λ_0, wherever rounding
    leaves them distinct; where it does not, the result is still S distinct timesteps
    from T−1 down to 0."""
    sch = build_schedule(type=data.draw(st.sampled_from(["linear", "cosine"]), label="schedule"), timesteps=T)
    steps = data.draw(st.integers(2, T), label="steps")
    lam = 0.5 * sch.snr.double().log()
    lam_targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=F64)
    nearest = [int((lam - v).abs().argmin()) for v in lam_targets.tolist()]
    quad = ((T - 1) * torch.linspace(1, 0, steps, dtype=F64).square()).round().long().tolist()
    for spacing, plain in (("quadratic", quad), ("logsnr", nearest)):
        ts = sch.timesteps(steps, spacing)
        assert len(set(ts)) == steps and ts[0] == T - 1 and ts[-1] == 0, spacing
        if len(set(plain)) == steps:
            if spacing == "logsnr":  # nearest in λ, up to ties
                assert all(abs(lam[t] - v) <= abs(lam[p] - v) + 1e-12 for t, p, v in zip(ts, plain, lam_targets)), ts
            else:
                assert ts == plain


def test_timesteps_crowded_reference_values():
    sch = build_schedule(type="linear", timesteps=1000)
    assert sch.timesteps(10, "quadratic") == [999, 789, 604, 444, 308, 197, 111, 49, 12, 0]
    ts = sch.timesteps(10, "logsnr")
    lam = 0.5 * sch.snr.double().log()[ts]
    # λ rises by (λ_0 − λ_999)/9 ≈ 1.08 per step
    gaps = (lam[1:] - lam[:-1]).tolist()
    assert ts[0] == 999 and ts[-1] == 0 and max(abs(g - gaps[0]) for g in gaps) < 0.05, (ts, gaps)


def test_timesteps_rejects_unknown_spacing():
    sch = build_schedule(type="linear", timesteps=10)
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sch.timesteps(5, "uniform")


# -- schedule parameters in a spec ---------------------------------------------------
def spec_with(schedule: dict) -> dict:
    return {"data": {"type": "moons"}, "denoiser": {"type": "mlp"}, "schedule": schedule}


def test_valid_spec_is_accepted():
    spec = validate_spec(spec_with({"type": "linear", "beta_start": 1e-4, "beta_end": 0.02}))
    assert spec.schedule.type == "linear"


@pytest.mark.parametrize(
    "schedule, words",
    [
        ({"type": "linear", "beta_start": 0.02, "beta_end": 1e-4}, ["beta_start", "beta_end"]),
        ({"type": "linear", "beta_start": 0.0}, ["beta_start"]),
        ({"type": "linear", "beta_end": 1.0}, ["beta_end"]),
        ({"type": "linear", "timesteps": 1}, ["timesteps"]),
        ({"type": "cosine", "s": -0.1}, ["s"]),
        ({"type": "cosine", "max_beta": 1.0}, ["max_beta"]),
        ({"type": "cosine", "timesteps": 0}, ["timesteps"]),
    ],
)
def test_invalid_schedule_parameters_are_spec_errors(schedule, words):
    with pytest.raises(SpecError) as info:
        validate_spec(spec_with(schedule))
    err = info.value
    assert [path.split(".")[0] for path, _ in err.problems] == ["schedule"], err.problems
    assert "schedule" in str(err)
    for word in words:
        assert word in str(err)
    # building the component directly reports the same problem under `schedule`
    with pytest.raises(SpecError, match="schedule"):
        REGISTRY.build("schedule", schedule)


@pytest.mark.parametrize(
    "schedule",
    [
        {"type": "linear", "timesteps": 2000, "beta_start": 0.5, "beta_end": 0.9},  # ᾱ_T ≈ e^{−2800}
        {"type": "linear", "timesteps": 10, "beta_start": 1e-17, "beta_end": 1e-17},  # 1 − β == 1
        {"type": "cosine", "timesteps": 1000, "max_beta": 1e-17},  # 1 − β == 1 once clipped
    ],
)
def test_schedule_spec_that_validates_builds(schedule):
    """Parameters valid one by one but giving no representable ᾱ are a SpecError
    naming the schedule at validation, not a bare ValueError when the run builds."""
    with pytest.raises(SpecError) as info:
        validate_spec(spec_with(schedule))
    assert [path for path, _ in info.value.problems] == ["schedule"]


@SETTINGS
@given(
    st.integers(2, 2000),
    st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
)
def test_every_linear_spec_either_builds_or_is_a_spec_error(T, b0, b1):
    """Over the whole parameter domain 0 < β_start ≤ β_end < 1: a spec that validates
    builds a valid Schedule; one that does not is a SpecError naming the schedule."""
    b0, b1 = min(b0, b1), max(b0, b1)
    schedule = {"type": "linear", "timesteps": T, "beta_start": b0, "beta_end": b1}
    try:
        validate_spec(spec_with(schedule))
    except SpecError as err:
        assert [path for path, _ in err.problems] == ["schedule"], err.problems
        return
    sch = REGISTRY.build("schedule", schedule)
    assert sch.T == T and (sch.alphas_cumprod[1:] < sch.alphas_cumprod[:-1]).all()
