"""What a run directory holds is checked before it is used, and memory is bounded.

Damaged weights (flipped bytes, integer or boolean tensors, NaN), damaged statistics
(``data.mean`` of the wrong shape, NaN or zero ``data.std``) and malformed ``meta.json``
are each one message naming the file and the field, never all-NaN samples with exit 0
or a traceback. A network too large for the memory is refused before it is allocated.
``sample`` draws in batches and streams a ``.npy`` to disk; pictures and ``forward``
have a cap on what they draw.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import diffkit
from diffkit import memory
from diffkit.cli import main
from diffkit.errors import DiffkitError
from diffkit.interfaces import BuildContext
from diffkit.pipeline import META_FILE, SPEC_FILE, WEIGHTS_FILE, Pipeline

TINY = {
    "seed": 0,
    "data": {"type": "gaussians", "components": 1, "radius": 5.0, "std": 0.1, "n": 256},
    "schedule": {"type": "linear", "timesteps": 20},
    "denoiser": {"type": "mlp", "hidden": 16, "depth": 1},
    "train": {"steps": 5, "batch_size": 32, "preview": 0, "device": "cpu", "log_every": 5},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    pipe = Pipeline.from_spec(TINY)
    pipe.fit(progress=False)
    return pipe.save(tmp_path_factory.mktemp("runs") / "tiny")


@pytest.fixture
def run(saved, tmp_path) -> Path:
    """A copy of the saved run that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "run"))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def fails_on_load_and_sample(run: Path, capsys, tmp_path, *needles: str) -> str:
    """``Pipeline.load`` and ``diffkit sample`` give the same one message, containing every
    needle; the run directory is byte-identical afterwards and nothing was written."""
    before = snapshot(run)
    with pytest.raises(DiffkitError) as info:
        Pipeline.load(run)
    message = str(info.value)
    out = tmp_path / "x.npy"
    assert main(["sample", str(run), "--n", "8", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == f"diffkit: error: {message}\n"
    for needle in needles:
        assert needle in message
    assert not out.exists() and snapshot(run) == before
    return message


def rewrite_weights(run: Path, change) -> None:
    """Rewrite denoiser.safetensors with ``change(tensors)`` applied, and record the new
    file's checksum, as a file whose bytes are intact but whose contents are wrong."""
    tensors = load_file(str(run / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(run / WEIGHTS_FILE))
    meta = json.loads((run / META_FILE).read_text())
    meta["sha256"][WEIGHTS_FILE] = hashlib.sha256((run / WEIGHTS_FILE).read_bytes()).hexdigest()
    (run / META_FILE).write_text(json.dumps(meta))


# -- checksums -----------------------------------------------------------------------------------
def test_save_records_the_sha256_of_the_weights(saved):
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["sha256"] == {WEIGHTS_FILE: hashlib.sha256((saved / WEIGHTS_FILE).read_bytes()).hexdigest()}


def test_flipped_bytes_in_the_weights_are_refused(run, capsys, tmp_path):
    data = bytearray((run / WEIGHTS_FILE).read_bytes())
    data[-20] ^= 0xFF  # inside a tensor's values: the file still parses, the weights are wrong
    (run / WEIGHTS_FILE).write_bytes(bytes(data))
    load_file(str(run / WEIGHTS_FILE))  # the damage is invisible to safetensors itself
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / WEIGHTS_FILE), "SHA-256", "meta.json")


def test_a_run_saved_without_checksums_still_loads(run):
    meta = json.loads((run / META_FILE).read_text())
    del meta["sha256"]
    (run / META_FILE).write_text(json.dumps(meta))
    pipe = Pipeline.load(run)
    assert torch.isfinite(pipe.sample(4, seed=0)).all()


# -- tensors -------------------------------------------------------------------------------------
def test_integer_weights_are_refused(run, capsys, tmp_path):
    rewrite_weights(run, lambda t: t.update({"denoiser.inp.weight": t["denoiser.inp.weight"].long()}))
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / WEIGHTS_FILE), "'denoiser.inp.weight'", "torch.int64")


