"""Inpainting, denoising (SDEdit) and super-resolution (ILVR) from Python and from the
command line (diffkit.applications; diffkit inpaint / denoise / upscale).

The constraints these methods promise hold whatever the network, so most tests use
the exact Gaussian denoiser (diffkit.oracles) wrapped as a pipeline's network: known
entries come back exactly, ILVR's output averages down to its input, and with exact
scores the generated part is consistent with the data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diffkit
from diffkit import TensorData
from diffkit import applications as A
from diffkit.cli import main
from diffkit.oracles import GaussianData

F64 = torch.float64
SAMPLERS = ["ddpm", "ddim", "dpm-solver"]

# Two strongly correlated coordinates (ρ = 0.9): the known one says a lot about the other.
MEAN = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)


class Oracle(nn.Module):
    """The exact ε̂ of Gaussian data as a pipeline's denoiser (it has no parameters, so
    the pipeline runs on the CPU)."""

    def __init__(self, data: GaussianData, schedule: diffkit.Schedule) -> None:
        super().__init__()
        self.predict = data.predict(schedule)
        self.calls = 0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.predict(x_t, t)


def oracle_pipe(data: GaussianData, kind: str = "points", T: int = 200) -> diffkit.Pipeline:
    sch = diffkit.build("schedule", "cosine", timesteps=T)
    x = data.sample(64, torch.Generator().manual_seed(0))
    pipe = diffkit.Pipeline(schedule=sch, denoiser=Oracle(data, sch), data=TensorData(x, kind=kind))
    return pipe


@pytest.fixture(scope="module")
def points() -> diffkit.Pipeline:
    return oracle_pipe(GaussianData(MEAN, COV))


@pytest.fixture(scope="module")
def images() -> diffkit.Pipeline:
    """1×4×4 images: a smooth random Gaussian field in about [−1, 1]."""
    g = torch.Generator().manual_seed(1)
    A_ = torch.randn(16, 16, generator=g, dtype=F64)
    cov = 0.05 * A_ @ A_.T / 16 + 0.02 * torch.eye(16, dtype=F64)
    data = GaussianData(0.2 * torch.randn(16, generator=g, dtype=F64), cov, event_shape=(1, 4, 4))
    pipe = oracle_pipe(data, "images")
    pipe.gaussian = data
    return pipe


def conditional(x1: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean and variance of x_2 given x_1 for the Gaussian above."""
    mean = MEAN[1] + COV[0, 1] / COV[0, 0] * (x1.double() - MEAN[0])
    return mean, (COV[1, 1] - COV[0, 1] ** 2 / COV[0, 0]).item()


# -- inpainting --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("resample, jump", [(1, 1), (2, 1), (3, 5)])
def test_inpainting_keeps_the_known_pixels_exactly(images, name, resample, jump):
    """Whatever the sampler and resampling, and at r × steps network evaluations (every
    jump of j steps is walked r times)."""
    x = torch.rand(6, 1, 4, 4) * 2 - 1
    mask = torch.zeros(1, 4, 4)
    mask[..., :2] = 1  # the left half is known
    images.denoiser.calls = 0
    out = A.inpaint(images, x, mask, sampler=name, steps=10, seed=0, resample=resample, jump=jump)
    assert images.denoiser.calls == resample * 10
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out[..., :2], x[..., :2])
    assert not torch.equal(out[..., 2:], x[..., 2:])
    assert torch.isfinite(out).all()


