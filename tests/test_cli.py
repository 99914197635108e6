"""The ``diffkit`` command line, run in-process through ``diffkit.cli.main`` and, to
prove the module entry works, in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import diffkit
from diffkit.cli import main
from diffkit.spec import load_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# One Gaussian at (5, 0) with std 0.1: far from the origin, so samples left in the
# model's standardised space (mean 0, std 1) could not pass for data-space samples.
TINY = {
    "seed": 0,
    "data": {"type": "gaussians", "components": 1, "radius": 5.0, "std": 0.1, "n": 512},
    "schedule": {"type": "linear", "timesteps": 50},
    "denoiser": {"type": "mlp", "hidden": 32, "depth": 1},
    "train": {"steps": 20, "batch_size": 64, "preview": 0, "device": "cpu", "log_every": 10},
}
BAD = {
    "data": {"type": "moons"},
    "schedule": {"type": "cosin"},
    "denoiser": {"type": "mlp", "hiden": 32},
    "train": {"steps": "many"},
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_failure(code: int, out: str, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in out + err
    assert err.startswith("diffkit: error: ")
    for needle in needles:
        assert needle in err


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run_dir(spec_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", str(spec_file), "--out", str(out), "--no-progress"]) == 0
    return out


# -- plugins ---------------------------------------------------------------------------------
def test_plugins_prints_a_table_with_the_builtins(capsys):
    code, out, err = run(capsys, "plugins")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "PLUGIN", "DISTRIBUTION", "VERSION", "STATUS"]
    rows = [line.split() for line in lines[1:] if line.strip()]
    assert ["schedule", "cosine", "diffkit.schedules", "diffkit", diffkit.__version__, "ok"] in rows
    assert ["sampler", "ddpm", "diffkit.samplers", "diffkit", diffkit.__version__, "ok"] in rows
    assert ["data", "moons", "diffkit.datasets", "diffkit", diffkit.__version__, "ok"] in rows
    # the columns line up under the header
    start = lines[0].index("PLUGIN")
    assert all(line[start:].startswith("diffkit.") for line in lines[1:] if line.strip())


def test_plugins_json_lists_every_component_with_its_provenance(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    rows = json.loads(out)
    registry = diffkit.load_plugins()
    expected = {(kind, e.name) for kind in diffkit.registry.KINDS for e in registry.all(kind)}
    assert {(r["kind"], r["name"]) for r in rows} == expected
    for r in rows:
        assert {"kind", "name", "plugin", "distribution", "version", "status"} <= set(r)
        assert r["distribution"] == "diffkit" and r["version"] == diffkit.__version__
        assert r["plugin"].startswith("diffkit.") and r["status"] == "ok"
    [linear] = [r for r in rows if (r["kind"], r["name"]) == ("schedule", "linear")]
    assert linear["plugin"] == "diffkit.schedules" and linear["qualified_name"] == "diffkit.schedules:linear"


def test_plugins_no_autoload_still_lists_the_builtins(capsys):
    code, out, _ = run(capsys, "plugins", "--json", "--no-autoload")
    assert code == 0
    assert ("schedule", "cosine") in {(r["kind"], r["name"]) for r in json.loads(out)}


def test_blocking_a_builtin_from_the_cli_is_a_clean_error(capsys):
    code, out, err = run(capsys, "plugins", "--block", "diffkit.schedules")
    assert_clean_failure(code, out, err, "diffkit.schedules", "DIFFKIT_BLOCK_BUILTIN_PLUGINS")


def test_console_entry_runs_in_a_subprocess(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("DIFFKIT_")}
    done = subprocess.run(
        [sys.executable, "-m", "diffkit.cli", "plugins"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].split()[:2] == ["KIND", "NAME"]
    assert "diffkit.schedules" in done.stdout
    # and a user error exits non-zero with one clean message, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(BAD))
    done = subprocess.run(
        [sys.executable, "-m", "diffkit.cli", "validate", str(bad)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.startswith("diffkit: error: 3 problems in")
    assert "denoiser.hiden" in done.stderr


# -- validate and schema ----------------------------------------------------------------------
SPEC_SUFFIXES = (".yaml", ".yml", ".json", ".toml")  # examples/ also holds scripts and folders


@pytest.mark.parametrize(
    "example",
    sorted(p for p in (Path(__file__).parent.parent / "examples").iterdir() if p.suffix in SPEC_SUFFIXES),
    ids=lambda p: p.name,
)
def test_validate_a_good_spec(capsys, example, tmp_path, monkeypatch):
    if example.name == "image-folder.yaml":  # validate checks that the folder it names holds images
        from PIL import Image

        (tmp_path / "data" / "my-images" / "cats").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "my-images" / "cats" / "a.png")
        monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "validate", str(example))
    assert code == 0 and err == ""
    assert out.startswith(f"{example} is valid (")
    spec = load_spec(example)
    assert f"data: {spec.data.type}" in out and f"schedule: {spec.schedule.type}" in out


def test_validate_a_bad_spec_lists_every_problem_with_its_path(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD))
    code, out, err = run(capsys, "validate", str(path))
    assert_clean_failure(code, out, err, f"3 problems in {path}:")
    assert out == ""
    assert "\n  denoiser.hiden: unknown key" in err
    assert "\n  schedule: unknown schedule 'cosin'. Did you mean 'cosine'?" in err
    assert "\n  train.steps: Input should be a valid integer" in err


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("broken.yaml", "data: {type: moons\n", "not valid YAML at line"),
        ("broken.json", "{\n", "not valid JSON at line"),
        ("spec.txt", "data: moons\n", "unknown spec format '.txt'"),
        ("list.yaml", "- 1\n- 2\n", "a spec must be a mapping"),
    ],
)
def test_validate_unreadable_specs(capsys, tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = run(capsys, "validate", str(path))
    assert_clean_failure(code, out, err, needle)


def test_schema_prints_valid_json_schema(capsys, tmp_path):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "diffkit pipeline spec"
    assert {"data", "schedule", "denoiser", "objective", "sampler", "train", "seed"} <= set(schema["properties"])
    code, out, _ = run(capsys, "schema", "--out", str(tmp_path / "schema.json"))
    assert code == 0 and out == ""
    assert json.loads((tmp_path / "schema.json").read_text()) == schema


# -- train --------------------------------------------------------------------------------------
def test_train_writes_a_complete_run(run_dir, spec_file):
    names = {p.name for p in run_dir.iterdir()}
    assert {"spec.yaml", "denoiser.safetensors", "meta.json", "metrics.jsonl", "loss.png"} <= names
    assert "samples.png" not in names  # train.preview: 0
    assert not [n for n in names if n.endswith(".tmp")]  # no half-written files
    assert load_spec(run_dir / "spec.yaml") == load_spec(spec_file)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["steps_trained"] == 20 and meta["sample_shape"] == [2]
    assert meta["components"]["schedule"] == {
        "plugin": "diffkit.schedules",
        "distribution": "diffkit",
        "version": diffkit.__version__,
    }
    assert (run_dir / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert (run_dir / "denoiser.safetensors").stat().st_size > 1000


def test_train_reports_what_it_did(capsys, spec_file, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", str(spec_file), "--out", str(out_dir), "--no-progress", "--steps", "3")
    assert code == 0
    assert out.startswith("trained 3 steps in ")
    assert f"wrote {out_dir}/" in out
    assert json.loads((out_dir / "meta.json").read_text())["steps_trained"] == 3


def test_train_into_a_finished_run_needs_force(capsys, run_dir, spec_file, tmp_path):
    before = (run_dir / "denoiser.safetensors").read_bytes()
    code, out, err = run(capsys, "train", str(spec_file), "--out", str(run_dir), "--no-progress")
    assert_clean_failure(code, out, err, "already holds a finished run", "--force")
    assert len(err.strip().splitlines()) == 1
    assert (run_dir / "denoiser.safetensors").read_bytes() == before  # untouched
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code, out, err = run(capsys, "train", str(spec_file), "--out", str(copy), "--no-progress", "--force", "--steps", "2")
    assert code == 0
    assert json.loads((copy / "meta.json").read_text())["steps_trained"] == 2
    assert [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()] == [2]


def test_train_with_a_missing_spec_file(capsys, tmp_path):
    code, out, err = run(capsys, "train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run"))
    assert_clean_failure(code, out, err, "no such spec file", "nope.yaml")
    assert not (tmp_path / "run").exists()


def test_train_with_a_bad_override(capsys, spec_file, tmp_path):
    code, out, err = run(capsys, "train", str(spec_file), "--out", str(tmp_path / "run"), "--steps", "0")
    assert_clean_failure(code, out, err, "--steps")


def test_validate_a_missing_spec_file(capsys, tmp_path):
    code, out, err = run(capsys, "validate", str(tmp_path / "nope.toml"))
    assert_clean_failure(code, out, err, "no such spec file")


# -- sample --------------------------------------------------------------------------------------
def test_sample_writes_samples_in_data_coordinates(capsys, run_dir, tmp_path):
    out_file = tmp_path / "x.npy"
    code, out, err = run(capsys, "sample", str(run_dir), "--n", "50", "--out", str(out_file), "--seed", "1", "--no-progress")
    assert code == 0
    assert out.startswith("drew 50 samples of shape (2,)")
    x = np.load(out_file, allow_pickle=False)
    assert x.shape == (50, 2) and x.dtype == np.float32
    assert np.isfinite(x).all()
    # the data is N((5, 0), 0.1² I); standardised samples would be centred on 0
    mean = x.mean(axis=0)
    assert abs(mean[0] - 5.0) < 0.5 and abs(mean[1]) < 0.5
    assert (x.std(axis=0) < 1.0).all()


def test_same_seed_gives_the_same_npy(capsys, run_dir, tmp_path):
    paths = [tmp_path / f"{name}.npy" for name in ("a", "b", "c")]
    for path, seed in zip(paths, ("1", "1", "2")):
        code, _, _ = run(capsys, "sample", str(run_dir), "--n", "50", "--out", str(path), "--seed", seed, "--no-progress")
        assert code == 0
    a, b, c = (np.load(p) for p in paths)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_in_batches_and_with_fewer_steps(capsys, run_dir, tmp_path):
    path = tmp_path / "x.npy"
    code, _, _ = run(
        capsys, "sample", str(run_dir), "--n", "25", "--batch-size", "10", "--steps", "10", "--out", str(path), "--seed", "0"
    )
    assert code == 0
    assert np.load(path).shape == (25, 2)


def test_sample_writes_a_png(capsys, run_dir, tmp_path):
    path = tmp_path / "x.png"
    code, out, _ = run(capsys, "sample", str(run_dir), "--n", "50", "--out", str(path), "--seed", "1", "--no-progress")
    assert code == 0
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--n", "5", "--out", "{tmp}/x.txt"], ["--out must end in .npy or .png", "x.txt"]),
        (["--n", "0", "--out", "{tmp}/x.npy"], ["--n must be at least 1"]),
        (["--n", "5", "--out", "{tmp}/x.npy", "--batch-size", "0"], ["--batch-size must be at least 1"]),
        (["--n", "5", "--out", "{tmp}/x.npy", "--sampler", "nope"], ["unknown sampler 'nope'", "Available:"]),
        (["--n", "5", "--out", "{tmp}/x.npy", "--sampler", "ddpn"], ["Did you mean 'ddpm'"]),
        (["--n", "5", "--out", "{tmp}/x.npy", "--steps", "1000"], ["steps must be between 1 and the schedule's T = 50"]),
    ],
    ids=["bad-suffix", "n-zero", "batch-size-zero", "unknown-sampler", "misspelt-sampler", "steps-over-T"],
)
def test_bad_sample_requests_fail_cleanly(capsys, run_dir, tmp_path, args, needles):
    args = [a.format(tmp=tmp_path) for a in args]
    code, out, err = run(capsys, "sample", str(run_dir), *args, "--no-progress")
    assert_clean_failure(code, out, err, *needles)
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("x.*"))  # nothing written


def test_sample_from_a_nonexistent_run(capsys, tmp_path):
    code, out, err = run(capsys, "sample", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "x.npy"))
    assert_clean_failure(code, out, err, "no-such-run", "is not a directory")
    assert len(err.strip().splitlines()) == 1


def test_sample_from_a_directory_that_is_not_a_run(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "sample", str(tmp_path / "empty"), "--out", str(tmp_path / "x.npy"))
    assert_clean_failure(code, out, err, "has no spec.yaml")


@pytest.mark.parametrize("keep", [0, 5, 0.5, -3], ids=["empty", "5-bytes", "half", "all-but-3"])
def test_sample_from_a_damaged_weights_file(capsys, run_dir, tmp_path, keep):
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    weights = damaged / "denoiser.safetensors"
    raw = weights.read_bytes()
    cut = int(len(raw) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(raw) + keep)
    weights.write_bytes(raw[:cut])
    code, out, err = run(capsys, "sample", str(damaged), "--n", "5", "--out", str(tmp_path / "x.npy"))
    assert_clean_failure(code, out, err, "denoiser.safetensors", "damaged or truncated")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.npy").exists()


def test_sample_from_a_run_whose_weights_do_not_fit_its_spec(capsys, run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    spec = yaml.safe_load((other / "spec.yaml").read_text())
    spec["denoiser"]["hidden"] = 64
    (other / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = run(capsys, "sample", str(other), "--n", "5", "--out", str(tmp_path / "x.npy"))
    assert_clean_failure(code, out, err, "do not fit the denoiser its spec describes")


# -- plugin options on the command line ------------------------------------------------------------
BROKEN = 'raise ImportError("needs a library that is not installed")\n'
EXTRA = """
from pydantic import Field
from diffkit import Component, Params, hookimpl
from diffkit_plugins.samplers import DDPM, DDPMParams

