"""Inpainting, SDEdit and ILVR on continuous processes (vp, ve, edm, rectified-flow).

The applications walk the sampler's grid of any process: SDEdit starts at the time
``strength`` of the way up the process's default grid and takes the grid's steps below
it; RePaint's resampling noises the state back with the forward kernel q(x_t | x_s) of
the process and returns to a time the walk visited. The exact Gaussian denoiser, as a
pipeline's network on each process, checks that the results follow the data's law.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import diffkit
from diffkit import TensorData
from diffkit import applications as A
from diffkit.oracles import GaussianData

F64 = torch.float64
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
# each process with a sampler its users would pick for it
CASES = [("vp", "ddpm"), ("ve", "euler-ancestral"), ("edm", "heun"), ("rectified-flow", "euler"), ("edm", "dpm-solver")]
PROCESSES = ["vp", "sub-vp", "ve", "edm", "rectified-flow"]


class Oracle(nn.Module):
    """The exact ε̂ of Gaussian data as the network of an ``epsilon`` pipeline on a
    continuous process: it recovers t from the conditioning value it is given (by
    bisection; every process's conditioning increases with t) and x_t from c_in(t)·x_t."""

    def __init__(self, data: GaussianData, process: diffkit.Process) -> None:
        super().__init__()
        self.process, self.denoise = process, data.denoiser(process)
        self.calls = 0
        self._times: dict[float, float] = {}

    def time_of(self, c: float) -> float:
        if c not in self._times:
            p = self.process
            lo, hi = torch.tensor(p.t_min, dtype=F64), torch.tensor(p.t_max, dtype=F64)
            for _ in range(80):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(p.conditioning(mid)) < c else (lo, mid)
            self._times[c] = float(0.5 * (lo + hi))
        return self._times[c]

    def forward(self, x_in: torch.Tensor, c: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        assert bool((c == c[0]).all())
        t = torch.full((x_in.shape[0],), self.time_of(float(c[0])), dtype=F64)
        scale = self.process.input_scale(t)
        x_t = x_in if scale is None else x_in / scale.to(x_in.dtype).reshape((-1,) + (1,) * (x_in.ndim - 1))
        return self.denoise(x_t, t).eps


def oracle_pipe(process: str, data: GaussianData, kind: str = "points", sampler: str = "ddpm") -> diffkit.Pipeline:
    proc = build(process)
    x = data.sample(64, torch.Generator().manual_seed(0))
    return diffkit.Pipeline(
        schedule=proc, denoiser=Oracle(data, proc), objective="epsilon", sampler=sampler, data=TensorData(x, kind=kind)
    )


def build(process: str) -> diffkit.Process:
    """The process with an explicit σ_max where its default comes from the data."""
    return diffkit.build("schedule", process, **({"sigma_max": 10.0} if process in ("ve", "edm") else {}))


def conditional(x1: float) -> tuple[float, float]:
    """Mean and variance of x_2 given x_1 for the Gaussian above."""
    mean = MEAN[1] + COV[0, 1] / COV[0, 0] * (x1 - MEAN[0])
    return float(mean), float(COV[1, 1] - COV[0, 1] ** 2 / COV[0, 0])


# -- the process's part: grids that start part-way, the forward kernel, strength -------------
@pytest.mark.parametrize("process", PROCESSES)
@settings(max_examples=25, deadline=None)
@given(steps=st.integers(1, 40), fraction=st.floats(0.0, 1.0), spacing=st.sampled_from([None, "linspace", "logsnr", "karras"]))
def test_a_grid_started_part_way_keeps_the_full_grids_times_below_the_start(process, steps, fraction, spacing):
    proc = build(process)
    start = proc.time_at(fraction)
    full = proc.grid(steps, spacing)
    part = proc.grid(steps, spacing, start=start)
    assert part[0].item() == start
    assert torch.equal(part[1:], full[full < start])
    assert part[-1].item() == proc.t_clean


@pytest.mark.parametrize("process", PROCESSES)
def test_time_at_runs_up_the_default_grid(process):
    """time_at(0) is the grid's least noisy time, time_at(1) is t_max, it increases, and a
    grid of N steps visits time_at(1 − i/(N − 1)) (or i/N where the grid ends at the clean time)."""
    proc = build(process)
    fractions = torch.linspace(0, 1, 33, dtype=F64).tolist()
    times = [proc.time_at(f) for f in fractions]
    assert times[-1] == pytest.approx(proc.t_max, rel=1e-12)
    assert all(a < b for a, b in zip(times, times[1:]))
    n = 12
    grid = proc.grid(n)  # n noisy times then the clean one
    reaches_clean = proc.t_min == proc.t_clean and proc.default_grid == "linspace"  # rectified flow
    last = n if reaches_clean else n - 1
    assert times[0] == pytest.approx(grid[last].item(), abs=1e-9)
    for i in range(last + 1):
        assert proc.time_at(1 - i / last) == pytest.approx(grid[i].item(), rel=1e-6, abs=1e-9)
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError, match="fraction"):
            proc.time_at(bad)


@pytest.mark.parametrize("process", PROCESSES + ["linear"])
@settings(max_examples=10, deadline=None)
@given(u=st.floats(0.0, 1.0), v=st.floats(0.0, 1.0))
def test_the_forward_kernel_composes_to_the_marginal(process, u, v):
    """x_s ~ q(x_s | x_0) then x_t ~ q(x_t | x_s) (:meth:`Process.transition`) has the law
    of q(x_t | x_0) = N(α_t x_0, σ_t² I) (Kingma et al. 2021, Eq. 33)."""
    proc = build(process)
    s, t = sorted((proc.time_at(u), proc.time_at(v)))
    if proc.discrete:
        s, t = s - 1, t  # from the clean time −1 up
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5, dtype=F64)
    ts = torch.full((x0.shape[0],), s, dtype=F64)
    x_s = proc.q_sample(x0, ts.long() if proc.discrete else ts, torch.randn(x0.shape, generator=g, dtype=F64))
    x_t = proc.transition(x_s, s, t, torch.randn(x0.shape, generator=g, dtype=F64))
    a, sig = (v.item() for v in proc.alpha_sigma(torch.tensor([t], dtype=F64)))
    assert x_t.mean().item() == pytest.approx(1.5 * a, abs=5 * sig / math.sqrt(2e5) + 1e-12)
    assert x_t.std().item() == pytest.approx(sig, rel=0.01, abs=1e-12)


