"""Python composition: building, fitting, sampling, writing the spec back, saving and loading."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from torch import nn

import diffkit
from diffkit import DiffkitError, Schedule, SpecError
from diffkit.spec import to_dict, validate_spec

TRAIN = {"steps": 20, "batch_size": 64, "preview": 0, "device": "cpu", "log_every": 10}


def make_pipe(**overrides) -> diffkit.Pipeline:
    kwargs = dict(
        schedule={"type": "cosine", "timesteps": 100},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        data={"type": "moons", "n": 512},
        train=TRAIN,
    )
    return diffkit.Pipeline(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def fitted() -> diffkit.Pipeline:
    pipe = make_pipe()
    pipe.fit(progress=False)
    return pipe


# -- composition ----------------------------------------------------------------------------
def test_components_are_built_from_the_sections():
    pipe = make_pipe()
    assert isinstance(pipe.schedule, Schedule)
    assert pipe.schedule.T == 100
    abar = pipe.schedule.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (100,)
    assert bool((abar[1:] < abar[:-1]).all())
    assert isinstance(pipe.denoiser, nn.Module)
    assert pipe.denoiser.inp.out_features == 32  # the hidden width asked for
    assert pipe.context.sample_shape == (2,)


def test_the_denoiser_takes_integer_timesteps_of_shape_batch():
    pipe = make_pipe()
    x_t = torch.randn(8, 2)
    t = torch.randint(0, pipe.schedule.T, (8,))
    out = pipe.denoiser(x_t, t)
    assert out.shape == x_t.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the network depends on t: the same x_t at other timesteps gives other outputs
    assert not torch.allclose(out, pipe.denoiser(x_t, torch.full((8,), 99)))


def test_fit_trains_for_the_configured_steps(fitted):
    assert fitted.steps_trained == 20
    data = fitted.dataset.tensors()[0].double()
    torch.testing.assert_close(fitted.data_mean, data.mean(0).float())
    torch.testing.assert_close(fitted.data_std, data.std(0).float())


def test_fit_reports_a_finite_decreasing_loss():
    pipe = make_pipe(train={**TRAIN, "steps": 60, "lr": 3e-3})
    result = pipe.fit(progress=False)
    assert result.steps == 60
    assert [row["step"] for row in result.history] == [10, 20, 30, 40, 50, 60]
    losses = [row["loss"] for row in result.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.final_loss == losses[-1]
    assert losses[-1] < losses[0]
    # keyword overrides apply to one call and continue the count
    pipe.fit(progress=False, steps=5)
    assert pipe.steps_trained == 65


def test_sample_has_the_right_shape_and_is_in_data_coordinates(fitted):
    x = fitted.sample(200, seed=0)
    assert x.shape == (200, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.device.type == "cpu"


def test_samples_come_back_in_the_datas_own_coordinates():
    # One Gaussian far from the origin: N((5, 0), 0.1² I). The model works on
    # standardised data (mean 0, std 1), so samples left in model space would sit
    # near 0 with a spread near 1; in data coordinates they sit near (5, 0), and the
    # standardisation shrinks whatever spread the briefly trained model has by 10x.
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 50},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        data={"type": "gaussians", "components": 1, "radius": 5.0, "std": 0.1, "n": 512},
        train=TRAIN,
    )
    pipe.fit(progress=False)
    torch.testing.assert_close(pipe.data_mean, torch.tensor([5.0, 0.0]), atol=0.05, rtol=0)
    x = pipe.sample(500, seed=0)
    mean = x.mean(0)
    assert abs(mean[0].item() - 5.0) < 0.5 and abs(mean[1].item()) < 0.5
    assert (x.std(0) < 1.0).all()


def test_same_seed_same_samples_other_seed_other_samples(fitted):
    a, b, c = fitted.sample(64, seed=7), fitted.sample(64, seed=7), fitted.sample(64, seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (10, 10), (10, 64), (1, 1)])
def test_sample_in_batches_gives_n_samples(fitted, n, batch_size):
    x = fitted.sample(n, seed=1, batch_size=batch_size)
    assert x.shape == (n, 2)
    assert torch.equal(x, fitted.sample(n, seed=1, batch_size=batch_size))
    if n >= 3:  # distinct draws, not one chunk repeated
        assert not torch.allclose(x[0], x[-1])


def test_sample_with_fewer_steps_and_another_sampler(fitted):
    assert fitted.sample(16, seed=0, steps=10).shape == (16, 2)
    y = fitted.sample(16, seed=0, sampler={"type": "ddpm", "variance": "beta"})
    assert y.shape == (16, 2) and torch.isfinite(y).all()
    assert not torch.equal(y, fitted.sample(16, seed=0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "at least 1"),
        ({"n": 4, "steps": 101}, "between 1 and the schedule's T = 100"),
        ({"n": 4, "steps": 0}, "between 1 and the schedule's T = 100"),
        ({"n": 4, "sampler": "ddpn"}, "Did you mean 'ddpm'"),
    ],
)
def test_bad_sample_arguments_are_diffkit_errors(fitted, kwargs, message):
    with pytest.raises(DiffkitError, match=message):
        fitted.sample(**kwargs)


# -- the spec, written back ---------------------------------------------------------------------
def test_the_pipelines_spec_records_every_section(fitted):
    spec = fitted.spec
    assert spec.schedule.type == "cosine" and spec.schedule.timesteps == 100
    assert spec.denoiser.type == "mlp" and spec.denoiser.hidden == 32 and spec.denoiser.depth == 1
    assert spec.data.type == "moons" and spec.data.n == 512
    assert (spec.objective.type, spec.sampler.type) == ("epsilon", "ddpm")
    assert spec.train.steps == 20 and spec.train.batch_size == 64
    assert spec.seed == 0


def test_the_spec_round_trips(fitted):
    spec = fitted.spec
    assert validate_spec(to_dict(spec)) == spec
    again = diffkit.Pipeline.from_spec(spec)
    assert again.spec == spec
    assert again.schedule.alphas_cumprod.equal(fitted.schedule.alphas_cumprod)
    assert sum(p.numel() for p in again.denoiser.parameters()) == sum(p.numel() for p in fitted.denoiser.parameters())


def test_components_from_diffkit_build_carry_their_spec():
    schedule = diffkit.build("schedule", "cosine", timesteps=100)
    pipe = diffkit.Pipeline(schedule=schedule, denoiser="mlp", data={"type": "moons", "n": 64})
    assert pipe.schedule is schedule
    assert pipe.spec.schedule.type == "cosine" and pipe.spec.schedule.timesteps == 100


def test_a_qualified_name_stays_qualified_in_the_written_spec():
    # pinning the built-in keeps the spec unambiguous if another plugin adds a `cosine`
    schedule = {"type": "diffkit.schedules:cosine", "timesteps": 10}
    spec = validate_spec({"data": {"type": "moons", "n": 64}, "denoiser": "mlp", "schedule": schedule})
    pipe = diffkit.Pipeline.from_spec(spec)
    assert pipe.spec.schedule.type == "diffkit.schedules:cosine"
    assert pipe.spec == spec


class TinyDenoiser(nn.Module):
    """A hand-built network: ε_θ(x_t, t) = MLP([x_t, t / T])."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T = T
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x_t, t, cond=None):
        return self.net(torch.cat([x_t, (t.float() / self.T)[:, None]], dim=1))


