"""The exact likelihood from the probability-flow ODE (diffkit.likelihood.ode_log_likelihood)
against closed forms.

For Gaussian data x_0 ~ N(μ, Σ) and its exact denoiser, the probability-flow ODE carries
the marginal p_t = N(α(t)μ, α²Σ + σ²I) (Song et al. 2021, Eq. 13), so started at
x(t_min) = x_0 it returns log p_{t_min}(x_0) = log N(x_0; α(t_min)μ, α²Σ + σ²I) up to
two errors: the solver's, and the prior N(0, s²I) standing in for the true p_{t_max}.
:func:`test_augmented_ode_recovers_the_closed_form` removes the second (it evaluates the
true p_{t_max} at the returned x(t_max)) and checks the first per example;
:func:`test_nll_equals_the_closed_form` checks the returned NLL, prior and all.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

import diffkit
from diffkit import cli
from diffkit.interfaces import BuildContext
from diffkit.likelihood import ode_log_likelihood, pipeline_ode_likelihood
from diffkit.oracles import GaussianData

REGISTRY = diffkit.get_registry()
F64 = torch.float64
MEAN = torch.tensor([1.5, -0.8, 0.3], dtype=F64)
_A = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.8]], dtype=F64)
COV = _A @ _A.T
ORACLE = GaussianData(MEAN, COV)
DIMS = 3
PROCESSES = {
    "vp": {"type": "vp"},
    "edm": {"type": "edm"},
    "linear": {"type": "linear", "timesteps": 1000},
}


def build(spec: dict) -> diffkit.process.Process:
    return REGISTRY.build("schedule", spec, BuildContext(sample_shape=(DIMS,), data_kind="points"))


def log_normal(x: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def marginal(process, t: float) -> tuple[Tensor, Tensor]:
    """Mean α(t)μ and covariance α²Σ + σ²I of x_t for the Gaussian data."""
    a, s = process.alpha_sigma(torch.tensor(t, dtype=F64))
    return a * MEAN, a * a * COV + s * s * torch.eye(DIMS, dtype=F64)


@pytest.fixture(scope="module")
def x0() -> Tensor:
    return ORACLE.sample(48, torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("name", PROCESSES)
def test_augmented_ode_recovers_the_closed_form(name, x0):
    """Δ(t_max) + log p_{t_max}(x(t_max)) equals log p_{t_min}(x_0) per example within
    3e-3 nats/dim (dopri5 at rtol = atol = 1e-5 measures 0.9e-3 on vp, 1.6e-3 on edm and
    1.4e-3 on the linear table): the solver and the exact divergence, without the prior's
    error."""
    process = build(PROCESSES[name])
    _, stats = ode_log_likelihood(ORACLE.denoiser(process), process, x0, return_stats=True)
    true_prior = log_normal(stats["x_T"], *marginal(process, process.t_max))
    got = stats["delta"] + true_prior
    want = log_normal(x0, *marginal(process, process.t_min))
    err = (got - want).abs().max() / DIMS
    assert err < 3e-3, f"{name}: largest error {err:.2e} nats/dim"


@pytest.mark.parametrize("name", PROCESSES)
def test_nll_equals_the_closed_form(name, x0):
    """The returned NLL (prior N(0, s²I) included) averaged over examples equals the closed
    form −log N(x_0; α(t_min)μ, α²Σ + σ²I) within 0.01 nats/dim. On these three processes
    it equals −log N(x_0; μ, Σ) just as well: σ̃(t_min) ≤ 0.01 moves the density by
    < 2e-4 nats/dim here, well below the tolerance (asserted too)."""
    process = build(PROCESSES[name])
    nll = -ode_log_likelihood(ORACLE.denoiser(process), process, x0)
    at_tmin = -log_normal(x0, *marginal(process, process.t_min))
    at_0 = -log_normal(x0, MEAN, COV)
    assert float((at_tmin - at_0).mean().abs()) / DIMS < 2e-4
    assert abs(float((nll - at_tmin).mean())) / DIMS < 0.01
    assert abs(float((nll - at_0).mean())) / DIMS < 0.01
    # per example the prior's mismatch with p_{t_max} is a few 1e-2 nats at most
    assert float((nll - at_tmin).abs().max()) / DIMS < 0.05


def test_a_wrong_denoiser_gives_its_own_density(x0):
    """The check can fail: the exact denoiser of N(μ, 2Σ) gives that model's density,
    −log N(x_0; μ, 2Σ) within 0.01 nats/dim, off the data's by KL = ½(D/2 − D + D log 2)
    ≈ 0.1 nats/dim on average."""
    process = build(PROCESSES["vp"])
    wrong = GaussianData(MEAN, 2.0 * COV).denoiser(process)
    nll = -ode_log_likelihood(wrong, process, x0)
    assert abs(float((nll + log_normal(x0, MEAN, 2.0 * COV)).mean())) / DIMS < 0.01
    assert abs(float((nll + log_normal(x0, MEAN, COV)).mean())) / DIMS > 0.05


def test_hutchinson_agrees_with_the_exact_divergence():
    """Hutchinson's estimator (Rademacher probes, fixed over the solve) is unbiased: its
    log p minus the exact-divergence log p averages to zero within 4 standard errors
    over examples, and the probes do add variance (the estimate is not the exact one).
    For Gaussian data v is linear in x, so ∇·v is the same for every x and the spread
    is the probes' alone: Var(zᵀMz) = 2 Σ_{i≠j} M_ij² for symmetric M = ∫∂v/∂x dt."""
    process = build(PROCESSES["vp"])
    x = ORACLE.sample(256, torch.Generator().manual_seed(1), dtype=F64)
    denoise = ORACLE.denoiser(process)
    exact = ode_log_likelihood(denoise, process, x, exact_divergence=True)
    g = torch.Generator().manual_seed(2)
    hutch = ode_log_likelihood(denoise, process, x, exact_divergence=False, generator=g)
    diff = hutch - exact
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert se > 1e-3
    assert abs(float(diff.mean())) < 4 * se, f"mean difference {float(diff.mean()):.4f}, standard error {se:.4f}"
    # more probes, less variance: four probes halve the standard deviation (±30%)
    hutch4 = ode_log_likelihood(denoise, process, x, exact_divergence=False, hutchinson_samples=4, generator=g)
    ratio = float((hutch4 - exact).std()) / float(diff.std())
    assert 0.35 < ratio < 0.65, ratio
    # 64 probes: a standard error of 0.008 nats against Δ(t_max) = 1.15, so a bias of 3 %
    # in the estimator (a wrong scale of zᵀJz) would show
    hutch64 = ode_log_likelihood(denoise, process, x, exact_divergence=False, hutchinson_samples=64, generator=g)
    diff64 = hutch64 - exact
    se64 = float(diff64.std()) / math.sqrt(diff64.numel())
    assert se64 < 0.01 and abs(float(diff64.mean())) < 4 * se64, (float(diff64.mean()), se64)


