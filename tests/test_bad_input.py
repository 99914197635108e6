"""A corpus of bad inputs, each of which once ended in a traceback: spec files that are not
UTF-8, nested too deeply, with a ``type`` that is not a name, duplicate keys, seeds and
floats out of range; run directories whose files were damaged or edited by hand. Each
must end as one message naming the file or the field, through ``validate``, ``train`` and
``sample`` alike, and leave the user's files as they were."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from diffkit import DiffkitError, Pipeline, SpecError
from diffkit.cli import main
from diffkit.spec import load_spec

TINY = {
    "seed": 0,
    "data": {"type": "moons", "n": 256},
    "schedule": {"type": "linear", "timesteps": 20},
    "denoiser": {"type": "mlp", "hidden": 16, "depth": 1},
    "train": {
        "steps": 20,
        "batch_size": 32,
        "preview": 0,
        "device": "cpu",
        "log_every": 5,
        "checkpoint_every": 10,
        "keep_checkpoints": 5,
    },
}
TOO_LARGE = "  seed: Input should be less than or equal to 9223372036854775807"
GOOD = "seed: 0\ndata: {type: moons, n: 256}\ndenoiser: {type: mlp, hidden: 16, depth: 1}\n"

# name -> (file name, content, what the message must name)
SPEC_FILES: dict[str, tuple[str, bytes, list[str]]] = {
    "latin-1 yaml": ("spec.yaml", GOOD.encode() + "# café\n".encode("latin-1"), ["not UTF-8", "byte 85 (line 4)"]),
    "utf-16 json": ("spec.json", json.dumps(TINY).encode("utf-16"), ["not UTF-8", "byte 0"]),
    "binary toml": ("spec.toml", b"\x00\xff\xfe garbage", ["not UTF-8", "byte 1"]),
    "deep yaml list": ("spec.yaml", (GOOD + "train: " + "[" * 3000 + "]" * 3000).encode(), ["nested too deeply"]),
    "deep yaml mapping": (
        "spec.yaml",
        (GOOD + "extra:\n" + "".join(" " * i + "a:\n" for i in range(1, 1500)) + " " * 1500 + "b: 1\n").encode(),
        ["nested too deeply"],
    ),
    "deep json": ("spec.json", ('{"train": ' + '{"a": ' * 3000 + "1" + "}" * 3001).encode(), ["nested too deeply"]),
    "deep toml": ("spec.toml", ("seed = 0\nextra = " + "[" * 3000 + "]" * 3000 + "\n").encode(), ["nested too deeply"]),
    "type a list": (
        "spec.yaml",
        (GOOD + "sampler: {type: [ddpm]}\n").encode(),
        ["sampler.type: must be a component's name, got a list"],
    ),
    "type a mapping": (
        "spec.yaml",
        (GOOD + "schedule: {type: {linear: 1}}\n").encode(),
        ["schedule.type: must be a component's name, got a dict"],
    ),
    "nested type a list": (
        "spec.yaml",
        (GOOD + "sampler: {type: guided, base: {type: [ddim]}, guidance: {type: classifier-free}}\n").encode(),
        ["sampler.type: must be a component's name, got a list"],  # the 0.1 form: its base is the sampler
    ),
    "seed 1e30 json": (
        "spec.json",
        b'{"seed": 1e30, "data": "moons", "denoiser": "mlp"}',
        ["  seed: Input should be less than or equal to 9223372036854775807"],
    ),
    "seed 1.0e+30 yaml": ("spec.yaml", GOOD.replace("seed: 0", "seed: 1.0e+30").encode(), [TOO_LARGE]),
    "seed 2**64": ("spec.yaml", GOOD.replace("seed: 0", f"seed: {2**64}").encode(), [TOO_LARGE]),
    "data seed 2**64": (
        "spec.yaml",
        GOOD.replace("n: 256}", f"n: 256, seed: {2**64}}}").encode(),
        ["  data.seed: Input should be less than or equal to"],
    ),
    "lr nan": ("spec.yaml", (GOOD + "train: {lr: .nan}\n").encode(), ["train.lr: Input should be a finite number"]),
    "noise inf": ("spec.yaml", GOOD.replace("n: 256", "n: 256, noise: .inf").encode(), ["data.noise: Input should be a finite"]),
    "duplicate yaml key": (
        "spec.yaml",
        (GOOD + "train:\n  steps: 10\n  lr: 0.01\n  steps: 20\n").encode(),
        ["the key 'steps' at line 7 is given twice (first at line 5)"],
    ),
    "duplicate yaml section": (
        "spec.yaml",
        (GOOD + "denoiser: mlp\n").encode(),
        ["the key 'denoiser' at line 4 is given twice (first at line 3)"],
    ),
    "duplicate json key": (
        "spec.json",
        b'{"seed": 0,\n "data": {"type": "moons",\n   "n": 5,\n   "type": "gaussians"},\n "denoiser": "mlp"}',
        ["the key 'type' at line 4 is given twice (first at line 2)"],
    ),
    "duplicate json key nested deeper": (
        "spec.json",
        b'{"data": {"type": "moons"},\n "sampler": {"type": "guided",\n  "base": {"type": "ddim"},\n'
        b'  "guidance": {"type": "classifier-free"},\n  "base": {"type": "ddpm"}},\n "denoiser": "mlp"}',
        ["the key 'base' at line 5 is given twice (first at line 3)"],
    ),
    "duplicate toml key": ("spec.toml", b'seed = 0\ndata = "moons"\ndenoiser = "mlp"\nseed = 1\n', ["not valid TOML"]),
}


def spec_file(folder: Path, case: str) -> tuple[Path, list[str]]:
    name, content, needles = SPEC_FILES[case]
    path = folder / name
    path.write_bytes(content)
    return path, needles


def assert_one_message(code: int, err: str, *needles: str) -> None:
    """One error, the last thing on stderr (after any ``diffkit: ...`` progress notes)."""
    assert code == 1, err
    assert "Traceback" not in err
    error = err[err.index("diffkit: error: ") :]
    assert all(line.startswith("diffkit: ") for line in err[: err.index("diffkit: error: ")].splitlines())
    for needle in needles:
        assert needle in error


@pytest.mark.parametrize("case", list(SPEC_FILES))
def test_a_bad_spec_file_is_one_message_naming_the_file_and_field(tmp_path, capsys, case):
    path, needles = spec_file(tmp_path, case)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.source == str(path)
    for needle in needles:
        assert needle in str(info.value)
    for command in (["validate", str(path)], ["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]):
        code = main(command)
        _, err = capsys.readouterr()
        assert_one_message(code, err, str(path), *needles)
    assert not (tmp_path / "run").exists()


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("seed: 0\ndata: moons\ndenoiser: {<<: {type: mlp, hidden: 16}, hidden: 32}\n")
    assert load_spec(path).denoiser.hidden == 32


# -- run directories ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(spec), "--out", str(folder / "run"), "--no-progress"]) == 0
    return folder


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [c for c in SPEC_FILES if SPEC_FILES[c][0] == "spec.yaml"])
def test_sampling_a_run_whose_spec_yaml_is_bad_is_one_message(run, tmp_path, capsys, case):
    spec, needles = spec_file(run, case)
    before = snapshot(run)
    code = main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "x.npy"), "--no-progress"])
    _, err = capsys.readouterr()
    assert_one_message(code, err, str(spec), *needles)
    assert snapshot(run) == before and not (tmp_path / "x.npy").exists()


def resume(trained: Path, run: Path, capsys, *flags: str) -> tuple[int, str]:
    flags = ("--no-progress", "--resume", "--steps", "30", "--allow-spec-change", *flags)
    code = main(["train", str(trained / "spec.yaml"), "--out", str(run), *flags])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "needles"),
    [
        (b'{"step": 5, "loss": 1.0}\n\xff\xfe\n', ["metrics.jsonl is not UTF-8 text (byte 25, line 2"]),
        (b'{"step": 5}\n{"step": "ten"}\n{"step": 15}\n', ["metrics.jsonl line 2 is not a row of metrics"]),
        (b'{"step": 5}\n[5, 1.0]\n{"step": 15}\n', ["metrics.jsonl line 2 is not a row of metrics"]),
        (b'{"step": 5}\n{"step": 10, "lo\n{"step": 15}\n', ["metrics.jsonl line 2 is not a row of metrics"]),
        (b'{"step": true}\n', ["metrics.jsonl line 1 is not a row of metrics"]),
    ],
)
def test_bad_metrics_rows_on_resume_are_one_message_naming_the_row(trained, run, capsys, rows, needles):
    (run / "metrics.jsonl").write_bytes(rows)
    before = snapshot(run)
    code, err = resume(trained, run, capsys)
    assert_one_message(code, err, str(run / "metrics.jsonl"), *needles)
    assert snapshot(run) == before


def test_a_last_metrics_row_cut_short_by_a_crash_is_dropped(trained, run, capsys):
    rows = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(rows + '{"step": 25, "lo')
    code, err = resume(trained, run, capsys)
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s["train"].update(window="five"), "train.window"),
        (lambda s: s["train"].update(world_size=0), "train.world_size"),
        (lambda s: s["train"].pop("batches"), "train.batches"),
        (lambda s: s["train"].update(step=True), "train.step"),
        (lambda s: s["train"]["optimizer"].update(scalars={"x": 1}), "train.optimizer.scalars.x"),
        (lambda s: s["train"].update(step=10), "train.step is 10, not 20"),
    ],
)
def test_a_hand_edited_checkpoint_json_is_named_and_passed_over(trained, run, capsys, edit, field):
    newest = run / "checkpoints" / "step-00000020.json"
    state = json.loads(newest.read_text())
    edit(state)
    newest.write_text(json.dumps(state))
    code, err = resume(trained, run, capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert f"checkpoint step-00000020 cannot be used: {newest} is damaged: {field}" in err
    assert "resuming from step-00000010" in err


def resign(run: Path, change) -> Path:
    """Rewrite the newest checkpoint's tensors with ``change`` and its JSON to vouch for them."""
    tensors_path = run / "checkpoints" / "step-00000020.safetensors"
    tensors = safetensors.torch.load_file(str(tensors_path))
    change(tensors)
    blob = safetensors.torch.save(tensors, metadata={"format": "diffkit-train-checkpoint-1"})
    tensors_path.write_bytes(blob)
    json_path = tensors_path.with_suffix(".json")
    state = json.loads(json_path.read_text())
    state["tensors"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    json_path.write_text(json.dumps(state))
    return tensors_path


def _first(tensors: dict, prefix: str) -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix))


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.update({_first(t, "online."): torch.zeros(3, 3)}), "1 mis-shaped: "),
        (lambda t: t.pop(_first(t, "ema.")), "('ema.*': 1 missing: "),
        (lambda t: t.update({_first(t, "optimizer.0.exp_avg"): torch.zeros(7)}), "optimizer state 'exp_avg' has shape (7,)"),
        (lambda t: t.update({"rng.rank0.cpu": torch.zeros(5)}), "rng"),
        (lambda t: t.update({"rng.rank0.cpu": torch.zeros(5, dtype=torch.uint8)}), "RNG state"),
        (lambda t: t.pop("rng.rank0.cpu"), "no tensor 'rng.rank0.cpu'"),
        (lambda t: t.update({"losses.rank0": torch.zeros(99)}), "losses"),
    ],
)
def test_a_resigned_checkpoint_with_wrong_tensors_is_one_message(trained, run, capsys, change, needle):
    tensors_path = resign(run, change)
    before = snapshot(run)
    code, err = resume(trained, run, capsys)
    assert_one_message(code, err, f"{tensors_path} does not fit the network and optimiser this spec builds")
    assert needle.lower() in err.lower()
    assert snapshot(run) == before


