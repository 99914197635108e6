"""The variational bound (diffkit.likelihood) against closed forms.

For Gaussian data x_0 ~ N(μ, Σ) and the exact denoiser every term of the bound has a
closed-form expectation (:func:`expected_bound`), so the Monte Carlo estimator is
checked against it (within 5 standard errors), and the closed form itself against the
exact negative log-likelihood: never below it, and close to it for large T.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor, nn

import diffkit
from diffkit import cli
from diffkit.likelihood import (
    bound_terms,
    discretized_gaussian_log_likelihood,
    grid_levels,
    variational_bound,
)
from diffkit.oracles import GaussianData

REGISTRY = diffkit.get_registry()
F64 = torch.float64
MEAN = torch.tensor([1.5, -0.8], dtype=F64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64)  # eigenvalues ≈ 1.40 and 0.10
ORACLE = GaussianData(MEAN, COV)


def linear(T: int):
    return REGISTRY.build("schedule", {"type": "linear", "timesteps": T})


def expected_bound(oracle: GaussianData, schedule, variance: str) -> dict[str, float]:
    """E[L_T], E[Σ L_{t−1}], E[L_0] in nats for x_0 ~ N(μ, Σ) and the exact denoiser.

    In the eigenbasis Σ = U diag(λ) Uᵀ the coordinates are independent, u_0 ~ N(m, λ)
    with m = Uᵀμ. With ᾱ = ᾱ_t and c = ᾱλ + 1 − ᾱ, the exact x̂_0 = E[u_0 | u_t] has
    error variance E(u_0 − x̂_0)² = λ(1 − ᾱ)/c (Gaussian conditioning). Hence

        E L_T     = ½ Σ (ᾱ_{T−1}(m² + λ) − ᾱ_{T−1} − log(1 − ᾱ_{T−1})),
        E L_{t−1} = c_0² Σ λ(1−ᾱ_t)/c / (2σ²) [+ ½ D (r − 1 − log r), r = β̃/β, if σ² = β],
        E L_0     = ½ Σ (λ(1−ᾱ_0)/c / β_0 + log(2π β_0)),

    with c_0 = √ᾱ_{t−1} β_t/(1 − ᾱ_t), σ² = β̃_t or β_t (Ho et al. 2020, Eq. 5–8).
    """
    lam, U = oracle.eigvals, oracle.eigvecs
    m = U.T @ oracle.mean
    D = lam.numel()
    abar = schedule.alphas_cumprod
    prev = schedule.alphas_cumprod_prev
    beta = schedule.betas
    post = schedule.posterior_variance

    def err(a: Tensor) -> Tensor:
        return (lam * (1 - a) / (a * lam + 1 - a)).sum()

    aT = abar[-1]
    L_T = 0.5 * (aT * (m.square() + lam) - aT - torch.log1p(-aT)).sum()
    L_sum = torch.zeros((), dtype=F64)
    for t in range(1, schedule.T):
        c0 = prev[t].sqrt() * beta[t] / (1 - abar[t])
        if variance == "posterior":
            L_sum += c0**2 * err(abar[t]) / (2 * post[t])
        else:
            r = post[t] / beta[t]
            L_sum += 0.5 * D * (r - 1 - r.log()) + c0**2 * err(abar[t]) / (2 * beta[t])
    L_0 = 0.5 * (err(abar[0]) / beta[0] + D * torch.log(2 * math.pi * beta[0]))
    return {"L_T": float(L_T), "L_sum": float(L_sum), "L_0": float(L_0)}


def exact_nll(oracle: GaussianData) -> float:
    """E[−log N(x_0; μ, Σ)] = ½ Σ_i (log 2πλ_i + 1)."""
    return float(0.5 * (torch.log(2 * math.pi * oracle.eigvals) + 1).sum())


def within(estimate: Tensor, expected: float, k: float = 5.0) -> None:
    se = estimate.std().item() / math.sqrt(estimate.numel())
    assert abs(estimate.mean().item() - expected) <= k * se + 1e-9, (estimate.mean().item(), expected, se)


# -- the closed form against the exact likelihood ------------------------------------------
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_bound_is_never_below_the_exact_nll(variance):
    nll = exact_nll(ORACLE)
    for T in (10, 100, 1000):
        e = expected_bound(ORACLE, linear(T), variance)
        assert sum(e.values()) >= nll


def test_bound_with_beta_variance_is_tight_for_large_T():
    """With σ_t² = β_t the gap closes as T grows: it is 1.78, 0.57 and 0.0035 nats (two
    dimensions) at T = 10, 100, 1000 for this Gaussian."""
    nll = exact_nll(ORACLE)
    gaps = [sum(expected_bound(ORACLE, linear(T), "beta").values()) - nll for T in (10, 100, 1000)]
    assert gaps[0] > gaps[1] > gaps[2] >= 0
    assert gaps[2] / 2 < 0.005  # nats per dimension


# -- the estimator against the closed form ---------------------------------------------------
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_estimator_matches_the_closed_form(variance):
    sch = linear(100)
    x0 = ORACLE.sample(4000, torch.Generator().manual_seed(0))
    terms = bound_terms(ORACLE.predict(sch), sch, x0, variance=variance, generator=torch.Generator().manual_seed(1))
    expected = expected_bound(ORACLE, sch, variance)
    for name in ("L_T", "L_sum", "L_0"):
        assert terms[name].shape == (4000,) and terms[name].dtype == F64
        within(terms[name], expected[name])


def test_estimator_at_T_1000_is_within_noise_of_the_exact_nll():
    """Paired with each example's exact −log p(x_0), the estimated gap is the closed
    form's 0.0035 nats up to Monte Carlo error, and so not significantly negative."""
    sch = linear(1000)
    x0 = ORACLE.sample(1000, torch.Generator().manual_seed(2))
    terms = bound_terms(ORACLE.predict(sch), sch, x0, generator=torch.Generator().manual_seed(3))
    gap = terms["L_T"] + terms["L_sum"] + terms["L_0"] + ORACLE.log_prob(x0)
    within(gap, sum(expected_bound(ORACLE, sch, "beta").values()) - exact_nll(ORACLE))


