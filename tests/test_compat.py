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