def test_inpainting_points_in_data_coordinates(points):
    """Point data are standardised inside the pipeline; the known coordinate comes back
    exactly, and the generated one follows x_2 | x_1 of the data (replacement is an
    approximation of that conditional: its mean is checked loosely, and RePaint
    resampling brings it closer)."""
    points.data_mean, points.data_std = torch.tensor([3.0, -2.0]), torch.tensor([2.0, 0.5])
    try:
        x1 = torch.full((4000, 1), 1.8)
        x = torch.cat([x1, torch.zeros(4000, 1)], dim=1)
        # the oracle's Gaussian lives in model space; map it to data coordinates
        x_data = points.denormalize(x)
        mask = torch.tensor([1.0, 0.0])
        errors = {}
        for resample, jump in ((1, 1), (4, 1), (4, 5)):
            out = A.inpaint(points, x_data, mask, sampler="ddpm", steps=50, seed=3, resample=resample, jump=jump)
            assert torch.equal(out[:, 0], x_data[:, 0])
            z2 = (out[:, 1] - points.data_mean[1]) / points.data_std[1]
            mean, var = conditional(x1[0, 0])
            errors[resample, jump] = abs(z2.double().mean().item() - mean.item())
            assert abs(z2.double().var().item() - var) < 0.15
        assert errors[1, 1] < 0.25
        assert errors[4, 1] < errors[1, 1] and errors[4, 5] < errors[1, 1] and errors[4, 5] < 0.1, errors
    finally:
        points.data_mean = points.data_std = None


def test_inpainting_with_an_all_known_mask_returns_the_input(points):
    x = torch.randn(10, 2)
    assert torch.equal(A.inpaint(points, x, torch.ones(2), sampler="ddim", steps=5, seed=0), x)


@pytest.mark.parametrize(
    "x, mask, kwargs, needle",
    [
        (torch.zeros(3, 3), torch.ones(3), {}, "shape [N, 2]"),
        (torch.zeros(3, 2), torch.tensor([0.5, 1.0]), {}, "only 0"),
        (torch.zeros(3, 2), torch.ones(3), {}, "does not broadcast"),
        (torch.zeros(3, 2), torch.ones(2), {"resample": 0}, "resample"),
        (torch.zeros(3, 2), torch.ones(2), {"jump": 1.5}, "jump"),
        (torch.zeros(3, 2), torch.ones(2), {"steps": 201}, "steps"),
        (torch.full((3, 2), float("nan")), torch.ones(2), {}, "NaN"),
    ],
)
def test_inpainting_rejects_bad_inputs(points, x, mask, kwargs, needle):
    with pytest.raises(diffkit.DiffkitError, match=needle.replace("[", r"\[")):
        A.inpaint(points, x, mask, **kwargs)


# -- denoising / SDEdit ------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
def test_denoising_from_the_data_recovers_the_data_law(points, name):
    """An input drawn from the data, noised to strength ½ (the exact marginal at t₀),
    and brought back by the exact denoiser: the output follows the data law, and it
    stays correlated with its own input (less so at a larger strength)."""
    data = GaussianData(MEAN, COV)
    x = data.sample(8000, torch.Generator().manual_seed(4))
    out = A.denoise(points, x, 0.5, sampler=name, steps=100, seed=5)
    assert out.shape == x.shape
    assert ((out.double().mean(0) - MEAN).abs() < 0.06).all()
    assert ((torch.cov(out.double().T) - COV).abs() < 0.1).all()
    near = torch.corrcoef(torch.stack([x[:, 0], out[:, 0]]))[0, 1]
    far = torch.corrcoef(torch.stack([x[:, 0], A.denoise(points, x, 1.0, sampler=name, steps=100, seed=5)[:, 0]]))[0, 1]
    assert near > 0.5 and abs(far) < 0.1


def test_denoising_trades_faithfulness_for_realism(points):
    """SDEdit's trade-off (Meng et al. 2022, Sec. 4): inputs = data + noise of variance
    0.09 lie off the data's thin axis (variance 0.1 + 0.09); the larger the strength, the
    closer the outputs' spread along it comes back to the data's 0.1 (realism) and the
    farther they move from the clean originals (faithfulness)."""
    data = GaussianData(MEAN, COV)
    g = torch.Generator().manual_seed(6)
    clean = data.sample(4000, g)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=g)
    thin = torch.tensor([1.0, -1.0]) / 2**0.5  # the eigenvector of the small eigenvalue 0.1
    spread, distance = [], []
    for strength in (0.1, 0.2, 0.4):
        out = A.denoise(points, noisy, strength, sampler="dpm-solver", steps=100, seed=7)
        spread.append((out @ thin).var().item())
        distance.append((out - clean).square().mean().item())
    assert (noisy @ thin).var() > spread[0] > spread[1] > spread[2]
    assert abs(spread[2] - 0.1) < 0.025  # measured 0.113
    assert distance[0] < distance[1] < distance[2]


