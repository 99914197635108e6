"""What training and reading a run may change: a failed ``diffkit train`` leaves every
file of ``--out`` byte-identical, ``--force`` moves the old run aside instead of deleting
it, ``--resume`` never trains over a run it cannot continue, a lock keeps a second trainer
out, reading a run writes nothing outside it, and atomically written files are whole,
follow the umask and leave no temporary files behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from diffkit import checkpoint, rundir
from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.pipeline import Pipeline

TINY = {
    "seed": 0,
    "data": {"type": "gaussians", "components": 1, "radius": 5.0, "std": 0.1, "n": 512},
    "schedule": {"type": "linear", "timesteps": 50},
    "denoiser": {"type": "mlp", "hidden": 32, "depth": 1},
    "train": {"steps": 4, "batch_size": 64, "preview": 0, "device": "cpu", "log_every": 2, "checkpoint_every": 2},
}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) by relative path, with its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert err.startswith("diffkit: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def write_spec(path: Path, **changes: object) -> Path:
    spec = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, field = key.partition(".")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def spec(tmp_path) -> Path:
    return write_spec(tmp_path / "tiny.yaml")


@pytest.fixture
def finished(capsys, spec, tmp_path) -> Path:
    """A finished run with checkpoints."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "--out", out, "--no-progress")
    assert code == 0, err
    return out


