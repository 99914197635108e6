"""Certification of the samplers with exact oracles (diffkit.testing.certify).

The exact denoiser of a 2-D Gaussian mixture drives every deterministic sampler; its
error against a tight solution of the probability-flow ODE (Song et al. 2021, Eq. 13)
falls at the sampler's order as the steps double. The exact denoiser of Gaussian data
drives every stochastic sampler, which must reach that Gaussian (and the mixture's
weights) within sampling error. The same exact denoiser written as each objective's
output gives the same samples to float tolerance.
"""

from __future__ import annotations

import pytest
import torch

import diffkit
from diffkit.sampling import run
from diffkit.testing import certify_sampler
from diffkit.testing.certify import (
    MIXTURE,
    OBJECTIVES,
    CertificationReport,
    certify_invariance,
    default_processes,
    is_deterministic,
    measured_order,
)

ORDER_PROCESSES = ("edm", "vp", "rectified-flow")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two threads on a shared two-core machine spend more time waiting than working."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def processes():
    return default_processes()


@pytest.fixture(scope="module")
def orders(processes) -> CertificationReport:
    """Measured orders of euler, heun and dpm-solver (2M) on edm, vp and rectified flow.
    Heun runs on EDM's grid (Karras et al. 2022, Eq. 5): uniform in t on rectified flow
    its first step spans σ̃ from 999 to ≈ 15 and dominates the error, which then falls
    faster than N^{−2} (pairwise orders 3.3, 2.8, 2.6, 2.4 from 16 to 256 steps) before
    settling. DPM-Solver++ runs on its own grid, uniform in λ (Lu et al. 2022, Sec. 3.3): uniform in t
    its steps in λ near the clean end do not shrink with N on rectified flow
    (λ = 2 log((1 − t)/t) steps by 2 log 2 from t = 2/N to 1/N whatever N)."""
    chosen = {p: processes[p] for p in ORDER_PROCESSES}
    report = CertificationReport()
    for sampler in ("euler", {"type": "heun", "spacing": "karras"}, {"type": "dpm-solver", "spacing": "logsnr"}):
        report += certify_sampler(sampler, chosen, report=False, invariance=False)
    print(report)
    return report


def test_measured_order_recovers_known_slopes():
    assert measured_order([8, 16, 32], [1.0, 0.25, 0.0625]) == pytest.approx(2.0)
    assert measured_order([10, 20, 40, 80], [3.0, 1.5, 0.75, 0.375]) == pytest.approx(1.0)


@pytest.mark.parametrize("process", ORDER_PROCESSES)
def test_euler_is_first_order(orders, process):
    assert orders.order("euler", process) == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("process", ORDER_PROCESSES)
def test_heun_is_second_order(orders, process):
    assert orders.order("heun(spacing=karras)", process) == pytest.approx(2.0, abs=0.4)


@pytest.mark.parametrize("process", ORDER_PROCESSES)
def test_dpm_solver_2m_is_second_order(orders, process):
    assert orders.order("dpm-solver(spacing=logsnr)", process) == pytest.approx(2.0, abs=0.4)


def test_first_order_solver_is_not_certified_second_order(processes):
    """The order check can fail: DPM-Solver++ with order 1 (DDIM) measures ≈ 1, not 2."""
    first = {"type": "dpm-solver", "order": 1, "spacing": "logsnr"}
    r = certify_sampler(first, {"edm": processes["edm"]}, report=False, invariance=False)
    assert r.order("dpm-solver(order=1, spacing=logsnr)", "edm") == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("process", ["vp", "edm", "linear", "rectified-flow"])
def test_ddim_eta0_equals_euler(processes, process):
    """DDIM with η = 0 is Euler's method on dy/dσ̃ = ε̂ (Song et al. 2021, Eq. 13)."""
    p = processes[process]
    denoise = MIXTURE.denoiser(p)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * p.prior_std()
    ddim = diffkit.build("sampler", "ddim", eta=0.0, spacing="linspace")
    euler = diffkit.build("sampler", "euler", spacing="linspace")
    a = run(ddim, denoise, p, x.shape, steps=12, dtype=torch.float64, x_start=x)
    b = run(euler, denoise, p, x.shape, steps=12, dtype=torch.float64, x_start=x)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_determinism_is_detected(processes):
    p = processes["vp"]
    denoise = MIXTURE.denoiser(p)
    assert is_deterministic(diffkit.build("sampler", "euler"), denoise, p)
    assert not is_deterministic(diffkit.build("sampler", "euler-ancestral"), denoise, p)


STOCHASTIC = [
    "ddpm",
    "euler-ancestral",
    {"type": "heun", "s_churn": 40.0},
    "sde",
    {"type": "dpm-solver", "variant": "sde"},
]


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: s if isinstance(s, str) else s["type"] + "-stochastic")
def test_stochastic_samplers_reach_the_exact_law(processes, sampler):
    chosen = {p: processes[p] for p in ("vp", "edm")}
    report = certify_sampler(sampler, chosen, invariance=False, law_samples=2000)
    assert [r.check for r in report.rows] == ["law", "law"]
    assert report.passed, report.failures()


def test_law_check_can_fail(processes):
    """At 20 steps on a grid uniform in t (not its default, uniform in λ) DPM-Solver++ (2M)
    SDE's covariance on vp is off by ≈ 0.6, far outside the sampling error of 2000 draws:
    the check fails it."""
    report = certify_sampler(
        {"type": "dpm-solver", "variant": "sde", "spacing": "linspace"},
        {"vp": processes["vp"]},
        report=False,
        invariance=False,
        law_steps=20,
        law_samples=2000,
    )
    assert not report.passed


ALL_SAMPLERS = [
    "ddpm",
    "ddim",
    {"type": "ddim", "eta": 1.0},
    "dpm-solver",
    {"type": "dpm-solver", "variant": "sde"},
    "euler",
    "heun",
    {"type": "heun", "s_churn": 40.0},
    "euler-ancestral",
    "sde",
    "ode",
]


def _id(s):
    return s if isinstance(s, str) else "-".join(str(v) for v in s.values())


@pytest.mark.parametrize("process", ["vp", "edm", "linear"])
@pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=_id)
def test_parameterisation_invariance(processes, sampler, process):
    """ε, x_0, v, score, flow and edm outputs of the same exact denoiser give the same samples."""
    obj = diffkit.build("sampler", sampler if isinstance(sampler, str) else dict(sampler))
    row = certify_invariance(obj, _id(sampler), process, processes[process], OBJECTIVES)
    assert row.passed, row


def test_ode_rectified_flow_parameterisation_invariance(processes):
    p = processes["rectified-flow"]
    row = certify_invariance(diffkit.build("sampler", "ode"), "ode", "rectified-flow", p, OBJECTIVES)
    assert row.passed, row


def test_report_prints_a_table(processes, capsys):
    report = certify_sampler("euler", {"ve": processes["ve"]}, order_steps=(8, 16))
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["sampler", "process", "check", "value"]
    assert {r.check for r in report.rows} == {"order", "invariance"}
    assert str(report) in out


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm-solver", "euler-ancestral", "ddpm"])
def test_full_matrix(sampler):
    """Every default process, tables included (their piecewise σ̃ makes the reference ODE slow)."""
    report = certify_sampler(sampler)
    assert all(r.passed for r in report.rows if r.check != "order"), report.failures()
    assert all(r.value > 0.5 for r in report.rows if r.check == "order"), report