def test_strength_is_a_time_on_every_process():
    table = diffkit.build("schedule", "linear", timesteps=1000)
    assert A.strength_to_time(0.5, table) == 499.0
    edm = diffkit.build("schedule", "edm", sigma_max=80.0)
    # EDM's grid is uniform in σ^{1/ρ}: strength ½ is the σ halfway along it
    half = (0.5 * 0.002 ** (1 / 7) + 0.5 * 80 ** (1 / 7)) ** 7
    assert A.strength_to_time(0.5, edm) == pytest.approx(half, rel=1e-9)
    rf = diffkit.build("schedule", "rectified-flow")
    assert A.strength_to_time(0.25, rf) == pytest.approx(0.25 * rf.t_max)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(diffkit.DiffkitError, match="strength"):
            A.strength_to_time(bad, edm)


# -- the applications with the exact denoiser --------------------------------------------------
@pytest.mark.parametrize("process, sampler", CASES)
def test_inpainting_on_a_continuous_process_keeps_the_known_part_and_samples_the_conditional(process, sampler):
    """The known coordinate comes back exactly; replacement alone leaves the generated one
    off x_2 | x_1 of the data (by 0.25–0.36 in the mean, measured), and RePaint's
    resampling brings it there (10 passes: within 0.045 on every process and sampler)."""
    pipe = oracle_pipe(process, GaussianData(MEAN, COV), sampler=sampler)
    x1 = 1.8
    x = torch.tensor([[x1, 0.0]]).repeat(3000, 1)
    mean, var = conditional(x1)
    errors = {}
    for resample in (1, 10):
        out = A.inpaint(pipe, x, torch.tensor([1.0, 0.0]), steps=30, seed=3, resample=resample)
        assert torch.equal(out[:, 0], x[:, 0])
        errors[resample] = abs(out[:, 1].double().mean().item() - mean)
    assert errors[10] < 0.06 and errors[10] < errors[1] / 3, errors
    assert out[:, 1].double().var().item() == pytest.approx(var, abs=0.1)


def test_resampling_returns_to_the_times_the_walk_visited():
    """Every state RePaint's resampling reaches is at a time of the outer walk's grid, so the
    known part is pasted in at the noise level the state has."""
    pipe = oracle_pipe("edm", GaussianData(MEAN, COV), sampler="heun")
    grid = pipe.sampler.levels(pipe.schedule, 12).tolist()
    seen: list[float] = []
    real = A._noised

    def spy(pipe_, x0, t, draws):
        seen.append(t)
        return real(pipe_, x0, t, draws)

    A._noised = spy
    try:
        A.inpaint(pipe, torch.zeros(3, 2), torch.tensor([1.0, 0.0]), steps=12, seed=0, resample=3, jump=4)
    finally:
        A._noised = real
    assert set(seen) <= set(grid) and len(seen) > len(grid)