@hookimpl
def diffkit_samplers():
    return [Component("ddpm-too", lambda p, ctx: DDPM(p), DDPMParams, "The DDPM sampler again.")]
"""


@pytest.fixture
def third_party(make_dist):
    make_dist("broken-dist", "0.1", {"broken": ("cli_broken_plugin", BROKEN)})
    make_dist("extra-dist", "1.5", {"extra": ("cli_extra_plugin", EXTRA)})


def test_plugins_shows_third_party_components_and_failures(capsys, third_party):
    code, out, err = run(capsys, "plugins")
    assert code == 0
    assert "diffkit: warning: plugin 'broken' (broken-dist 0.1) failed to load: ImportError: needs a library" in err
    rows = [line.split() for line in out.splitlines()]
    assert ["sampler", "ddpm-too", "extra", "extra-dist", "1.5", "ok"] in rows
    assert ["-", "-", "broken", "broken-dist", "0.1", "failed"] in rows
    assert "plugin 'broken' failed: ImportError: needs a library that is not installed" in out
    code, out, _ = run(capsys, "plugins", "--json")
    [failed] = [r for r in json.loads(out) if r["status"] == "failed"]
    assert (failed["plugin"], failed["distribution"], failed["version"]) == ("broken", "broken-dist", "0.1")
    assert "needs a library" in failed["error"]


def test_strict_plugins_flag_fails_cleanly(capsys, third_party):
    code, out, err = run(capsys, "plugins", "--strict-plugins")
    assert_clean_failure(code, out, err, "plugin 'broken'", "strict")


def test_block_and_no_autoload_flags(capsys, third_party):
    code, out, err = run(capsys, "plugins", "--json", "--block", "broken")
    assert code == 0 and err == ""
    status = {r["plugin"]: r["status"] for r in json.loads(out)}
    assert (status["broken"], status["extra"]) == ("blocked", "ok")
    code, out, err = run(capsys, "plugins", "--json", "--no-autoload", "--plugin", "extra")
    assert code == 0 and err == ""
    status = {r["plugin"]: r["status"] for r in json.loads(out)}
    assert (status["broken"], status["extra"]) == ("not-loaded", "ok")


def test_a_run_can_sample_with_a_third_party_sampler(capsys, third_party, run_dir, tmp_path):
    common = ["--n", "20", "--seed", "1", "--block", "broken", "--no-progress"]
    code, _, err = run(capsys, "sample", str(run_dir), "--sampler", "ddpm-too", "--out", str(tmp_path / "x.npy"), *common)
    # no warning from the plugins; at most the report of the bound on x̂_0 (a sampler without
    # clip_denoised gets the default bound, as the built-ins do)
    assert code == 0 and all(line.startswith("diffkit: the bound on x̂_0") for line in err.splitlines())
    code, _, _ = run(capsys, "sample", str(run_dir), "--out", str(tmp_path / "y.npy"), *common)
    assert code == 0
    # the same algorithm with the same seed draws the same samples
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy"))


def test_a_spec_whose_sampler_steps_exceed_T_fails_cleanly(capsys, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({**TINY, "sampler": {"type": "ddpm", "steps": 100}, "train": {**TINY["train"], "steps": 2}}))
    code, out, err = run(capsys, "train", str(spec), "--out", str(tmp_path / "run"), "--no-progress")
    if code == 0:  # caught neither at validation nor at training: sampling must still fail cleanly
        code, out, err = run(capsys, "sample", str(tmp_path / "run"), "--n", "5", "--out", str(tmp_path / "x.npy"))
    assert_clean_failure(code, out, err, "steps", "100")
