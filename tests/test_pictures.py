"""Pictures and image output: sample grids, trajectories, the forward process, loss curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import diffkit
from diffkit import plotting
from diffkit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY_DIGITS = {
    "seed": 0,
    "data": {"type": "digits"},
    "schedule": {"type": "linear", "timesteps": 20},
    "denoiser": {"type": "unet", "channels": 8, "channel_mult": [1, 2], "num_heads": 2},
    "sampler": {"type": "ddpm", "clip_denoised": 1.0},
    "train": {"steps": 2, "batch_size": 16, "preview": 4, "log_every": 1},
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    spec = root / "digits.yaml"
    spec.write_text(yaml.safe_dump(TINY_DIGITS))
    assert main(["train", str(spec), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        return img.size


def test_training_images_writes_a_grid_preview_and_a_loss_curve(digits_run: Path) -> None:
    assert _png_size(digits_run / "samples.png")[0] > 0
    assert _png_size(digits_run / "loss.png")[0] > 0


def test_image_samples_as_npy_are_nchw_in_minus_one_one(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.npy"
    assert main(["sample", str(digits_run), "--n", "5", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    x = np.load(out)
    assert x.shape == (5, 1, 8, 8) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0  # clip_denoised: 1.0 keeps x̂_0, hence the last step, in range


def test_grid_has_one_tile_per_sample(digits_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    assert main(["sample", str(digits_run), "--n", "9", "--seed", "0", "--out", str(out), "--no-progress"]) == 0
    # 9 samples → 3×3 tiles of 8 px with 1 px padding around each: 3·9 + 1 = 28 px, enlarged 4×
    assert _png_size(out) == (28 * 4, 28 * 4)


def test_grid_pixels_are_the_samples(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 2 * 4 * 4).reshape(2, 1, 4, 4)
    path = plotting.image_grid(images, tmp_path / "g.png", nrow=2, scale=1)
    with Image.open(path) as img:
        grid = np.asarray(img.convert("L"), dtype=np.float64)
    # first tile starts after 1 px of padding; [-1, 1] maps to [0, 255]
    expected = (images[0, 0].numpy() + 1) / 2 * 255
    np.testing.assert_allclose(grid[1:5, 1:5], expected, atol=1.0)


def test_trajectory_strip_goes_from_noise_to_the_samples(digits_run: Path, tmp_path: Path) -> None:
    pipe = diffkit.Pipeline.load(digits_run)
    ts, states = pipe.trajectory(n=3, frames=5, seed=4)
    assert ts[0] == pipe.schedule.T - 1 and ts[-1] == -1  # starts in noise, ends at x_0
    assert states.shape == (5, 3, 1, 8, 8)
    # the last frame is exactly what sample() returns with the same seed
    torch.testing.assert_close(states[-1], pipe.sample(3, seed=4))
    # the first frame is the prior N(0, I): its spread is far larger than an image's
    assert states[0].std() > 0.5
    out = tmp_path / "traj.png"
    code = main(["sample", str(digits_run), "--n", "4", "--out", str(tmp_path / "g.png"), "--trajectory", str(out), "--no-progress"])
    assert code == 0 and _png_size(out)[0] > 0


def test_forward_process_figure_from_a_spec_and_its_statistics(tmp_path: Path) -> None:
    spec = tmp_path / "digits.yaml"
    spec.write_text(yaml.safe_dump(TINY_DIGITS))
    out = tmp_path / "forward.png"
    assert main(["forward", str(spec), "--out", str(out), "--n", "4", "--frames", "4"]) == 0
    assert _png_size(out)[0] > 0
    pipe = diffkit.Pipeline.from_spec(spec)
    x0 = torch.stack([pipe.dataset[i][0] for i in range(256)])
    states = pipe.forward_process(x0, [0, pipe.schedule.T - 1], seed=0)
    # t = 0 barely changes the data; at T−1 the signal weight is √ᾱ_T−1 and the rest is noise
    assert (states[0] - x0).abs().max() < 0.05
    abar = pipe.schedule.alphas_cumprod[-1].item()
    assert abs(states[1].var().item() - (abar * x0.var().item() + 1 - abar)) < 0.1


def test_sampling_in_chunks_bounds_memory_and_keeps_the_count(digits_run: Path) -> None:
    pipe = diffkit.Pipeline.load(digits_run)
    sizes = []
    pipe.sample(10, seed=0, batch_size=4, callback=lambda t, x: sizes.append(x.shape[0]))
    assert set(sizes) == {4, 2}  # chunks of 4, 4 and 2: no state ever holds all 10
    assert pipe.sample(10, seed=0, batch_size=4).shape == (10, 1, 8, 8)


def test_picture_paths_must_be_png(digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sample", str(digits_run), "--n", "2", "--out", str(tmp_path / "g.png"), "--trajectory", str(tmp_path / "t.jpg")])
    err = capsys.readouterr().err
    assert code == 1 and "--trajectory must name a .png file" in err and "Traceback" not in err