# -- 1. --out never overwrites without --force ------------------------------------------------
def test_train_refuses_a_directory_of_the_users_files(capsys, spec, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("metrics.jsonl", "loss.png", "meta.json", "denoiser.safetensors"):
        (mine / name).write_text(f"my own {name}\n")
    before = tree(mine)
    code, _, err = run(capsys, "train", spec, "--out", mine, "--no-progress")
    one_line_error(code, err, f"--out {mine} is not empty", "not a diffkit run", "--force", f"{mine.name}.old-")
    assert tree(mine) == before
    with pytest.raises(DiffkitError) as python:  # the same check, from Python
        rundir.check_train_out(mine)
    assert str(python.value) in err


def test_train_refuses_even_one_file_it_would_not_overwrite(capsys, spec, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    code, _, err = run(capsys, "train", spec, "--out", mine, "--no-progress")
    one_line_error(code, err, "not empty (notes.txt)")
    assert tree(mine) == {"notes.txt": hashlib.sha256(b"mine\n").hexdigest()}


def test_train_into_a_finished_run_without_force_changes_nothing(capsys, spec, finished):
    before = tree(finished)
    code, _, err = run(capsys, "train", spec, "--out", finished, "--no-progress")
    one_line_error(code, err, "already holds a finished run", "--force", "--resume")
    assert tree(finished) == before


# -- 2. --force checks everything, then moves the old run aside ----------------------------------
@pytest.mark.parametrize(
    "problem",
    ["cuda", "tensorboard", "data", "batch"],
)
def test_force_checks_everything_before_touching_the_old_run(capsys, finished, tmp_path, monkeypatch, problem):
    if problem == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    changes: dict[str, object] = {}
    needle = ""
    if problem == "cuda":
        changes, needle = {"train.device": "cuda"}, "no CUDA device"
    elif problem == "tensorboard":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
        changes, needle = {"train.log": "tensorboard"}, "tensorboard package is not installed"
    elif problem == "data":
        missing = tmp_path / "no-such-images"
        changes, needle = {"data": {"type": "image-folder", "root": str(missing), "size": 8}}, str(missing)
    else:
        changes, needle = {"train.batch_size": 4096}, "train.batch_size (4096)"
    bad = write_spec(tmp_path / "bad.yaml", **changes)
    before = tree(finished)
    code, _, err = run(capsys, "train", bad, "--out", finished, "--no-progress", "--force")
    one_line_error(code, err, needle)
    assert tree(finished) == before
    assert not list(tmp_path.glob("run.old-*"))  # nothing moved either


def test_force_moves_the_old_run_aside_whole_and_says_where(capsys, spec, finished, tmp_path):
    before = tree(finished)
    code, out, err = run(capsys, "train", spec, "--out", finished, "--no-progress", "--force", "--steps", "2")
    assert code == 0, err
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved the earlier contents of {finished} to {aside}" in err
    assert tree(aside) == before
    assert json.loads((finished / "meta.json").read_text())["steps_trained"] == 2
    assert [json.loads(line)["step"] for line in (finished / "metrics.jsonl").read_text().splitlines()] == [2]
    assert not (finished / rundir.LOCK_FILE).exists()


def test_force_moves_a_directory_of_the_users_files_aside_too(capsys, spec, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("mine\n")
    (mine / f".notes.{2**22 + 12345}.x.tmp").write_text("mine, named like a temporary file of diffkit's\n")
    before = tree(mine)
    code, _, err = run(capsys, "train", spec, "--out", mine, "--no-progress", "--force")
    assert code == 0, err
    (aside,) = tmp_path.glob("mine.old-*")
    assert tree(aside) == before


# -- 3. --resume never trains over what it cannot continue ---------------------------------------
def test_resume_with_every_checkpoint_damaged_refuses_and_names_them(capsys, spec, finished):
    checkpoints = finished / "checkpoints"
    names = sorted(p.stem for p in checkpoints.glob("*.json"))
    assert names
    for path in checkpoints.glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    before = tree(finished)
    code, _, err = run(capsys, "train", spec, "--out", finished, "--no-progress", "--resume", "--steps", "8")
    one_line_error(code, err, "nothing to resume", "every checkpoint is damaged", "Nothing was changed", "--force")
    for name in names:
        assert name in err
    assert tree(finished) == before
    with pytest.raises(DiffkitError, match="every checkpoint is damaged"):  # the same refusal from Python
        Pipeline.from_spec(spec).fit(out=finished, progress=False, resume=True, steps=8)
    assert tree(finished) == before


def test_resume_on_a_directory_that_is_not_a_run_deletes_nothing(capsys, spec, tmp_path):
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "step-00000009.json").write_text("my own notes\n")
    (mine / "checkpoints" / "step-00000009.safetensors").write_text("my own data\n")
    (mine / "checkpoints" / f".step-00000001.safetensors.{2**22 + 12345}.x.tmp").write_text("mine too\n")  # named like ours
    before = tree(mine)
    code, _, err = run(capsys, "train", spec, "--out", mine, "--no-progress", "--resume")
    one_line_error(code, err, f"{mine} is not a diffkit run", "nothing was changed")
    assert tree(mine) == before


def test_resume_of_a_missing_directory_creates_nothing(capsys, spec, tmp_path):
    code, _, err = run(capsys, "train", spec, "--out", tmp_path / "nowhere", "--no-progress", "--resume")
    one_line_error(code, err, "holds no run to continue")
    assert not (tmp_path / "nowhere").exists()


# -- 4. the lock -----------------------------------------------------------------------------
def test_a_second_trainer_is_refused_naming_the_holder(capsys, spec, finished):
    holder = rundir.RunLock(finished)
    holder.acquire()
    try:
        before = tree(finished)
        for flags in (["--resume", "--steps", "8"], ["--force"]):
            code, _, err = run(capsys, "train", spec, "--out", finished, "--no-progress", *flags)
            one_line_error(code, err, f"{finished} is being trained by pid {os.getpid()} on {socket.gethostname()}")
            assert tree(finished) == before
        with pytest.raises(DiffkitError, match="is being trained by"):
            Pipeline.from_spec(spec).fit(out=finished, progress=False, resume=True, steps=8)
    finally:
        holder.release()
    assert not (finished / rundir.LOCK_FILE).exists()


def test_the_lock_of_a_killed_trainer_is_taken_over(capsys, spec, finished):
    script = (
        "import sys, time; from diffkit.rundir import RunLock; RunLock(sys.argv[1]).acquire();"
        " print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        code, _, err = run(capsys, "train", spec, "--out", finished, "--no-progress", "--resume", "--steps", "8")
        one_line_error(code, err, f"pid {proc.pid}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((finished / rundir.LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    code, out, err = run(
        capsys, "train", spec, "--out", finished, "--no-progress", "--resume", "--steps", "8", "--allow-spec-change"
    )
    assert code == 0, err
    assert f"took over the stale lock {finished / rundir.LOCK_FILE} left by pid {proc.pid}" in err
    assert "resumed at step 4" in out
    assert not (finished / rundir.LOCK_FILE).exists()


# -- 5. reading a run touches nothing outside it -------------------------------------------------
def test_reading_a_run_builds_no_data_and_writes_nothing_outside_it(capsys, finished, tmp_path):
    anywhere = tmp_path / "ANYWHERE"
    spec = yaml.safe_load((finished / "spec.yaml").read_text())
    spec["data"] = {"type": "mnist", "root": str(anywhere), "download": True}
    (finished / "spec.yaml").write_text(yaml.safe_dump(spec))
    before = tree(finished)
    outside = sorted(p.name for p in tmp_path.iterdir())

    pipe = Pipeline.load(finished)
    samples = pipe.sample(16, seed=0)
    pipe.picture(samples, tmp_path / "py.png")
    assert pipe._dataset is None  # sampling and its picture needed no data
    reference = pipe.reference_data()
    assert reference is not None and reference[0].shape == (512, 2)  # the training points, saved in the run
    torch.testing.assert_close(reference[0].mean(0), torch.tensor([5.0, 0.0]), atol=0.05, rtol=0)

    code, _, err = run(capsys, "sample", finished, "--n", 8, "--out", tmp_path / "s.png", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "sample", finished, "--n", 8, "--out", tmp_path / "s.npy", "--no-progress")
    assert code == 0, err
    code, _, err = run(capsys, "forward", finished, "--out", tmp_path / "f.png")  # noises the examples the run kept
    assert code == 0, err
    # evaluate needs held-out data: here it fails, but never downloads it or creates its root
    code, _, err = run(capsys, "evaluate", finished, "--no-progress", "--n", 8, "--timesteps", 2)
    one_line_error(code, err, str(anywhere), f"Reading the run {finished} never downloads data")
    assert "downloading" not in err

    assert not anywhere.exists()
    assert tree(finished) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*outside, "py.png", "s.png", "s.npy", "f.png"])


def test_forward_on_an_image_run_reads_no_data(capsys, tmp_path):
    spec = write_spec(
        tmp_path / "digits.yaml",
        data={"type": "digits"},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        **{"train.steps": 2},
    )
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "--out", out, "--no-progress")
    assert code == 0, err
    anywhere = tmp_path / "ANYWHERE"
    body = yaml.safe_load((out / "spec.yaml").read_text())
    body["data"] = {"type": "mnist", "root": str(anywhere), "download": True}
    (out / "spec.yaml").write_text(yaml.safe_dump(body))
    before = tree(out)
    code, _, err = run(capsys, "forward", out, "--out", tmp_path / "f.png", "--n", 4, "--frames", 3)
    assert code == 0, err
    kept = Pipeline.load(out).reference_data()
    assert kept is not None and kept[0].shape == (64, 1, 8, 8) and kept[1].shape == (64,)
    assert not anywhere.exists() and tree(out) == before


