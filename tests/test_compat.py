"""A run directory saved by diffkit 0.1 loads and draws the same samples for the same seed.

``tests/data/run-0.1`` and ``tests/data/samples-0.1.npz`` were written by diffkit 0.1 with
``tests/data/make_run_0_1.py`` (a small ε-model of two moons on a linear table of T = 100).
0.1's samplers did not bound x̂_0, so the comparison asks for ``clip_denoised: null``, and
0.1 drew its noise from one generator across the batch, which ``noise="batch"`` reproduces
(the default draws it per sample, so that a seed fixes a sample whatever the batch).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffkit import Pipeline

DATA = Path(__file__).parent / "data"
SAMPLERS = {
    "ddpm": {"type": "ddpm"},
    "ddim": {"type": "ddim", "steps": 10},
    "dpm-solver": {"type": "dpm-solver", "steps": 10},
    "ddim-eta1": {"type": "ddim", "steps": 20, "eta": 1.0},
}


@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("compat") / "run-0.1"
    shutil.copytree(DATA / "run-0.1", run)
    return run


@pytest.mark.parametrize("name", SAMPLERS)
def test_a_0_1_run_draws_the_samples_it_drew_then(old_run: Path, name: str) -> None:
    expected = np.load(DATA / "samples-0.1.npz")[name]
    pipe = Pipeline.load(old_run)
    x = pipe.sample(16, seed=7, sampler={**SAMPLERS[name], "clip_denoised": None}, noise="batch")
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_reading_the_old_run_changes_nothing(old_run: Path) -> None:
    before = {p: p.read_bytes() for p in old_run.rglob("*") if p.is_file()}
    Pipeline.load(old_run).sample(4, seed=0)
    assert {p: p.read_bytes() for p in old_run.rglob("*") if p.is_file()} == before


# -- parameters added since a run was saved ------------------------------------------------------
SCORE_SPEC = {
    "seed": 0,
    "data": {"type": "moons", "n": 512},
    "schedule": {"type": "vp"},
    "denoiser": {"type": "mlp", "hidden": 16, "depth": 1},
    "objective": {"type": "score", "scale_by_sigma": False},
    "sampler": {"type": "euler", "steps": 8},
    "train": {"steps": 20, "batch_size": 64, "preview": 0, "device": "cpu"},
}


def _drop_keys(spec_file: Path, section: str, keys: set[str]) -> None:
    """Rewrite a saved spec.yaml as a release before ``keys`` existed wrote it."""
    import yaml

    spec = yaml.safe_load(spec_file.read_text())
    spec[section] = {k: v for k, v in spec[section].items() if k not in keys}
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_a_score_run_saved_before_scale_by_sigma_reads_its_output_as_the_score(tmp_path: Path) -> None:
    """A saved spec without ``scale_by_sigma`` was trained with the output read as the score:
    it loads so (the parameter's saved default) and draws what it drew, while a spec a user
    writes without the parameter gets today's default."""
    pipe = Pipeline.from_spec(SCORE_SPEC)
    pipe.fit(progress=False)
    before = pipe.sample(32, seed=5)
    run = pipe.save(tmp_path / "run")
    _drop_keys(run / "spec.yaml", "objective", {"scale_by_sigma"})
    loaded = Pipeline.load(run)
    assert loaded.objective.params.scale_by_sigma is False
    np.testing.assert_array_equal(loaded.sample(32, seed=5).numpy(), before.numpy())
    fresh = Pipeline.from_spec({**SCORE_SPEC, "objective": {"type": "score"}})
    assert fresh.objective.params.scale_by_sigma is True


def test_a_rectified_flow_run_saved_before_t_sampling_keeps_uniform_t(tmp_path: Path) -> None:
    spec = {**SCORE_SPEC, "schedule": {"type": "rectified-flow"}, "objective": {"type": "flow"}}
    pipe = Pipeline.from_spec(spec)
    pipe.fit(progress=False)
    run = pipe.save(tmp_path / "run")
    assert pipe.schedule.t_sampling == "logit-normal"
    _drop_keys(run / "spec.yaml", "schedule", {"t_sampling", "logit_mean", "logit_std", "uniform_fraction"})
    assert Pipeline.load(run).schedule.t_sampling == "uniform"


def test_resuming_a_checkpoint_from_before_a_parameter_names_the_old_value(tmp_path: Path) -> None:
    """A checkpoint whose spec lacks ``scale_by_sigma`` resumed with a spec that takes today's
    default is refused, and the message gives the value it was trained with."""
    import json

    from diffkit import DiffkitError

    spec = {**SCORE_SPEC, "objective": {"type": "score"}, "train": {**SCORE_SPEC["train"], "checkpoint_every": 10}}
    old = {**spec, "objective": {"type": "score", "scale_by_sigma": False}}
    Pipeline.from_spec(old).fit(progress=False, out=tmp_path / "run", steps=10)
    (state_file,) = (tmp_path / "run").rglob("step-*.json")
    state = json.loads(state_file.read_text())
    del state["spec"]["objective"]["scale_by_sigma"]  # as a release before the parameter wrote it
    state_file.write_text(json.dumps(state))
    with pytest.raises(DiffkitError, match=r"objective\.scale_by_sigma: False → True"):
        Pipeline.from_spec(spec).fit(progress=False, out=tmp_path / "run", resume=True, steps=20)