def test_boolean_weights_are_refused(run, capsys, tmp_path):
    rewrite_weights(run, lambda t: t.update({"denoiser.out.2.bias": t["denoiser.out.2.bias"] > 0}))
    fails_on_load_and_sample(run, capsys, tmp_path, "'denoiser.out.2.bias'", "torch.bool")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(run, capsys, tmp_path, value):
    def poison(t):
        t["denoiser.inp.weight"][0, 0] = value

    rewrite_weights(run, poison)
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / WEIGHTS_FILE), "'denoiser.inp.weight'", "NaN or infinite")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data_std_is_refused(run, capsys, tmp_path, value):
    def poison(t):
        t["data.std"][1] = value

    rewrite_weights(run, poison)
    fails_on_load_and_sample(run, capsys, tmp_path, "'data.std'", "NaN or infinite")


def test_zero_data_std_is_refused(run, capsys, tmp_path):
    rewrite_weights(run, lambda t: t["data.std"].zero_())
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / WEIGHTS_FILE), "data.std has a value of 0 or less")


@pytest.mark.parametrize("name", ["data.mean", "data.std"])
def test_statistics_of_the_wrong_shape_are_refused(run, capsys, tmp_path, name):
    rewrite_weights(run, lambda t: t.update({name: torch.ones(3)}))
    fails_on_load_and_sample(run, capsys, tmp_path, f"{name} has shape (3,)", "has shape (2,)")


def test_a_mean_without_its_std_is_refused(run, capsys, tmp_path):
    rewrite_weights(run, lambda t: t.pop("data.std"))
    fails_on_load_and_sample(run, capsys, tmp_path, "has data.mean but no data.std")


# -- meta.json -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("{}", ["sample_shape must be a list of positive integers", "got missing"]),
        ("[]", ["holds an array where a JSON object"]),
        ('"run"', ["holds a string where a JSON object"]),
        ('{"sample_shape": "2"}', ["sample_shape must be a list of positive integers", "got a string"]),
        ('{"sample_shape": ["2"]}', ["sample_shape must be"]),
        ('{"sample_shape": [0]}', ["sample_shape must be"]),
        ('{"sample_shape": [2], "num_classes": "3"}', ["num_classes must be"]),
        ('{"sample_shape": [2], "data_kind": 7}', ["data_kind must be 'points' or 'images'"]),
        ('{"sample_shape": [2], "steps_trained": -1}', ["steps_trained must be"]),
        ('{"sample_shape": [2], "parts": "yes"}', ["parts must be"]),
        ('{"sample_shape": [2], "sha256": {"denoiser.safetensors": 5}}', ["sha256 must be"]),
        ('{"sample_shape": [2], "sha256": []}', ["sha256 must be"]),
    ],
    ids=["empty", "array", "string", "string-shape", "string-dims", "zero-dim", "classes", "kind", "steps", "parts", "sum", "sums"],
)
def test_malformed_meta_json_is_one_message_naming_the_field(run, capsys, tmp_path, text, needles):
    (run / META_FILE).write_text(text)
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / META_FILE), *needles)


def test_meta_json_that_is_not_utf8_is_one_message(run, capsys, tmp_path):
    (run / META_FILE).write_bytes(b'{"sample_shape": [2], "x": "\xff"}')
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / META_FILE), "not UTF-8")


# -- the size of the network ---------------------------------------------------------------------
def test_a_huge_network_in_a_run_directory_is_refused_before_it_is_allocated(run, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 16 * 10**9)  # the same in both messages
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    spec = yaml.safe_load((run / SPEC_FILE).read_text())
    spec["denoiser"].update(hidden=65536, depth=64)  # 3.3 TB of weights
    (run / SPEC_FILE).write_text(yaml.safe_dump(spec))
    message = fails_on_load_and_sample(run, capsys, tmp_path, "denoiser.hidden (65536)", "denoiser.depth (64)", "DIFFKIT_MEMORY_LIMIT")
    assert "3.3 TB of weights (6.6 TB with their EMA copy), more than the memory available (16.0 GB)" in message


def test_the_memory_limit_can_be_set(monkeypatch):
    net = {"type": "mlp", "hidden": 256, "depth": 2}
    Pipeline(denoiser=net, shape=(2,))  # ~0.5 MB: fits anywhere
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "100KB")
    with pytest.raises(DiffkitError, match=r"denoiser\.hidden \(256\)") as info:
        Pipeline(denoiser=net, shape=(2,))
    assert "DIFFKIT_MEMORY_LIMIT sets (100.0 KB)" in str(info.value)
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(DiffkitError, match="DIFFKIT_MEMORY_LIMIT='lots' is not an amount of memory"):
        Pipeline(denoiser=net, shape=(2,))