def test_high_dimensions_default_to_hutchinson():
    """Above 64 dimensions the estimator is the default, and still recovers the closed
    form −log N(x_0; α(t_min)μ, α²Σ + σ²I) on a 100-dimensional Gaussian within its
    standard error (and 0.01 nats/dim)."""
    D = 100
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(D, generator=g, dtype=F64) * 0.5
    std = 0.5 + torch.rand(D, generator=g, dtype=F64)
    data = GaussianData(mean, torch.diag(std.square()))
    process = build(PROCESSES["vp"])
    x = data.sample(64, g, dtype=F64)
    logp, stats = ode_log_likelihood(data.denoiser(process), process, x, generator=g, return_stats=True)
    a, s = process.alpha_sigma(torch.tensor(process.t_max, dtype=F64))
    true_prior = torch.distributions.Normal(a * mean, (a * a * std.square() + s * s).sqrt()).log_prob(stats["x_T"]).sum(1)
    a0, s0 = process.alpha_sigma(torch.tensor(process.t_min, dtype=F64))
    want = torch.distributions.Normal(a0 * mean, (a0 * a0 * std.square() + s0 * s0).sqrt()).log_prob(x).sum(1)
    diff = stats["delta"] + true_prior - want
    se = float(diff.std()) / math.sqrt(diff.numel())
    assert se > 0  # Hutchinson was used: the exact divergence leaves no spread
    assert abs(float(diff.mean())) < 4 * se and abs(float(diff.mean())) / D < 0.01
    assert abs(float((-logp + want).mean())) / D < 0.01


# -- the pipeline and the command ------------------------------------------------------------
class OracleNet(torch.nn.Module):
    """The exact ε̂ of model-space Gaussian data as an ε-network on a discrete table, at
    integer and fractional t alike (the ODE visits both)."""

    def __init__(self, oracle: GaussianData, schedule) -> None:
        super().__init__()
        self.denoise = oracle.denoiser(schedule)
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.denoise(x_t, t.double()).eps