def test_a_hand_built_denoiser_fits_and_samples_but_has_no_spec(tmp_path):
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 50},
        denoiser=TinyDenoiser(50),
        data={"type": "moons", "n": 256},
        train=TRAIN,
    )
    before = [p.detach().clone() for p in pipe.denoiser.parameters()]
    result = pipe.fit(progress=False)
    assert result.steps == 20
    assert any(not torch.equal(a, b) for a, b in zip(before, pipe.denoiser.parameters()))
    x = pipe.sample(30, seed=0)
    assert x.shape == (30, 2) and torch.isfinite(x).all()
    with pytest.raises(DiffkitError) as err:
        pipe.spec
    msg = str(err.value)
    assert "denoiser" in msg and "TinyDenoiser" in msg and "built by hand" in msg
    assert "diffkit.build('denoiser'" in msg
    # so it cannot be saved either, and nothing is left half-written
    with pytest.raises(DiffkitError, match="built by hand"):
        pipe.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_data_given_as_an_object_has_no_spec():
    data = diffkit.build("data", "moons", n=128)
    pipe = diffkit.Pipeline(schedule={"type": "linear", "timesteps": 50}, denoiser="mlp", data=data)
    assert pipe.dataset is data
    with pytest.raises(DiffkitError, match="data was given as an object"):
        pipe.spec