# -- seeds, and what the command line does with any other failure ---------------------------------
@pytest.mark.parametrize("seed", [str(2**63), str(-(2**63) - 1), "1e30"])
@pytest.mark.parametrize("command", ["sample", "forward"])
def test_a_seed_outside_64_bits_is_refused_before_anything_runs(trained, tmp_path, capsys, seed, command):
    out = tmp_path / ("x.npy" if command == "sample" else "x.png")
    with pytest.raises(SystemExit) as info:
        main([command, str(trained / "run"), "--out", str(out), f"--seed={seed}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and "argument --seed: " in err
    assert ("outside the 64-bit seeds" in err) if seed != "1e30" else ("must be an integer, got '1e30'" in err)
    assert not out.exists()


def test_the_library_refuses_the_same_seeds(trained):
    pipe = Pipeline.load(trained / "run")
    with pytest.raises(SpecError, match=r"seed: 9223372036854775808 is outside the 64-bit seeds torch takes"):
        pipe.sample(2, seed=2**63, progress=False)
    with pytest.raises(SpecError, match=r"seed: .* is outside the 64-bit seeds"):
        Pipeline(denoiser="mlp", shape=(2,), seed=-(2**64))
    assert pipe.sample(2, seed=2**63 - 1, progress=False).shape == (2, 2)


@pytest.mark.parametrize(
    ("error", "needles"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), ["out of memory", "--batch-size"]),
        (MemoryError(), ["out of memory", "--batch-size"]),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:114] DefaultCPUAllocator: not enough memory"), ["RuntimeError"]),
        (RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), ["out of memory", "--batch-size"]),
        (ZeroDivisionError("division by zero"), ["ZeroDivisionError: division by zero", "--debug"]),
        (KeyError("x"), ["KeyError: 'x'", "--debug"]),
    ],
)
def test_any_other_failure_is_one_line_and_debug_shows_the_traceback(trained, tmp_path, capsys, monkeypatch, error, needles):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(Pipeline, "sample_batches", fail)
    argv = ["sample", str(trained / "run"), "--n", "4", "--out", str(tmp_path / "x.npy")]
    code = main(argv)
    err = capsys.readouterr().err
    assert_one_message(code, err, *needles)
    assert len(err.strip().splitlines()) == 1
    for debug in (["--debug", *argv], [*argv, "--debug"]):
        assert main(debug) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("diffkit: error: ")


def test_ctrl_c_exits_130_with_a_short_message(trained, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "sample_batches", interrupt)
    code = main(["sample", str(trained / "run"), "--n", "4", "--out", str(tmp_path / "x.npy")])
    assert code == 130 and capsys.readouterr().err == "diffkit: interrupted\n"


def test_a_damaged_run_file_is_named_with_its_byte(run, tmp_path, capsys):
    (run / "meta.json").write_bytes(b'{"format": 1, "note": "\xe9"}')
    code = main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "x.npy")])
    assert_one_message(code, capsys.readouterr().err, f"{run / 'meta.json'} is not UTF-8 text (byte 23, line 1")
    with pytest.raises(DiffkitError, match="meta.json is not UTF-8 text"):
        Pipeline.load(run)