@pytest.mark.parametrize("process, sampler", CASES)
def test_sdedit_on_a_continuous_process_recovers_the_data_law_at_half_the_cost(process, sampler):
    """Data noised to strength ½ and brought back by the exact denoiser follows the data
    law and stays tied to its input (100 steps: at 40, ddpm's own discretisation error on
    the uniform ``vp`` grid shrinks the variance by 13 %, sampling from the prior as much);
    strength ½ skips about half the walk's evaluations and strength 1 forgets the input."""
    data = GaussianData(MEAN, COV)
    pipe = oracle_pipe(process, data, sampler=sampler)
    x = data.sample(4000, torch.Generator().manual_seed(4))
    pipe.denoiser.calls = 0
    out = A.denoise(pipe, x, 0.5, steps=100, seed=5)
    half = pipe.denoiser.calls
    assert ((out.double().mean(0) - MEAN).abs() < 0.06).all()
    assert ((torch.cov(out.double().T) - COV).abs() < 0.1).all()
    pipe.denoiser.calls = 0
    far = A.denoise(pipe, x, 1.0, steps=100, seed=5)
    assert 0.3 < half / pipe.denoiser.calls < 0.7
    # on vp, as on DDPM's linear table, t = ½ already leaves α = 0.28: look nearer for the tie
    near = torch.corrcoef(torch.stack([x[:, 0], A.denoise(pipe, x, 0.25, steps=100, seed=5)[:, 0]]))[0, 1]
    # strength 1 starts at t_max, where σ_max = 10 leaves x_t a correlation of 1/√101 with x_0
    assert near > 0.5 and abs(torch.corrcoef(torch.stack([x[:, 0], far[:, 0]]))[0, 1]) < 0.2


@pytest.mark.parametrize("process, sampler", CASES[:4])
def test_ilvr_on_a_continuous_process_matches_the_low_resolution_input(process, sampler):
    g = torch.Generator().manual_seed(1)
    M = torch.randn(16, 16, generator=g, dtype=F64)
    data = GaussianData(torch.zeros(16, dtype=F64), 0.05 * M @ M.T / 16 + 0.02 * torch.eye(16, dtype=F64), event_shape=(1, 4, 4))
    pipe = oracle_pipe(process, data, "images", sampler=sampler)
    low = torch.rand(5, 1, 2, 2) - 0.5
    out = A.upscale(pipe, low, steps=10, seed=0)
    assert out.shape == (5, 1, 4, 4)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(out, 2), low, rtol=0, atol=1e-5)


def test_steps_on_a_continuous_process_must_be_whole_and_positive():
    pipe = oracle_pipe("edm", GaussianData(MEAN, COV))
    for bad in (0, 2.5):
        with pytest.raises(diffkit.DiffkitError, match="steps"):
            A.denoise(pipe, torch.zeros(2, 2), 0.5, steps=bad)


def test_the_cli_denoises_and_inpaints_with_an_edm_run(tmp_path, capsys):
    import numpy as np

    from diffkit.cli import main

    pipe = diffkit.Pipeline(
        schedule="edm", objective="edm", sampler="heun",
        denoiser={"type": "mlp", "hidden": 32, "depth": 1}, data={"type": "moons", "n": 256},
        train={"steps": 5, "batch_size": 64, "preview": 0, "device": "cpu"},
    )  # fmt: skip
    pipe.fit(progress=False)
    run_dir = pipe.save(tmp_path / "edm")
    np.save(tmp_path / "p.npy", np.array([[0.0, 0.5], [1.0, -0.3]], dtype=np.float32))
    np.save(tmp_path / "m.npy", np.array([1.0, 0.0], dtype=np.float32))
    code = main(["denoise", str(run_dir), "--input", str(tmp_path / "p.npy"), "--strength", "0.3",
                 "--out", str(tmp_path / "d.npy"), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert np.load(tmp_path / "d.npy").shape == (2, 2)
    code = main(["inpaint", str(run_dir), "--input", str(tmp_path / "p.npy"), "--mask", str(tmp_path / "m.npy"),
                 "--out", str(tmp_path / "i.npy"), "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "i.npy")[:, 0], [0.0, 1.0])
