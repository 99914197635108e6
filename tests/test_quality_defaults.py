"""Defaults chosen for sample quality, checked against exact oracles.

`edm`'s ``sigma_max: null``: the data's diameter for point data (Song & Ermon 2020,
Technique 1, as `ve` takes it), Karras et al.'s 80 for images and where the data is not
known; and sampling starts from N(0, (σ_max² + σ_data²) I), the variance of p(x; σ_max). On
standardised 2-D data Heun's 18 steps from σ = 80 leave the covariance of exact Gaussian data
11 % too large; from the diameter a third of that.

`pc`'s corrector signal-to-noise ratio r = 0.075 (0.16 before): it must still sample the
exact law where the score is exact.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffkit
from diffkit import BuildContext
from diffkit.oracles import GaussianData
from diffkit.sampling import run

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _edm(ctx: BuildContext, **kw) -> object:
    return diffkit.get_registry().build("schedule", {"type": "edm", **kw}, ctx)


def test_edm_sigma_max_null_is_the_diameter_of_point_data_and_80_otherwise():
    assert _edm(BuildContext(data_kind="points", data_diameter=3.9)).t_max == 3.9
    assert _edm(BuildContext(data_kind="images", data_diameter=14.0)).t_max == 80.0
    assert _edm(BuildContext()).t_max == 80.0  # no data known: Karras et al.'s value
    assert _edm(BuildContext(data_kind="points", data_diameter=3.9), sigma_max=12.0).t_max == 12.0
    # the prior is p(x; σ_max) of data with variance σ_data² (c_in's variance), not N(0, σ_max²)
    p = _edm(BuildContext(data_kind="points", data_diameter=3.9))
    assert p.prior_std() == pytest.approx((3.9**2 + 1.0) ** 0.5, rel=1e-15)
    # never below twice σ_min, as ve's
    assert _edm(BuildContext(data_kind="points", data_diameter=1e-3), sigma_min=0.002).t_max == 0.004


def test_the_moons_edm_spec_starts_sampling_at_the_data_diameter():
    pipe = diffkit.Pipeline.from_spec(ROOT / "examples" / "moons-edm.yaml")
    assert pipe.context.data_diameter == pytest.approx(3.88, abs=0.05)
    assert pipe.schedule.t_max == pipe.context.data_diameter
    assert float(pipe.schedule.grid(18)[0]) == pipe.context.data_diameter


def test_heun_at_defaults_on_the_diameter_is_closer_to_exact_gaussian_data_than_from_80():
    """Standardised 2-D Gaussian data (unit variances, as the pipeline sees points), its exact
    denoiser, Heun at its default 18 steps from the same standard normal draws scaled by σ_max:
    the largest error in the covariance is under 6 % from the diameter (4 for this data) and
    over 8 % from σ_max = 80 (4,000 samples: the sampling error of a variance is 2 %)."""
    data = GaussianData(torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.3], [0.3, 1.0]], dtype=F64))
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    errors = {}
    for sigma_max in (4.0, 80.0):
        process = diffkit.build("schedule", "edm", sigma_max=sigma_max, sigma_data=1.0)
        out = run(diffkit.build("sampler", "heun"), data.denoiser(process), process, z.shape, dtype=F64,
                  x_start=z * process.prior_std(), generator=torch.Generator().manual_seed(1))
        errors[sigma_max] = float((torch.cov(out.T) - data.cov).abs().max())
    assert errors[4.0] < 0.06 < 0.08 < errors[80.0], errors


def test_pc_at_its_defaults_on_ve_samples_exact_gaussian_data():
    """pc at its defaults (1000 predictor steps, one corrector step at r = 0.075) with the exact
    denoiser of correlated Gaussian data on a ve process (σ_max = 50): mean and covariance
    within 4 standard errors plus 0.03 (certify_law's tolerance) of the exact ones."""
    from diffkit.testing.certify import GAUSSIAN

    sampler = diffkit.build("sampler", "pc")
    assert sampler.params.snr == 0.075
    process = diffkit.build("schedule", "ve", sigma_max=50.0)
    g = GAUSSIAN
    n = 3000
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64) * process.prior_std()
    out = run(sampler, g.denoiser(process), process, z.shape, dtype=F64, x_start=z, generator=torch.Generator().manual_seed(4))
    var = torch.diagonal(g.cov)
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + g.cov.square()) / n).sqrt()
    assert ((out.mean(0) - g.mean).abs() <= 4 * se_mean + 0.03).all(), out.mean(0)
    assert ((torch.cov(out.T) - g.cov).abs() <= 4 * se_cov + 0.03).all(), torch.cov(out.T)