def test_strength_maps_to_a_timestep():
    assert A.strength_to_timestep(1.0, 1000) == 999
    assert A.strength_to_timestep(0.5, 1000) == 499
    assert A.strength_to_timestep(1e-6, 1000) == 0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(diffkit.DiffkitError, match="strength"):
            A.strength_to_timestep(bad, 1000)


def test_denoising_with_every_step_visits_the_timesteps_below_the_start(points):
    seen = []
    sampler = diffkit.build("sampler", "ddim")

    def spy(predict, schedule, shape, **kw):
        seen.append(kw["t_start"])
        return sampler(predict, schedule, shape, **kw)

    out = A.denoise(points, torch.zeros(3, 2), 0.25, sampler=spy, steps=20, seed=0)
    assert seen == [49] and out.shape == (3, 2)


# -- super-resolution (ILVR) -------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("factor", [2, 4])
def test_ilvr_output_downsamples_to_the_input(images, name, factor):
    low = torch.rand(5, 1, 4 // factor, 4 // factor) * 2 - 1
    out = A.upscale(images, low, sampler=name, steps=10, seed=0)
    assert out.shape == (5, 1, 4, 4)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(out, factor), low, rtol=0, atol=1e-5)
    if factor == 2:  # within the blocks, the images differ from the nearest upsampling
        assert not torch.allclose(out, torch.nn.functional.interpolate(low, scale_factor=2))


@pytest.mark.parametrize("name, tolerance", [("ddpm", 0.1), ("ddim", 0.25)])
def test_ilvr_samples_the_conditional_of_gaussian_data(images, name, tolerance):
    """For Gaussian data x ~ N(μ, Σ) and y = P x (P: 2×2 block means), x | y is Gaussian
    with mean m(y) = μ + ΣPᵀ(PΣPᵀ)⁻¹(y − Pμ) and covariance C = Σ − ΣPᵀ(PΣPᵀ)⁻¹PΣ. With
    the exact denoiser, ILVR's outputs for y of data images scatter around m(y) with the
    spread of C: mean squared distance tr(C)/16 (measured: ddpm 0.0517 vs 0.0495,
    ddim 0.058), and without a bias."""
    data = images.gaussian
    n = 400
    x = data.sample(n, torch.Generator().manual_seed(9))
    low = torch.nn.functional.avg_pool2d(x, 2)
    P = torch.nn.functional.avg_pool2d(torch.eye(16, dtype=F64).reshape(16, 1, 4, 4), 2).reshape(16, 4).T
    S, mu = data.cov, data.mean
    K = S @ P.T @ torch.linalg.inv(P @ S @ P.T)
    m = mu + (low.reshape(n, 4).double() - P @ mu) @ K.T
    spread = (S - K @ P @ S).trace().item() / 16
    out = A.upscale(images, low, sampler=name, steps=200, seed=10).reshape(n, 16).double()
    assert abs((out - m).square().mean().item() / spread - 1) < tolerance
    bias = (out - m).mean(0)
    assert (bias.abs() < 5 * ((S - K @ P @ S).diag() / n).sqrt()).all()


def test_low_pass_is_a_projection():
    x = torch.randn(3, 2, 8, 8)
    for f in (1, 2, 4, 8):
        once = A.low_pass(x, f)
        torch.testing.assert_close(A.low_pass(once, f), once)