def test_sizing_the_network_leaves_the_initial_weights_alone():
    net = {"type": "mlp", "hidden": 16, "depth": 1}
    pipe = Pipeline(denoiser=net, shape=(2,), seed=3)
    registry = diffkit.plugins.get_registry()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)  # as the pipeline builds: the schedule, then the denoiser
        registry.build("schedule", "linear", pipe.context)
        direct = registry.build("denoiser", net, pipe.context)
    for (name, a), b in zip(pipe.denoiser.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), name


# -- bounded memory: sample, pictures, forward ---------------------------------------------------
def test_the_default_batch_does_not_grow_with_n():
    def batch(shape, kind="points"):
        return Pipeline(denoiser={"type": "mlp", "hidden": 8, "depth": 1}, _context=BuildContext(sample_shape=shape, data_kind=kind)).default_batch_size()

    assert batch((2,)) == 10_000  # 2^20 values would be 524,288 points: capped
    assert batch((3, 64, 64), "images") == 2**20 // (3 * 64 * 64) == 85
    assert batch((1, 28, 28), "images") == 1337


def test_sample_streams_the_npy_batch_by_batch(saved, tmp_path, capsys, monkeypatch):
    import diffkit.pipeline

    monkeypatch.setattr(diffkit.pipeline, "SAMPLE_BATCH_VALUES", 6)  # 3 points of 2 values per batch
    log: list[tuple[str, int]] = []
    draw = Pipeline.sample_batches

    def sample_batches(self, *args, **kwargs):
        assert kwargs["batch_size"] is None  # the CLI's default is the library's
        for x in draw(self, *args, **kwargs):
            log.append(("draw", x.shape[0]))
            yield x

    class Recorder:
        def __init__(self, array):
            self.array = array

        def __setitem__(self, key, value):
            log.append(("write", len(value)))
            self.array[key] = value

        def flush(self):
            self.array.flush()

    open_memmap = np.lib.format.open_memmap
    monkeypatch.setattr(Pipeline, "sample_batches", sample_batches)
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: Recorder(open_memmap(*a, **k)))
    monkeypatch.setattr(Pipeline, "sample", lambda *a, **k: pytest.fail("sample holds every sample at once"))
    out = tmp_path / "x.npy"
    assert main(["sample", str(saved), "--n", "10", "--seed", "4", "--out", str(out), "--no-progress"]) == 0
    # each batch is written before the next is drawn: memory holds one batch, whatever --n
    assert log == [("draw", 3), ("write", 3)] * 3 + [("draw", 1), ("write", 1)]
    monkeypatch.undo()
    expected = Pipeline.load(saved).sample(10, seed=4, batch_size=3)
    assert np.array_equal(np.load(out), expected.numpy())
    assert "drew 10 samples of shape (2,)" in capsys.readouterr().out