# -- smaller: permissions, temporary files, messages ---------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomically_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        text = checkpoint.write_text(tmp_path / "a.yaml", "x: 1\n")
        tensors = checkpoint.save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    for path in (text, tensors):
        assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_killed_writers_temporary_files_are_cleaned_up(tmp_path):
    dead = 2**22 + 12345  # above Linux's largest pid: no such process
    for pid in (dead, os.getppid()):
        (tmp_path / f".meta.json.{pid}.abc123.tmp").write_text("half")
    (tmp_path / ".meta.json.tmp").write_text("not ours")
    checkpoint.write_json(tmp_path / "meta.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([".meta.json.tmp", f".meta.json.{os.getppid()}.abc123.tmp", "meta.json"])  # a live writer's stays


def test_opening_a_run_to_train_cleans_the_temporary_files_a_kill_left(capsys, spec, finished):
    dead = 2**22 + 12345
    stale = [finished / f".spec.yaml.{dead}.q1w2e3.tmp", finished / "checkpoints" / f".step-00000002.json.{dead}.zz.tmp"]
    for path in stale:
        path.write_text("half")
    code, _, err = run(capsys, "train", spec, "--out", finished, "--no-progress", "--resume", "--steps", "6", "--allow-spec-change")
    assert code == 0, err
    assert not any(path.exists() for path in stale)


def test_a_failed_write_names_the_file_asked_for_not_its_temporary(tmp_path):
    def full(p: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    target = tmp_path / "samples.npy"
    with pytest.raises(DiffkitError) as caught:
        checkpoint.atomic_write(target, full)
    assert str(caught.value) == f"cannot write {target}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_sampling_points_by_label_reads_no_data(capsys, tmp_path, monkeypatch):
    spec = write_spec(
        tmp_path / "cond.yaml",
        data={"type": "gaussians", "components": 2, "radius": 5.0, "std": 0.1, "n": 512},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1, "num_classes": 2},
    )
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", spec, "--out", out, "--no-progress")
    assert code == 0, err
    built: list[object] = []
    monkeypatch.setattr(Pipeline, "dataset", property(lambda self: built.append(self) or pytest.fail("data built")))
    before = tree(out)
    code, _, err = run(capsys, "sample", out, "--n", 8, "--label", "0,1", "--out", tmp_path / "s.png", "--no-progress")
    assert code == 0, err
    assert built == [] and tree(out) == before
    assert (tmp_path / "s.png").read_bytes().startswith(b"\x89PNG")


def test_force_refuses_to_move_the_current_directory_aside(capsys, spec, finished, monkeypatch):
    monkeypatch.chdir(finished / "checkpoints")
    before = tree(finished)
    code, _, err = run(capsys, "train", spec, "--out", "..", "--no-progress", "--force")
    one_line_error(code, err, "holds the current directory")
    assert tree(finished) == before