def test_pipeline_reports_data_coordinates():
    """Data N(m + sμ, diag(s)Σdiag(s)) standardised by (m, s): the model-space oracle's NLL
    in data coordinates (Σ log s included) equals −log p_data(x) within 0.01 nats/dim."""
    mean2, cov2 = MEAN[:2], COV[:2, :2]
    oracle = GaussianData(mean2, cov2)
    m, s = torch.tensor([3.0, -1.0], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)
    data = GaussianData(m + s * mean2, cov2 * torch.outer(s, s))
    T = 1000  # ᾱ_{T−1} = 4e-5: the prior N(0, I) is p_{t_max} (at T = 200, ᾱ_{T−1} = 0.13 and it is not)
    schedule = REGISTRY.build("schedule", {"type": "linear", "timesteps": T}, BuildContext())
    pipe = diffkit.Pipeline(schedule={"type": "linear", "timesteps": T}, denoiser=OracleNet(oracle, schedule), shape=(2,))
    pipe.data_mean, pipe.data_std = m.float(), s.float()
    x = data.sample(64, torch.Generator().manual_seed(4), dtype=F64)
    out = pipeline_ode_likelihood(pipe, x)
    exact = float(-data.log_prob(x).mean())
    assert out["unit"] == "nats" and out["divergence"] == "exact" and out["n"] == 64
    assert abs(out["nll"] - exact) / 2 < 0.01, (out["nll"], exact)
    assert math.isclose(out["bpd"], out["nll"] / (2 * math.log(2)), rel_tol=1e-12)


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "moons-edm"
    pipe = diffkit.Pipeline(
        schedule={"type": "edm"},
        denoiser={"type": "mlp", "hidden": 16, "depth": 1},
        objective="edm",
        data={"type": "moons", "n": 500},
        train={"steps": 5, "batch_size": 64, "preview": 0},
    )
    pipe.fit(progress=False)
    pipe.save(out)
    return out


def test_cli_evaluate_ode_moons(moons_run, capsys):
    rc = cli.main(["evaluate", str(moons_run), "--method", "ode", "--n", "64", "--json", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ode" and report["unit"] == "nats" and report["n"] == 64
    assert math.isfinite(report["nll"]) and math.isfinite(report["nll_se"]) and report["nfe"] > 0
    assert report["data"]["seed"] == 1  # held-out: a fresh draw, not the training seed
    rc = cli.main(["evaluate", str(moons_run), "--method", "ode", "--n", "16", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "probability-flow ODE" in text and "NLL (nats)" in text
    assert cli.main(["evaluate", str(moons_run), "--method", "ode", "--rtol", "0", "--no-progress"]) == 1
    assert "--rtol must be positive" in capsys.readouterr().err
    args = ["--divergence", "hutchinson", "--hutchinson-samples", "2", "--n", "16", "--json", "--no-progress"]
    assert cli.main(["evaluate", str(moons_run), "--method", "ode", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["divergence"] == "hutchinson (2 Rademacher probes)" and math.isfinite(report["nll"])


def test_images_are_dequantised_to_bits_per_dim():
    """Images on 256 levels: bits/dim = (E_u[−log p(x + h(u − ½))] − D log h)/(D ln 2) with
    h = 2/255 (uniform dequantisation at the 127.5 scale). With the exact denoiser of
    N(μ, Σ) the dequantisation moves −log p by O(h²) only, so the result equals
    (−log N(x; μ, Σ) + D log 127.5)/(D ln 2) within 0.01 nats/dim."""
    D, shape = 16, (1, 4, 4)
    g = torch.Generator().manual_seed(5)
    mean = 0.3 * torch.randn(D, generator=g, dtype=F64)
    B = torch.randn(D, D, generator=g, dtype=F64) * 0.1
    cov = B @ B.T + 0.05 * torch.eye(D, dtype=F64)
    oracle = GaussianData(mean, cov, event_shape=shape)
    x = ((oracle.sample(32, g, dtype=F64).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1  # the 8-bit grid
    T = 1000
    schedule = REGISTRY.build("schedule", {"type": "linear", "timesteps": T}, BuildContext())
    pipe = diffkit.Pipeline(schedule={"type": "linear", "timesteps": T}, denoiser=OracleNet(oracle, schedule), shape=shape)
    pipe.context = BuildContext(sample_shape=shape, data_kind="images")
    out = pipeline_ode_likelihood(pipe, x, levels=256)
    assert out["unit"] == "bits/dim" and out["levels"] == 256 and out["divergence"] == "exact"
    want = (float(-oracle.log_prob(x).mean()) + D * math.log(127.5)) / (D * math.log(2))
    assert abs(out["nll"] - want) * math.log(2) < 0.01, (out["nll"], want)
    assert out["nll"] == out["bpd"]


def test_the_bound_on_a_continuous_process_points_to_the_ode(moons_run, capsys):
    assert cli.main(["evaluate", str(moons_run), "--n", "16", "--no-progress"]) == 1
    assert "--method ode" in capsys.readouterr().err