def test_a_npy_larger_than_the_free_disk_is_refused_before_sampling(saved, tmp_path, capsys, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda path: sh._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "x.npy"
    assert main(["sample", str(saved), "--n", "1000", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"diffkit: error: {out} would take 8.0 KB (1,000 samples of shape (2,))") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


def test_a_picture_of_too_many_samples_is_refused_before_sampling(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Pipeline, "sample_batches", lambda *a, **k: pytest.fail("sampled before the check"))
    out = tmp_path / "x.png"
    assert main(["sample", str(saved), "--n", "1000000000", "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "a picture shows at most 200,000 samples of points and 1,000,000,000 were asked for (--n" in err
    assert err.count("\n") == 1 and not out.exists()


def test_a_preview_too_large_to_draw_is_refused_before_training():
    pipe = Pipeline.from_spec({**TINY, "train": {**TINY["train"], "preview": 10**9}})
    with pytest.raises(DiffkitError, match=r"at most 200,000 samples of points and 1,000,000,000 were asked for \(train\.preview\)"):
        pipe.fit(progress=False)
    assert pipe.steps_trained == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n", "100000000"], "shows at most 100,000 points, and 100,000,000 were asked for (--n)"),
        (["--frames", "100000"], "shows at most 32 timesteps, and 100,000 were asked for (--frames)"),
    ],
)
def test_forward_caps_what_it_draws(saved, tmp_path, capsys, args, needle):
    out = tmp_path / "f.png"
    assert main(["forward", str(saved), "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and not out.exists()


def test_forward_caps_image_rows():
    pipe = Pipeline(denoiser={"type": "mlp", "hidden": 8, "depth": 1}, _context=BuildContext(sample_shape=(1, 8, 8), data_kind="images"))
    pipe.check_forward(64, 8)
    with pytest.raises(DiffkitError, match="at most 64 examples, and 65 were asked for"):
        pipe.check_forward(65, 8)


def test_the_classifier_of_classifier_guidance_is_checked_too(tmp_path, capsys):
    CLASSIFIER_FILE = "classifier.safetensors"
    spec = {
        **TINY,
        "data": {"type": "gaussians", "components": 2, "n": 64},
        "guidance": {"type": "classifier", "train_steps": 2},
    }
    pipe = Pipeline.from_spec(spec)
    pipe.fit(progress=False)
    run = pipe.save(tmp_path / "cg")
    meta = json.loads((run / META_FILE).read_text())
    assert meta["sha256"][CLASSIFIER_FILE] == hashlib.sha256((run / CLASSIFIER_FILE).read_bytes()).hexdigest()
    Pipeline.load(run)
    tensors = load_file(str(run / CLASSIFIER_FILE))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(run / CLASSIFIER_FILE))  # a changed file: its checksum no longer matches
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / CLASSIFIER_FILE), "SHA-256")
    meta["sha256"][CLASSIFIER_FILE] = hashlib.sha256((run / CLASSIFIER_FILE).read_bytes()).hexdigest()
    (run / META_FILE).write_text(json.dumps(meta))  # re-signed: the NaN values themselves are refused
    fails_on_load_and_sample(run, capsys, tmp_path, str(run / CLASSIFIER_FILE), f"'{name}'", "NaN or infinite")


def test_training_state_is_sized_before_training(monkeypatch):
    pipe = Pipeline.from_spec({**TINY, "denoiser": {"type": "mlp", "hidden": 256, "depth": 2}})
    weights = memory.module_bytes(pipe.denoiser)
    # room for the weights and their EMA (what building needs), not for the training state
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, str(3 * weights))
    with pytest.raises(DiffkitError, match=r"to train: the weights, their EMA, the gradients and AdamW's two moments") as info:
        pipe.fit(progress=False)
    assert "denoiser.hidden (256) or denoiser.depth (2)" in str(info.value)
    assert pipe.steps_trained == 0
    monkeypatch.setenv(memory.MEMORY_LIMIT_ENV, str(5 * weights))
    pipe.fit(progress=False, steps=1)
    assert pipe.steps_trained == 1


def test_each_label_is_drawn_from_the_seed_batch_by_batch(tmp_path, capsys):
    spec = {**TINY, "data": {"type": "gaussians", "components": 3, "n": 64}, "denoiser": {"type": "mlp", "hidden": 16, "depth": 1, "num_classes": 3}}
    pipe = Pipeline.from_spec(spec)
    pipe.fit(progress=False)
    run = pipe.save(tmp_path / "cfg")
    both, one = tmp_path / "both.npy", tmp_path / "one.npy"
    common = ["--n", "5", "--seed", "1", "--batch-size", "2", "--no-progress"]
    assert main(["sample", str(run), "--label", "0,2", "--out", str(both), *common]) == 0
    assert main(["sample", str(run), "--label", "2", "--out", str(one), *common]) == 0
    rows = np.load(both)
    assert rows.shape == (10, 2) and np.array_equal(rows[5:], np.load(one))
    assert np.array_equal(rows[:5], pipe.sample(5, seed=1, labels=0, batch_size=2).numpy())


def test_a_containers_limit_counts_where_it_is_below_the_machines(monkeypatch, tmp_path):
    import builtins

    files = {"/sys/fs/cgroup/memory.max": "3000000\n", "/sys/fs/cgroup/memory.current": "1000000\n", "/proc/meminfo": "MemAvailable:  8000000 kB\n"}
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(tmp_path / Path(path).name, *a, **k) if str(path) in files else real_open(path, *a, **k))
    for path, text in files.items():
        (tmp_path / Path(path).name).write_text(text)
    assert memory.memory_limit() == 2_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.memory_limit() == 8_000_000 * 1024
