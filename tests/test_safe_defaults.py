"""Safe defaults of sampling: x̂_0 is bounded unless the spec opts out, a bound that was hit is
reported, and non-finite samples or guidance scales are refused instead of written out."""

from __future__ import annotations

import hashlib
import json

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import diffkit
from diffkit import checkpoint
from diffkit import diffusion as D
from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.interfaces import BuildContext
from diffkit.pipeline import Pipeline
from diffkit.spec import load_spec

# An ε-network on two moons with the linear schedule of T = 1000, as examples/moons.yaml,
# trained briefly: at t = T − 1, x̂_0 = (x − σ ε̂)/√ᾱ multiplies the network's error by
# 1/√ᾱ ≈ 150, so ddim and dpm-solver at 20 steps throw points far away unless x̂_0 is bounded.
MOONS = {
    "seed": 0,
    "data": {"type": "moons", "noise": 0.05},
    "schedule": {"type": "linear", "timesteps": 1000},
    "denoiser": {"type": "mlp"},
    "objective": {"type": "epsilon"},
    "sampler": {"type": "ddpm"},
    "train": {"steps": 200, "batch_size": 256, "preview": 0, "device": "cpu", "log_every": 50},
}
SAMPLERS = ["ddpm", "ddim", "dpm-solver", "sgld", "pc"]
ROUNDING = 1e-5  # the sampler re-derives x̂_0 from the bounded ε̂ in float32


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moons")
    spec = root / "moons.yaml"
    spec.write_text(yaml.safe_dump(MOONS))
    assert main(["train", str(spec), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def moons(moons_run: Path) -> Pipeline:
    return Pipeline.load(moons_run)


def beyond(pipe: Pipeline, x: torch.Tensor) -> int:
    """How many samples (data coordinates) lie outside the run's recorded range."""
    assert pipe.data_range is not None
    z = pipe._normalize(x)
    low, high = pipe.data_range
    return int(((z < low - ROUNDING) | (z > high + ROUNDING)).any(1).sum())


# -- the option ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_defaults_to_auto_and_null_opts_out(name: str) -> None:
    assert diffkit.build("sampler", name).clip_denoised == "auto"
    assert diffkit.build("sampler", name, clip_denoised=None).clip_denoised is None
    assert diffkit.build("sampler", name, clip_denoised=2.5).clip_denoised == 2.5


def test_a_guided_pipeline_takes_its_samplers_bound() -> None:
    ctx = BuildContext(sample_shape=(2,), num_classes=3)
    cfg = {"type": "classifier-free"}
    assert Pipeline(denoiser={"type": "mlp", "num_classes": 3}, guidance=cfg, _context=ctx).x0_bound() is not None
    free = Pipeline(sampler={"type": "ddim", "clip_denoised": None}, guidance=cfg, _context=ctx)
    assert free.x0_bound() is None


@pytest.mark.parametrize("value", [0, -1.0, "inf", "nan", "big"])
def test_a_bad_clip_denoised_is_a_spec_error_naming_the_field(value: object) -> None:
    with pytest.raises(DiffkitError, match=r"sampler\.clip_denoised"):
        load_spec({**MOONS, "sampler": {"type": "ddim", "clip_denoised": value}})


def test_examples_leave_clip_denoised_at_its_default() -> None:
    root = Path(__file__).parent.parent / "examples"
    files = [p for ext in ("yaml", "toml", "json", "py") for p in root.glob(f"*.{ext}")]
    assert files and not [p.name for p in files if "clip_denoised" in p.read_text()]


# -- the math --------------------------------------------------------------------------------------
def test_bound_x0_leaves_in_range_predictions_bit_for_bit_and_clips_the_rest() -> None:
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g)
    abar = torch.full((500, 1), 0.3, dtype=torch.float64)
    low, high = torch.tensor([-1.0, -0.5]), torch.tensor([1.0, 0.5])
    out, moved = D.bound_x0(eps, x_t, abar, low, high)
    x0 = D.eps_to_x0(eps, x_t, abar)
    assert torch.equal(moved, (x0 < low) | (x0 > high)) and moved.any() and not moved.all()
    assert torch.equal(out[~moved], eps[~moved])  # untouched where x̂_0 was in range
    assert torch.allclose(D.eps_to_x0(out, x_t, abar), x0.clamp(low, high), atol=1e-6)


def test_data_range_is_the_min_and_max_widened_by_the_margin_each_side() -> None:
    x = torch.tensor([[0.0, -2.0], [4.0, 2.0], [1.0, 0.0]])
    m = D.RANGE_MARGIN
    expected = torch.tensor([[0.0 - 4 * m, -2.0 - 4 * m], [4.0 + 4 * m, 2.0 + 4 * m]])
    assert torch.allclose(D.data_range(x), expected)


def test_the_guided_prediction_is_bounded_after_guidance() -> None:
    """A guidance that throws x̂_0 far away is held in the bound: the core's ``finish`` runs
    on what the guidance returns, not only on the model's own prediction."""
    ctx = BuildContext(sample_shape=(2,), num_classes=3)
    denoiser = {"type": "mlp", "hidden": 16, "depth": 1, "num_classes": 3}
    cfg = {"type": "classifier-free", "scale": 1000.0}  # an untrained network's ε(x, y) − ε(x, ∅), times 1000
    held = Pipeline(denoiser=denoiser, sampler={"type": "ddim", "steps": 10, "clip_denoised": 0.5}, guidance=cfg, _context=ctx)
    x = held.sample(300, seed=0, labels=0)
    assert x.abs().max() <= 0.5 + ROUNDING and held.last_clipped > 0
    free = Pipeline(denoiser=denoiser, sampler={"type": "ddim", "steps": 10, "clip_denoised": None}, guidance=cfg, _context=ctx)
    assert free.sample(300, seed=0, labels=0).abs().max() > 5


# -- what a run records ------------------------------------------------------------------------------
def test_a_run_records_the_training_datas_range_and_load_gets_it_back(moons_run: Path, moons: Pipeline) -> None:
    tensors = checkpoint.load_tensors(moons_run / "denoiser.safetensors")
    data = Pipeline.from_spec(MOONS).dataset.tensors()[0].double()
    z = (data - moons.data_mean.double()) / moons.data_std.double()
    assert torch.allclose(tensors["data.range"], D.data_range(z).float())
    assert torch.equal(moons.data_range, tensors["data.range"])
    # the checkpoints carry it too, so a resumed run keeps its bound
    (ckpt,) = sorted((moons_run / "checkpoints").glob("*.safetensors"))[-1:]
    assert torch.equal(checkpoint.load_tensors(ckpt)["data.range"], tensors["data.range"])


def test_a_run_without_a_recorded_range_falls_back_to_the_documented_bound(moons_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for f in moons_run.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    tensors = checkpoint.load_tensors(old / "denoiser.safetensors")
    del tensors["data.range"]  # as a run saved before ranges were recorded
    checkpoint.save_tensors(old / "denoiser.safetensors", tensors, metadata={"format": "diffkit-pipeline-1"})
    _resign(old)
    pipe = Pipeline.load(old)
    assert pipe.data_range is None
    bound = pipe.x0_bound()
    assert (bound.low.item(), bound.high.item()) == (-D.FALLBACK_BOUND, D.FALLBACK_BOUND)
    z = pipe._normalize(pipe.sample(500, seed=0, sampler={"type": "ddim", "steps": 20}))
    assert z.abs().max() <= D.FALLBACK_BOUND + ROUNDING


def test_images_are_bounded_to_minus_one_one_and_a_number_to_plus_minus_it() -> None:
    ctx = BuildContext(sample_shape=(1, 4, 4), data_kind="images")
    pipe = Pipeline(denoiser={"type": "unet", "channels": 8, "channel_mult": [1]}, _context=ctx)
    bound = pipe.x0_bound()
    assert (bound.low.item(), bound.high.item()) == (-1.0, 1.0)
    bound = pipe.x0_bound(diffkit.build("sampler", "ddim", clip_denoised=0.25))
    assert (bound.low.item(), bound.high.item()) == (-0.25, 0.25)
    assert pipe.x0_bound(diffkit.build("sampler", "ddim", clip_denoised=None)) is None


@pytest.mark.parametrize(
    "sampler",
    [
        {"type": "ddpm", "steps": 20},
        {"type": "ddim", "steps": 20},
        {"type": "dpm-solver", "steps": 10},
        {"type": "ddim", "steps": 20, "cfg": True},
    ],
    ids=["ddpm", "ddim", "dpm-solver", "cfg-ddim"],
)
def test_images_by_default_are_the_samples_of_clip_denoised_one(sampler: dict) -> None:
    # The image measurements of the defaults (digits judged as confidently with the bound as
    # 0.1's clip_denoised: 1.0; CFG digits hitting the label) carry over exactly: with every
    # option at its default an image model draws, bit for bit, what clip_denoised: 1.0 draws.
    ctx = BuildContext(sample_shape=(1, 8, 8), data_kind="images", num_classes=3)
    sampler = dict(sampler)
    guidance = {"type": "classifier-free"} if sampler.pop("cfg", False) else None
    pipe = Pipeline(denoiser={"type": "unet", "channels": 8, "channel_mult": [1], "num_classes": 3}, guidance=guidance, _context=ctx)
    labels = 1 if guidance else None
    one = {**sampler, "clip_denoised": 1.0}
    a = pipe.sample(8, seed=0, sampler=sampler, labels=labels)
    share = pipe.last_clipped
    b = pipe.sample(8, seed=0, sampler=one, labels=labels)
    assert share is not None and share > 0  # the untrained network's x̂_0 leaves [−1, 1]: the bound acts
    assert torch.equal(a, b)
    free = {**sampler, "clip_denoised": None}
    assert not torch.equal(a, pipe.sample(8, seed=0, sampler=free, labels=labels))


# -- the measurement of the defaults ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["ddim", "dpm-solver"])
def test_default_fast_samplers_put_no_moons_sample_beyond_the_recorded_range(moons: Pipeline, name: str) -> None:
    x = moons.sample(2000, seed=0, sampler={"type": name, "steps": 20})
    assert torch.isfinite(x).all() and beyond(moons, x) == 0
    assert 0 < moons.last_clipped < 1
    # the same network without the bound: points far beyond it (this run's measure of the defect)
    free = moons.sample(2000, seed=0, sampler={"type": name, "steps": 20, "clip_denoised": None})
    assert beyond(moons, free) > 0 and moons.last_clipped is None


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_is_bounded_through_the_pipeline(moons: Pipeline, name: str) -> None:
    params = {"sgld": {"steps": 10, "steps_per_level": 2}, "pc": {"steps": 20}, "ddpm": {"steps": 20}}.get(name, {})
    x = moons.sample(300, seed=1, sampler={"type": name, "clip_denoised": 0.5, **params})
    if name != "sgld":  # sgld ends with Tweedie's x̂_0; the others land on their last x̂_0 too
        assert moons._normalize(x).abs().max() <= 0.5 + ROUNDING
    assert moons.last_clipped is not None and moons.last_clipped > 0


def test_applications_use_the_bound(moons: Pipeline) -> None:
    from diffkit import applications as A

    start = moons.denormalize(torch.zeros(50, 2))
    out = A.denoise(moons, start, 0.9, sampler={"type": "ddim", "clip_denoised": 0.2}, steps=10, seed=0)
    assert moons._normalize(out).abs().max() <= 0.2 + ROUNDING and moons.last_clipped > 0


# -- reporting, and what is refused -----------------------------------------------------------------
def test_sample_reports_on_stderr_when_the_bound_was_hit(capsys, moons_run: Path, tmp_path: Path, moons: Pipeline) -> None:
    out = tmp_path / "x.npy"
    code, _, err = run(capsys, "sample", str(moons_run), "--n", "500", "--seed", "0", "--sampler", "ddim", "--out", str(out), "--no-progress")
    assert code == 0
    moons.sample(500, seed=0, sampler="ddim")
    share = moons.last_clipped
    assert share > 0
    assert err == (
        f"diffkit: the bound on x̂_0 was hit: {share:.2%} of the predicted x̂_0 values were clipped to it"
        " (sampler.clip_denoised; null turns it off)\n"
    )
    assert beyond(moons, torch.from_numpy(np.load(out))) == 0


@pytest.mark.parametrize("scale", ["inf", "nan", "-1", "-inf"])
def test_a_non_finite_or_negative_guidance_scale_is_refused_up_front(capsys, moons_run: Path, tmp_path: Path, moons: Pipeline, scale: str) -> None:
    out = tmp_path / "x.npy"
    code, stdout, err = run(
        capsys, "sample", str(moons_run), "--n", "5", "--label", "0", f"--guidance-scale={scale}", "--out", str(out)
    )
    expected = f"the guidance scale must be a finite number of at least 0, got {float(scale)}"
    assert code != 0 and stdout == "" and not out.exists()
    assert err.startswith(f"diffkit: error: {expected}") and err.count("\n") == 1
    with pytest.raises(DiffkitError, match=expected.replace("(", r"\(")):
        moons.sample(5, labels=0, guidance_scale=float(scale))


def _resign(run: Path) -> None:
    """Record the rewritten weights' checksum in meta.json, as a run saved that way would have."""
    meta = json.loads((run / "meta.json").read_text())
    meta["sha256"]["denoiser.safetensors"] = hashlib.sha256((run / "denoiser.safetensors").read_bytes()).hexdigest()
    (run / "meta.json").write_text(json.dumps(meta))


def test_nan_weights_are_an_error_naming_them_not_nan_samples(moons: Pipeline) -> None:
    # A run's file with NaN weights is refused at load (tests/test_memory_integrity.py); weights
    # that become NaN in memory (a diverged fit) are named when sampling meets them.
    pipe = Pipeline.from_spec(MOONS)
    state = moons.denoiser.state_dict()
    name = next(k for k in state if k.endswith("weight"))
    state[name] = torch.full_like(state[name], math.nan)
    pipe.denoiser.load_state_dict(state)
    pipe.data_mean, pipe.data_std, pipe.data_range = moons.data_mean, moons.data_std, moons.data_range
    with pytest.raises(DiffkitError) as err:
        pipe.sample(5, seed=0)
    assert str(err.value).startswith("sampling produced NaN or infinite values in 5 of 5 samples")
    assert f"the denoiser's weights hold NaN or infinite values ({name})" in str(err.value)


def test_nan_data_statistics_are_named(moons: Pipeline) -> None:
    pipe = Pipeline.from_spec(MOONS)
    pipe.denoiser.load_state_dict(moons.denoiser.state_dict())
    pipe.data_mean, pipe.data_range = moons.data_mean, moons.data_range
    pipe.data_std = torch.full_like(moons.data_std, math.nan)
    with pytest.raises(DiffkitError, match=r"the run's data.std holds NaN or infinite values"):
        pipe.sample(5, seed=0)