def test_subsampled_timesteps_are_unbiased():
    """timesteps=k draws one t per stratum and weights it by the stratum's size."""
    sch = linear(200)
    x0 = ORACLE.sample(4000, torch.Generator().manual_seed(4))
    terms = bound_terms(ORACLE.predict(sch), sch, x0, timesteps=7, generator=torch.Generator().manual_seed(5))
    within(terms["L_sum"], expected_bound(ORACLE, sch, "beta")["L_sum"])


def test_batches_do_not_change_the_terms_that_need_no_noise():
    sch = linear(20)
    x0 = ORACLE.sample(100, torch.Generator().manual_seed(6))
    a = bound_terms(ORACLE.predict(sch), sch, x0, batch_size=30, generator=torch.Generator().manual_seed(7))
    b = bound_terms(ORACLE.predict(sch), sch, x0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a["L_T"], b["L_T"])
    assert a["L_sum"].shape == b["L_sum"].shape == (100,)


# -- the discretised decoder -----------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("mean, var", [(0.0, 1e-4), (0.3, 0.05), (-1.0, 1e-4), (0.99, 1.0), (5.0, 1e-4)])
def test_discretized_decoder_is_a_distribution_over_the_levels(levels, mean, var):
    grid = torch.linspace(-1, 1, levels, dtype=F64)[:, None]
    logp = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), var, levels)
    assert torch.isfinite(logp).all()
    assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-9)


def test_discretized_decoder_matches_the_cdf_difference():
    normal = torch.distributions.Normal(torch.tensor(0.1, dtype=F64), torch.tensor(0.2, dtype=F64))
    x = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]], dtype=F64)
    h = 1 / 255
    cdf_hi = torch.where(x > 1 - h / 2, torch.ones_like(x), normal.cdf(x + h))
    cdf_lo = torch.where(x < -1 + h / 2, torch.zeros_like(x), normal.cdf(x - h))
    expected = (cdf_hi - cdf_lo).log().sum(dim=1)
    got = discretized_gaussian_log_likelihood(x, torch.full_like(x, 0.1), 0.04, 256)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_grid_levels():
    assert grid_levels(torch.arange(17.0) / 8 - 1) == 17  # scikit-learn's digits
    assert grid_levels(torch.tensor([0.0, 1.0, 7.0, 200.0, 255.0]) / 127.5 - 1) == 256  # 8-bit pixels
    assert grid_levels(torch.arange(0, 256, 3.0) / 127.5 - 1) == 86  # every third 8-bit level: a coarser grid
    assert grid_levels(torch.tensor([-1.0, 1.0])) == 2
    assert grid_levels(torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1) is None  # continuous
    assert grid_levels(torch.tensor([2.0])) is None