def test_a_pipeline_needs_data_or_a_shape():
    with pytest.raises(DiffkitError, match=r"data=\.\.\.\) or the shape"):
        diffkit.Pipeline(denoiser="mlp")
    pipe = diffkit.Pipeline(schedule={"type": "linear", "timesteps": 10}, denoiser={"type": "mlp", "hidden": 8}, shape=(3,))
    assert pipe.sample(4, seed=0).shape == (4, 3)


# -- save and load ----------------------------------------------------------------------------
def test_save_and_load_give_identical_samples(fitted, tmp_path):
    run = fitted.save(tmp_path / "run")
    loaded = diffkit.Pipeline.load(run)
    assert loaded.spec == fitted.spec
    assert loaded.steps_trained == fitted.steps_trained
    assert torch.equal(loaded.data_mean, fitted.data_mean) and torch.equal(loaded.data_std, fitted.data_std)
    for (name, a), (_, b) in zip(fitted.denoiser.state_dict().items(), loaded.denoiser.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded.sample(64, seed=3), fitted.sample(64, seed=3))
    assert torch.equal(loaded.sample(10, seed=3, batch_size=4), fitted.sample(10, seed=3, batch_size=4))


def test_a_loaded_pipeline_keeps_training_where_it_stopped(fitted, tmp_path):
    loaded = diffkit.Pipeline.load(fitted.save(tmp_path / "run"))
    assert loaded._online is not None  # the raw weights come back beside the EMA
    loaded.fit(progress=False, steps=5)
    assert loaded.steps_trained == 25


def test_weights_live_in_safetensors_and_nothing_is_pickled(fitted, tmp_path):
    run = fitted.save(tmp_path / "run")
    files = sorted(p.name for p in run.iterdir())
    assert files == ["denoiser.safetensors", "meta.json", "spec.yaml"]
    raw = (run / "denoiser.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert raw[8:9] == b"{" and header_len < len(raw)
    for path in run.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"\x80"), f"{path.name} looks like a pickle"
        assert not data.startswith(b"PK\x03\x04"), f"{path.name} looks like a torch.save zip"
        with pytest.raises(Exception):
            pickle.loads(data)
    from safetensors.torch import load_file

    tensors = load_file(str(run / "denoiser.safetensors"))
    assert {"data.mean", "data.std"} <= set(tensors)
    assert any(k.startswith("denoiser.") for k in tensors) and any(k.startswith("online.") for k in tensors)


def test_load_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(DiffkitError, match="is not a directory"):
        diffkit.Pipeline.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffkitError, match="has no spec.yaml"):
        diffkit.Pipeline.load(tmp_path / "empty")


# -- diffkit.build ------------------------------------------------------------------------------
def test_build_a_component_by_name():
    schedule = diffkit.build("schedule", "cosine", timesteps=50)
    assert isinstance(schedule, Schedule) and schedule.T == 50
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.__diffkit_spec__ == {"type": "cosine", "timesteps": 50, "s": 0.008, "max_beta": 0.999}
    assert diffkit.build("schedule", {"type": "cosine", "timesteps": 50}).alphas_cumprod.equal(schedule.alphas_cumprod)


def test_build_with_an_invalid_parameter_names_its_path():
    with pytest.raises(SpecError) as err:
        diffkit.build("schedule", "cosine", timesteps=1)
    assert [p for p, _ in err.value.problems] == ["schedule.timesteps"]
    assert "schedule.timesteps" in str(err.value)
    with pytest.raises(SpecError) as err:
        diffkit.build("schedule", "cosine", timestep=10)
    assert [p for p, _ in err.value.problems] == ["schedule.timestep"]


def test_build_an_unknown_component():
    with pytest.raises(diffkit.ComponentLookupError, match="Did you mean 'cosine'"):
        diffkit.build("schedule", "cosin")
