"""The examples: every script runs in its fast mode, and every spec in examples/ validates,
trains a step and samples, and is listed in the examples page of the docs.

The scripts run as a user runs them, in a subprocess from a scratch directory, with one
torch thread; ``--fast`` shrinks the schedule, the network and the training so that each
finishes in seconds. Their full runs are the walk-throughs of docs/examples.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit.spec import load_spec, to_dict

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))
SPECS = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json", ".toml"))
EXAMPLES_PAGE = ROOT / "docs" / "examples.md"


def run_script(script: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFKIT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    done = subprocess.run(
        [sys.executable, str(script), "--fast", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{script.name} failed:\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr
    return done


# What each script writes under --out in its fast mode.
OUTPUTS = {
    "compose.py": ["samples.png", "run/spec.yaml", "run/denoiser.safetensors"],
    "mnist.py": ["forward.png", "loss.png", "samples.png", "trajectory.png", "metrics.jsonl", "run/spec.yaml"],
    "guided_digits.py": [
        "classifier-scale-0.png",
        "classifier-scale-4.png",
        "classifier/classifier.safetensors",
        "classifier-free-scale-0.png",
        "classifier-free/spec.yaml",
    ],
    "inpaint_denoise.py": ["inpaint.png", "denoise.png"],
}


def test_every_script_has_its_expected_outputs_listed():
    assert sorted(OUTPUTS) == [p.name for p in SCRIPTS]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_runs_in_fast_mode(script, tmp_path):
    out = tmp_path / "out"
    done = run_script(script, tmp_path, "--out", str(out))
    if script.name == "mnist.py":  # no MNIST files under ./data here: the bundled digits
        assert "using the bundled 8×8 digits instead" in done.stdout
        assert load_spec(out / "run" / "spec.yaml").data.type == "digits"
    for name in OUTPUTS[script.name]:
        assert (out / name).is_file(), f"{script.name} did not write {name}"
    for picture in out.rglob("*.png"):
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mnist_walkthrough_uses_mnist_files_when_present(tmp_path):
    from test_image_datasets import write_mnist

    write_mnist(tmp_path / "data", "MNIST", n_train=40, n_test=8)
    out = tmp_path / "out"
    done = run_script(EXAMPLES / "mnist.py", tmp_path, "--root", str(tmp_path / "data"), "--out", str(out))
    assert "not available" not in done.stdout
    spec = load_spec(out / "run" / "spec.yaml")
    assert spec.data.type == "mnist"
    assert "sample_shape=(1, 28, 28)" in done.stdout


# -- specs ------------------------------------------------------------------------------------
def test_there_are_specs_for_the_main_combinations():
    specs = [load_spec(p) for p in SPECS]
    seen = {(s.data.type, s.denoiser.type, s.objective.type, s.sampler.type) for s in specs}
    assert {kind for _, _, _, kind in seen} >= {"ddpm", "ddim", "dpm-solver", "sgld", "pc"}
    assert {obj for _, _, obj, _ in seen} >= {"epsilon", "v", "x0", "score"}
    assert {data for data, _, _, _ in seen} >= {"moons", "digits", "mnist", "cifar10", "image-folder"}
    guided = {s.guidance.type for s in specs if s.guidance is not None}
    assert guided == {"classifier", "classifier-free"}


def _shrunk(path: Path, tmp_path: Path) -> dict:
    """The spec at ``path`` with one training step, small batches and, for data read from
    files, a few fake images in torchvision's or a folder's layout."""
    body = to_dict(load_spec(path))
    body["train"].update(steps=1, batch_size=4, preview=0, device="cpu")
    data = body["data"]
    if data["type"] in ("mnist", "fashion-mnist"):
        from test_image_datasets import write_mnist

        write_mnist(tmp_path, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[data["type"]])
        data["root"] = str(tmp_path)
    elif data["type"] == "image-folder":
        from test_image_datasets import write_folder

        write_folder(tmp_path / "images")
        data["root"] = str(tmp_path / "images")
    elif data["type"] in ("moons", "swiss-roll", "gaussians"):
        data["n"] = 64
    return body


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_spec_trains_a_step_and_samples(path, tmp_path):
    if load_spec(path).data.type == "cifar10":
        pytest.skip("CIFAR-10's files are checksummed; tests/test_image_datasets.py covers reading them")
    pipe = diffkit.Pipeline.from_spec(_shrunk(path, tmp_path))
    pipe.fit(progress=False)
    x = pipe.sample(2, seed=0, steps=2)
    assert x.shape == (2, *pipe.context.sample_shape) and torch.isfinite(x).all()
    if pipe.guidance is not None:
        y = pipe.sample(2, seed=0, steps=2, labels=[0, 1])
        assert torch.isfinite(y).all()


def test_the_examples_page_shows_every_script_and_spec():
    page = EXAMPLES_PAGE.read_text(encoding="utf-8")
    missing = [p.name for p in [*SCRIPTS, *SPECS] if f"examples/{p.name}" not in page]
    assert not missing, f"docs/examples.md does not mention {missing}"