# -- the pipeline-level bound, in the data's own coordinates ----------------------------------
class OracleNet(nn.Module):
    """A 'network' that is the exact ε̂ of a Gaussian in model space."""

    def __init__(self, oracle: GaussianData, schedule) -> None:
        super().__init__()
        self.predict = oracle.predict(schedule)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the pipeline a device

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.predict(x_t, t)


def test_variational_bound_reports_data_coordinates():
    """Data N(μ_d, Σ_d) standardised by (m, s): the model-space Gaussian's exact denoiser
    gives a bound in data coordinates (Jacobian Σ log s included) within noise of the
    exact −log p_d(x) of the data, in bits per dimension."""
    m, s = torch.tensor([3.0, -1.0], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)
    data_mean, data_cov = m + s * MEAN, COV * torch.outer(s, s)
    data = GaussianData(data_mean, data_cov)
    T = 300
    sch = linear(T)
    pipe = diffkit.Pipeline(schedule={"type": "linear", "timesteps": T}, denoiser=OracleNet(ORACLE, sch), shape=(2,))
    pipe.data_mean, pipe.data_std = m.float(), s.float()
    x = data.sample(3000, torch.Generator().manual_seed(8))
    out = variational_bound(pipe, x, seed=9)
    assert out["n"] == 3000 and out["dims"] == 2 and out["decoder"] == "gaussian" and out["levels"] is None
    assert math.isclose(sum(out["terms"].values()), out["bpd"], rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(out["terms"]["jacobian"], math.log(2.0 * 0.25) / (2 * math.log(2)), rel_tol=1e-6)
    exact = -data.log_prob(x.double()) / (2 * math.log(2))
    gap_bits = out["nats"] / (2 * math.log(2)) - exact
    expected_gap = (sum(expected_bound(ORACLE, sch, "beta").values()) - exact_nll(ORACLE)) / (2 * math.log(2))
    within(gap_bits, expected_gap)


def test_variational_bound_of_images_uses_the_discretised_decoder():
    x = (torch.randint(0, 17, (6, 1, 4, 4)).float() / 8 - 1).clamp(-1, 1)
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 10}, denoiser={"type": "mlp", "hidden": 16, "depth": 1}, shape=(1, 4, 4)
    )
    pipe.context = diffkit.BuildContext(sample_shape=(1, 4, 4), data_kind="images")
    out = variational_bound(pipe, x, seed=0)
    assert out["decoder"] == "discretized" and out["levels"] == 17 and "jacobian" not in out["terms"]
    assert out["terms"]["L_0"] > 0  # a probability's −log
    out256 = variational_bound(pipe, x, seed=0, levels=256)
    assert out256["levels"] == 256 and out256["bpd"] > out["bpd"]  # finer bins hold less mass
    with pytest.raises(diffkit.DiffkitError, match="shape"):
        variational_bound(pipe, x[:, :, :2], seed=0)


# -- the command ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "moons"
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 20},
        denoiser={"type": "mlp", "hidden": 16, "depth": 1},
        objective="score",
        data={"type": "moons", "n": 500},
        train={"steps": 3, "batch_size": 64, "preview": 0},
    )
    pipe.fit(progress=False)
    pipe.save(out)
    return out


def test_cli_evaluate_moons(moons_run, capsys):
    rc = cli.main(["evaluate", str(moons_run), "--n", "300", "--timesteps", "5", "--json", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 300 and report["timesteps"] == 5 and report["decoder"] == "gaussian"
    assert report["data"]["type"] == "moons" and report["data"]["seed"] == 1  # a fresh draw, not the training seed
    assert set(report["terms"]) == {"L_T", "L_sum", "L_0", "jacobian"}


def test_cli_evaluate_text_and_explicit_data(moons_run, capsys):
    rc = cli.main(["evaluate", str(moons_run), "--data", '{"type": "moons", "n": 100, "seed": 5}', "--timesteps", "3", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bits/dim" in text and "L_T" in text and "100 examples" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", '{"type": "gaussians", "components": 0}'], "data.components"),
        (["--data", "nonesuch"], "unknown data 'nonesuch'"),
        (["--data", '{"type": "digits"}'], "shape"),
        (["--n", "0"], "--n"),
        (["--timesteps", "0"], "--timesteps"),
    ],
)
def test_cli_evaluate_errors(moons_run, capsys, args, message):
    assert cli.main(["evaluate", str(moons_run), "--no-progress", *args]) == 1
    assert message in capsys.readouterr().err