@pytest.mark.parametrize(
    "low, kwargs, needle",
    [
        (torch.zeros(2, 1, 3, 3), {}, "whole factor"),
        (torch.zeros(2, 2, 2, 2), {}, "shape [N, 1, h, w]"),
        (torch.zeros(2, 1, 2, 2), {"factor": 4}, "whole factor"),
        (torch.zeros(2, 1, 2, 2), {"steps": 0}, "steps"),
    ],
)
def test_ilvr_rejects_bad_inputs(images, low, kwargs, needle):
    with pytest.raises(diffkit.DiffkitError, match=needle.replace("[", r"\[")):
        A.upscale(images, low, **kwargs)


def test_ilvr_needs_images(points):
    with pytest.raises(diffkit.DiffkitError, match="images"):
        A.upscale(points, torch.zeros(1, 1, 1, 1))


# -- the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """An untrained MLP on the 8×8 digits, saved as a run: enough for the commands'
    plumbing (the constraints hold whatever the network)."""
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 50},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        data={"type": "digits"},
        train={"preview": 0, "device": "cpu"},
    )
    return pipe.save(tmp_path_factory.mktemp("runs") / "digits")


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 50},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        data={"type": "moons", "n": 256},
        train={"steps": 5, "batch_size": 64, "preview": 0, "device": "cpu"},
    )
    pipe.fit(progress=False)
    return pipe.save(tmp_path_factory.mktemp("runs") / "moons")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def npy(path, array) -> str:
    np.save(path, np.asarray(array))
    return str(path)


def digits(n: int = 4) -> torch.Tensor:
    return diffkit.get_registry().build("data", {"type": "digits", "split": "test"}).x[:n]


def test_cli_inpaint_npy_and_png(capsys, digits_run, tmp_path):
    x = digits()
    mask = np.zeros((1, 8, 8), dtype=np.float32)
    mask[..., :4] = 1
    args = ["inpaint", digits_run, "--input", npy(tmp_path / "x.npy", x), "--mask", npy(tmp_path / "m.npy", mask)]
    code, out, err = run(capsys, *args, "--out", tmp_path / "out.npy", "--steps", 5, "--seed", 0, "--no-progress")
    assert code == 0, err
    result = np.load(tmp_path / "out.npy")
    assert result.shape == (4, 1, 8, 8) and result.dtype == np.float32
    assert np.array_equal(result[..., :4], x.numpy()[..., :4])
    assert "inpainted 4 inputs" in out
    code, _, err = run(capsys, *args, "--out", tmp_path / "out.png", "--steps", 5, "--sampler", "dpm-solver", "--resample", 2, "--jump", 2)
    assert code == 0, err
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_inpaint_from_image_files(capsys, digits_run, tmp_path):
    from PIL import Image

    pixels = ((digits(1)[0, 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code, _, err = run(
        capsys, "inpaint", digits_run, "--input", tmp_path / "digit.png", "--mask", tmp_path / "mask.png",
        "--out", tmp_path / "out.npy", "--steps", 5, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    result = np.load(tmp_path / "out.npy")
    assert result.shape == (1, 1, 8, 8)
    np.testing.assert_allclose(result[0, 0, :, :4], pixels[:, :4] / 127.5 - 1, atol=1e-6)


def test_cli_denoise_and_upscale(capsys, digits_run, moons_run, tmp_path):
    x = digits()
    code, out, err = run(
        capsys, "denoise", digits_run, "--input", npy(tmp_path / "x.npy", x), "--strength", 0.3,
        "--out", tmp_path / "d.npy", "--steps", 10, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "d.npy").shape == (4, 1, 8, 8) and "denoised 4 inputs" in out
    low = torch.nn.functional.avg_pool2d(x, 2)
    code, out, err = run(
        capsys, "upscale", digits_run, "--input", npy(tmp_path / "low.npy", low), "--out", tmp_path / "u.npy",
        "--steps", 5, "--sampler", "ddim", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    up = torch.from_numpy(np.load(tmp_path / "u.npy"))
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(up, 2), low, rtol=0, atol=1e-5)
    code, _, err = run(
        capsys, "upscale", digits_run, "--input", tmp_path / "low.npy", "--out", tmp_path / "u.png", "--steps", 5,
        "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    # points: denoise works and writes data coordinates; a scatter picture too
    pts = np.array([[0.0, 0.5], [1.0, -0.3], [2.0, 0.4]], dtype=np.float32)
    for suffix in ("npy", "png"):
        code, _, err = run(
            capsys, "denoise", moons_run, "--input", npy(tmp_path / "p.npy", pts), "--strength", 0.2,
            "--out", tmp_path / f"p-out.{suffix}", "--no-progress",
        )  # fmt: skip
        assert code == 0, err
    assert np.load(tmp_path / "p-out.npy").shape == (3, 2)


@pytest.mark.parametrize(
    "command, extra, needles",
    [
        ("inpaint", ["--mask", "MASK_BAD"], ["only 0"]),
        ("inpaint", ["--mask", "MASK_SHAPE"], ["does not broadcast"]),
        ("inpaint", ["--mask", "MASK", "--resample", "0"], ["--resample"]),
        ("inpaint", ["--mask", "MASK", "--jump", "0"], ["--jump"]),
        ("inpaint", ["--mask", "MISSING.npy"], ["does not exist"]),
        ("denoise", ["--strength", "0"], ["strength must lie in (0, 1]"]),
        ("denoise", ["--strength", "1.5"], ["strength must lie in (0, 1]"]),
        ("denoise", ["--strength", "0.5", "--steps", "51"], ["steps must be between 1"]),
        ("upscale", ["--factor", "3"], ["whole factor"]),
        ("upscale", ["--factor", "0"], ["--factor"]),
    ],
)
def test_cli_errors_are_one_clean_message(capsys, digits_run, tmp_path, command, extra, needles):
    x = digits()
    files = {
        "MASK_BAD": npy(tmp_path / "bad.npy", np.full((1, 8, 8), 0.5)),
        "MASK_SHAPE": npy(tmp_path / "shape.npy", np.ones((3, 8))),
        "MASK": npy(tmp_path / "m.npy", np.ones((1, 8, 8))),
        "MISSING.npy": str(tmp_path / "missing.npy"),
    }
    extra = [files.get(a, a) for a in extra]
    source = x if command != "upscale" else torch.nn.functional.avg_pool2d(x, 2)
    code, out, err = run(
        capsys, command, digits_run, "--input", npy(tmp_path / "x.npy", source), "--out", tmp_path / "o.npy",
        "--steps", "5", "--no-progress", *extra,
    )  # fmt: skip
    assert code == 1
    assert "Traceback" not in out + err and err.startswith("diffkit: error: ")
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize(
    "input_, out, needle",
    [
        ("x.npy", "o.txt", "--out must end in .npy or .png"),
        ("x.txt", "o.npy", "give an .npy array or an image"),
        ("bad.npy", "o.npy", "not a readable .npy"),
        ("bad.png", "o.npy", "not a readable image"),
        ("wrong.npy", "o.npy", "must have shape [N, 1, 8, 8]"),
    ],
)
def test_cli_bad_files_fail_cleanly(capsys, digits_run, tmp_path, input_, out, needle):
    npy(tmp_path / "x.npy", digits())
    npy(tmp_path / "wrong.npy", np.zeros((2, 3)))
    (tmp_path / "x.txt").write_text("1 2 3")
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    (tmp_path / "bad.png").write_bytes(b"not png")
    code, stdout, err = run(
        capsys, "denoise", digits_run, "--input", tmp_path / input_, "--strength", "0.5", "--out", tmp_path / out,
        "--steps", "5", "--no-progress",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in stdout + err and err.startswith("diffkit: error: ")
    assert needle in err


def test_cli_upscale_needs_an_image_model(capsys, moons_run, tmp_path):
    code, _, err = run(
        capsys, "upscale", moons_run, "--input", npy(tmp_path / "x.npy", np.zeros((1, 1, 1, 1))), "--out",
        tmp_path / "o.npy", "--no-progress",
    )  # fmt: skip
    assert code == 1 and "images" in err
