"""Training that survives and scales: checkpoints, exact resumption after SIGKILL, damaged
checkpoints, spec changes on resume, non-finite losses, the learning-rate schedule, the
data stream's position and shards, mixed precision, and two processes under torchrun."""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import diffkit.train
from diffkit import DiffkitError, TensorData
from diffkit.checkpoint import CheckpointDir
from diffkit.cli import main
from diffkit.interfaces import Objective
from diffkit.pipeline import Pipeline
from diffkit.spec import TrainConfig
from diffkit.train import BatchStream, learning_rate

SPEC = {
    "seed": 3,
    "data": {"type": "moons", "n": 1024},
    "schedule": {"type": "linear", "timesteps": 100},
    "denoiser": {"type": "mlp", "hidden": 32, "depth": 1},
    "train": {
        "steps": 60,
        "batch_size": 64,
        "preview": 0,
        "device": "cpu",
        "log_every": 7,  # not a divisor of checkpoint_every: a checkpoint falls inside a window of the log
        "checkpoint_every": 20,
        "keep_checkpoints": 5,
        "warmup_steps": 10,
        "lr_schedule": "cosine",
        "min_lr": 1e-4,
    },
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_spec(path: Path, **train) -> Path:
    spec = {**SPEC, "train": {**SPEC["train"], **train}}
    path.write_text(yaml.safe_dump(spec))
    return path


def train_cli(capsys, spec: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    code = main(["train", str(spec), "--out", str(out), "--no-progress", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "denoiser.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical: {different[:5]}"


def metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- checkpoints and exact resumption -----------------------------------------------------------
def test_a_run_writes_checkpoints_and_keeps_the_newest(capsys, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", keep_checkpoints=2)
    code, _, err = train_cli(capsys, spec, tmp_path / "run")
    assert code == 0, err
    checkpoints = CheckpointDir(tmp_path / "run" / "checkpoints", keep=2)
    assert checkpoints.steps() == [60, 40]
    last = checkpoints.read(60)
    assert last.state["train"]["step"] == 60 and last.state["spec"]["train"]["steps"] == 60
    # the run's weights are the last checkpoint's; no pickles anywhere
    saved = {k: v for k, v in weights(tmp_path / "run").items() if not k.startswith("data.reference")}
    renamed = {k.replace("ema.", "denoiser.", 1): v for k, v in last.tensors.items() if k.startswith(("ema.", "online.", "data."))}
    assert_identical(saved, renamed)
    assert not list((tmp_path / "run").rglob("*.pt")) and not list((tmp_path / "run").rglob("*.pkl"))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (exit {proc.returncode}) before {path.name} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.001)


def _wait_for_row(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and f'{{"step": {step},' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the metrics row of step {step} did not appear (exit {proc.returncode})")
        time.sleep(0.001)


def test_sigkill_at_any_moment_then_resume_is_bit_identical(capsys, tmp_path):
    """Killed (SIGKILL) right at a random checkpoint boundary, resumed, killed again at a
    random moment between the next two checkpoints, resumed: the weights, EMA, optimiser
    state and metrics end exactly as those of a run never interrupted."""
    every, steps = 150, 600
    spec = write_spec(tmp_path / "spec.yaml", steps=steps, checkpoint_every=every, batch_size=128)
    reference = tmp_path / "reference"
    assert train_cli(capsys, spec, reference)[0] == 0
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    boundary = rng.choice([every, 2 * every])
    # the second kill comes as a random metrics row strictly between the next two checkpoints appears
    log_every = SPEC["train"]["log_every"]
    # (at least 10 steps before it, so that the kill lands in the interval)
    row = rng.choice([s for s in range(boundary + every + 1, boundary + 2 * every - 10) if s % log_every == 0])

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffkit.cli", "train", str(spec), "--out", str(run), "--no-progress"]
    checkpoints = run / "checkpoints"
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.DEVNULL)
    _wait_for(checkpoints / f"step-{boundary:08d}.json", proc)
    proc.send_signal(signal.SIGKILL)  # at the boundary: the checkpoint has just been written
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    proc = subprocess.Popen([*cmd, "--resume"], env=ENV, stderr=subprocess.DEVNULL)
    _wait_for_row(run / "metrics.jsonl", row, proc)
    time.sleep(rng.uniform(0.0, 0.01))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = CheckpointDir(checkpoints, keep=5).steps()[0]
    assert proc.returncode == -signal.SIGKILL and killed_at == boundary + every, f"seed {seed}"

    code, out, err = train_cli(capsys, spec, run, "--resume")
    assert code == 0, err
    assert f"resuming from step-{killed_at:08d}" in err
    assert f"resumed at step {killed_at}" in out
    assert_identical(weights(run), weights(reference))
    final = [CheckpointDir(r / "checkpoints", 5).read(steps).tensors for r in (run, reference)]
    assert_identical(*final)  # optimiser state and generator states too
    assert metric_steps(run) == metric_steps(reference)  # rows written after the last checkpoint were dropped


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_used(capsys, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml")
    reference = tmp_path / "reference"
    assert train_cli(capsys, spec, reference)[0] == 0
    run = tmp_path / "run"
    assert train_cli(capsys, spec, run)[0] == 0
    (run / "spec.yaml").unlink()  # as if killed while writing the last checkpoint
    newest = run / "checkpoints" / "step-00000060.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    code, _, err = train_cli(capsys, spec, run, "--resume")
    assert code == 0, err
    assert "step-00000060 cannot be used" in err and "damaged" in err
    assert "resuming from step-00000040" in err
    assert_identical(weights(run), weights(reference))
    assert CheckpointDir(run / "checkpoints", 5).read(60).step == 60  # rewritten whole


def test_resuming_from_a_checkpoint_at_a_log_step_is_exact(tmp_path):
    """The default settings put every checkpoint on a log step (1000 and 50)."""
    reference = Pipeline.from_spec(SPEC)
    reference.fit(out=tmp_path / "reference", progress=False, steps=40, log_every=10)
    run = Pipeline.from_spec(SPEC)
    run.fit(out=tmp_path / "run", progress=False, steps=40, log_every=10)
    for path in CheckpointDir(tmp_path / "run" / "checkpoints", 5).paths(40):
        path.unlink()
    resumed = Pipeline.from_spec(SPEC)
    result = resumed.fit(out=tmp_path / "run", progress=False, steps=40, log_every=10, resume=True)
    assert result.resumed_from == 20 and [row["step"] for row in result.history] == [10, 20, 30, 40]
    assert_identical(resumed.denoiser.state_dict(), reference.denoiser.state_dict())
    assert_identical(resumed._online.state_dict(), reference._online.state_dict())


def test_a_damaged_checkpoint_json_is_passed_over(tmp_path):
    pipe = Pipeline.from_spec(SPEC)
    pipe.fit(out=tmp_path, progress=False, steps=40)
    (tmp_path / "checkpoints" / "step-00000040.json").write_text('{"format": "diffk')
    again = Pipeline.from_spec(SPEC)
    result = again.fit(out=tmp_path, progress=False, steps=40, resume=True)
    assert result.resumed_from == 20


def train_state(step: int) -> dict:
    """The JSON state of a checkpoint of ``step`` as training writes it, with no optimiser state."""
    train = {"step": step, "batches": step, "ema_updates": step, "window": 0, "skipped": 0, "world_size": 1}
    return {"train": {**train, "optimizer": {"param_groups": [], "scalars": {}}, "scaler": None}}


def test_checkpoints_newer_than_the_one_resumed_from_are_dropped_not_the_good_ones(tmp_path):
    checkpoints = CheckpointDir(tmp_path, keep=2)
    for step in (300, 400):
        checkpoints.write(step, {"w": torch.full((3,), float(step))}, train_state(step))
    checkpoints.paths(400)[0].write_bytes(b"damaged")
    assert checkpoints.latest(lambda msg: None).step == 300  # a run resumes from 300 ...
    checkpoints.write(310, {"w": torch.zeros(3)}, train_state(310))  # ... and writes its next checkpoint
    assert checkpoints.steps() == [310, 300]  # the unusable 400 is gone, the good 300 kept
    checkpoints.keep = 1
    checkpoints.write(320, {"w": torch.ones(3)}, train_state(320))
    assert checkpoints.steps() == [320] and checkpoints.read(320).step == 320


def test_resuming_with_no_readable_checkpoint_is_refused_and_changes_nothing(tmp_path):
    Pipeline.from_spec(SPEC).fit(out=tmp_path, progress=False, steps=40, log_every=10)
    for step in (20, 40):
        (tmp_path / "checkpoints" / f"step-{step:08d}.json").write_text("{")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(DiffkitError, match="every checkpoint is damaged .*step-00000040.*step-00000020"):
        Pipeline.from_spec(SPEC).fit(out=tmp_path, progress=False, steps=40, log_every=10, resume=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_different_spec_is_refused_on_resume_with_what_changed(capsys, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", steps=40)
    run = tmp_path / "run"
    assert train_cli(capsys, spec, run)[0] == 0

    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), "denoiser": {"type": "mlp", "hidden": 64, "depth": 1}}))
    code, out, err = train_cli(capsys, wider, run, "--resume", "--allow-spec-change")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "denoiser.hidden: 32 → 64" in err and "cannot change" in err

    code, out, err = train_cli(capsys, spec, run, "--resume", "--steps", "60")
    assert code == 1
    assert "train.steps: 40 → 60" in err and "--allow-spec-change" in err

    code, out, err = train_cli(capsys, spec, run, "--resume", "--steps", "20", "--allow-spec-change")
    assert code == 1 and err.count("\n") == 1
    assert "has trained 40 steps already, more than the 20 asked for" in err

    code, out, err = train_cli(capsys, spec, run, "--resume", "--steps", "60", "--allow-spec-change")
    assert code == 0, err
    assert "resumed at step 40" in out
    assert json.loads((run / "meta.json").read_text())["steps_trained"] == 60


def test_checkpoints_of_an_unfinished_run_need_resume_or_force(capsys, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml")
    run = tmp_path / "run"
    assert train_cli(capsys, spec, run)[0] == 0
    (run / "spec.yaml").unlink()
    code, _, err = train_cli(capsys, spec, run)
    assert code == 1 and "--resume" in err and "--force" in err
    code, _, err = train_cli(capsys, spec, run, "--force", "--steps", "20")
    assert code == 0, err
    assert CheckpointDir(run / "checkpoints", 5).steps() == [20]  # the earlier run's are gone


def test_resume_never_retrains_a_finished_run_that_has_no_checkpoints(capsys, tmp_path):
    spec = write_spec(tmp_path / "spec.yaml", steps=20)
    run = tmp_path / "run"
    assert train_cli(capsys, spec, run)[0] == 0
    CheckpointDir(run / "checkpoints", 5).clear()  # as a run from before checkpoints
    before = weights(run)
    code, _, err = train_cli(capsys, spec, run, "--resume")
    assert code == 1 and "without checkpoints" in err and "--force" in err
    assert_identical(weights(run), before)


# -- non-finite losses --------------------------------------------------------------------------
@pytest.fixture
def nan_at(monkeypatch):
    """Make the objective's loss NaN at the given (1-based) calls."""

    def install(*calls: int) -> None:
        original = Objective.loss
        count = {"n": 0}

        def loss(self, *args, **kwargs):
            count["n"] += 1
            value = original(self, *args, **kwargs)
            return value * float("nan") if count["n"] in calls else value

        monkeypatch.setattr(Objective, "loss", loss)

    return install


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_checkpoint(capsys, tmp_path, nan_at):
    spec = write_spec(tmp_path / "spec.yaml", checkpoint_every=10)
    run = tmp_path / "run"
    nan_at(26)
    code, _, err = train_cli(capsys, spec, run)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "loss was nan at step 26" in err and "step-00000020" in err
    checkpoints = CheckpointDir(run / "checkpoints", 5)
    assert checkpoints.steps() == [20, 10]
    good = checkpoints.read(20)
    assert all(torch.isfinite(v).all() for k, v in good.tensors.items() if k.startswith(("online.", "ema.")))
    assert not (run / "spec.yaml").exists()


def test_nonfinite_steps_may_be_skipped_a_bounded_number_of_times(tmp_path, nan_at):
    nan_at(5, 9)
    pipe = Pipeline.from_spec(SPEC)
    result = pipe.fit(progress=False, steps=20, skip_nonfinite=2, out=tmp_path)
    assert result.skipped == 2 and all(torch.isfinite(p).all() for p in pipe.denoiser.parameters())
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["skipped_nonfinite"] == 2

    nan_at(3, 4, 6)
    with pytest.raises(DiffkitError, match=r"at step 6; training stopped.*\(non-finite step 3; train.skip_nonfinite skips 2\)"):
        Pipeline.from_spec(SPEC).fit(progress=False, steps=20, skip_nonfinite=2)


# -- schedule, data stream, precision, outputs --------------------------------------------------
def test_learning_rate_warms_up_then_decays_to_min_lr():
    c = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr=1e-5)
    assert learning_rate(1, c) == pytest.approx(1e-4)
    assert learning_rate(10, c) == pytest.approx(1e-3)
    assert learning_rate(55, c) == pytest.approx((1e-3 + 1e-5) / 2)  # half way: cos(π/2) = 0
    assert learning_rate(100, c) == pytest.approx(1e-5)
    lrs = [learning_rate(k, c) for k in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))
    assert learning_rate(50, TrainConfig(lr=3e-4)) == 3e-4


def test_min_lr_above_lr_is_a_spec_error():
    from diffkit import SpecError
    from diffkit.spec import validate_spec

    with pytest.raises(SpecError, match="train.min_lr: .*exceeds lr"):
        validate_spec({**SPEC, "train": {"lr": 1e-4, "min_lr": 1e-3}})


def _data(n: int = 50) -> TensorData:
    return TensorData(torch.arange(n, dtype=torch.float32)[:, None], torch.zeros(n, dtype=torch.long))


def test_a_batch_stream_started_at_a_position_continues_exactly():
    full = BatchStream(_data(), 8, seed=1, device=torch.device("cpu"))
    batches = [next(full)[0] for _ in range(20)]  # 6 batches per epoch: three epochs and more
    later = BatchStream(_data(), 8, seed=1, device=torch.device("cpu"), start=13)
    assert all(torch.equal(next(later)[0], b) for b in batches[13:])
    assert later.position == 20


def test_processes_get_disjoint_shards_of_every_epoch():
    streams = [BatchStream(_data(), 5, seed=0, device=torch.device("cpu"), rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([next(s)[0] for _ in range(5)]).flatten().tolist() for s in streams]  # one epoch each
    assert len(seen[0]) == len(seen[1]) == 25 and not set(seen[0]) & set(seen[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_data_read_through_a_dataloader_resumes_exactly_too(workers):
    class FromFiles(TensorData):  # no tensors(): read item by item, as from files
        def tensors(self):
            return None

    data = FromFiles(torch.arange(40, dtype=torch.float32)[:, None], torch.zeros(40, dtype=torch.long))
    full = BatchStream(data, 4, seed=2, device=torch.device("cpu"), num_workers=workers)
    batches = [next(full)[0] for _ in range(15)]
    later = BatchStream(data, 4, seed=2, device=torch.device("cpu"), start=7, num_workers=workers)
    assert all(torch.equal(next(later)[0], b) for b in batches[7:])


def test_bf16_autocast_and_accumulation_train_on_cpu(capsys):
    pipe = Pipeline.from_spec(SPEC)
    result = pipe.fit(progress=False, steps=10, precision="bf16", grad_accum=2, batch_size=32)
    assert result.effective_batch_size == 64 and torch.isfinite(torch.tensor(result.final_loss))
    assert "effective batch size 32 × 2 accumulated × 1 = 64" in capsys.readouterr().err
    assert all(p.dtype == torch.float32 for p in pipe.denoiser.parameters())


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DiffkitError, match="'fp16' needs CUDA.*'bf16'"):
        Pipeline.from_spec(SPEC).fit(progress=False, steps=2, precision="fp16")


def test_fp16_gradient_scaling_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """The fp16 path (autocast, GradScaler's scale/unscale/step/update, the scaler's state
    in checkpoints) run on CPU, where torch has fp16 autocast and a GradScaler too."""
    monkeypatch.setattr(diffkit.train, "FP16_DEVICES", ("cuda", "cpu"))
    # start the scale high enough that the first steps' fp16 gradients overflow
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**40))
    reference = Pipeline.from_spec(SPEC)
    result = reference.fit(out=tmp_path / "reference", progress=False, steps=40, precision="fp16")
    assert math.isfinite(result.final_loss)
    saved = CheckpointDir(tmp_path / "reference" / "checkpoints", 5).read(20).state["train"]["scaler"]
    # steps with overflowing gradients were skipped and the scale halved each time
    assert 1.0 <= saved["scale"] < 2.0**40 and saved["backoff_factor"] == 0.5, saved
    run = Pipeline.from_spec(SPEC)
    run.fit(out=tmp_path / "run", progress=False, steps=40, precision="fp16")
    for path in CheckpointDir(tmp_path / "run" / "checkpoints", 5).paths(40):
        path.unlink()
    resumed = Pipeline.from_spec(SPEC)
    assert resumed.fit(out=tmp_path / "run", progress=False, steps=40, precision="fp16", resume=True).resumed_from == 20
    assert_identical(resumed._online.state_dict(), reference._online.state_dict())
    assert_identical(resumed.denoiser.state_dict(), reference.denoiser.state_dict())
    plain = Pipeline.from_spec(SPEC)
    plain.fit(progress=False, steps=40)
    assert not all(torch.equal(a, b) for a, b in zip(plain.denoiser.parameters(), reference.denoiser.parameters()))


def test_sample_pictures_during_training_leave_training_unchanged(tmp_path):
    plain = Pipeline.from_spec(SPEC)
    plain.fit(progress=False, steps=20)
    drawn = Pipeline.from_spec(SPEC)
    drawn.fit(progress=False, steps=20, sample_every=10, preview=200, out=tmp_path)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000010.png", "step-00000020.png"]
    assert_identical(plain.denoiser.state_dict(), drawn.denoiser.state_dict())


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(DiffkitError, match=r"tensorboard package is not installed.*diffkit\[tensorboard\].*jsonl"):
        Pipeline.from_spec(SPEC).fit(progress=False, steps=2, log="tensorboard", out=tmp_path)


def test_tensorboard_logging_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Pipeline.from_spec(SPEC).fit(progress=False, steps=14, log="tensorboard", out=tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [7, 14]
    assert {"train/loss", "train/lr", "train/steps_per_s"} <= set(events.Tags()["scalars"])


# -- two processes under torchrun ----------------------------------------------------------------
TORCHRUN_SCRIPT = """
import os, sys
from safetensors.torch import save_file
import diffkit.pipeline as P
from diffkit.cli import main

fitted = []
fit = P.Pipeline.fit
def recording_fit(self, *args, **kwargs):
    result = fit(self, *args, **kwargs)
    fitted.append(self)
    return result
P.Pipeline.fit = recording_fit

spec, out, weights, *flags = sys.argv[1:]
rank = int(os.environ["RANK"])
if "--resume" not in flags:  # each rank is told its own run directory: only rank 0's may receive anything
    out = os.path.join(out, f"rank{rank}")
code = main(["train", spec, "--out", out, "--no-progress", *flags])
pipe = fitted[0]
tensors = {**{f"ema.{k}": v for k, v in pipe.denoiser.state_dict().items()},
           **{f"online.{k}": v for k, v in pipe._online.state_dict().items()}}
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(weights, f"rank{rank}.safetensors"))
sys.exit(code)
"""


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_on_gloo_agree_only_rank_0_writes_and_resume_exactly(tmp_path):
    script = tmp_path / "run_ranks.py"
    script.write_text(textwrap.dedent(TORCHRUN_SCRIPT))
    spec = write_spec(tmp_path / "spec.yaml", steps=30, checkpoint_every=10, log_every=5)
    outs, got = tmp_path / "outs", tmp_path / "weights"
    outs.mkdir()
    got.mkdir()
    proc = _torchrun(script, str(spec), str(outs), str(got))
    assert "effective batch size 64 × 1 accumulated × 2 = 128" in proc.stderr
    first = [load_file(str(got / f"rank{r}.safetensors")) for r in range(2)]
    assert_identical(*first)
    assert not (outs / "rank1").exists()
    written = outs / "rank0"
    assert {"spec.yaml", "denoiser.safetensors", "meta.json", "metrics.jsonl", "checkpoints"} <= {p.name for p in written.iterdir()}
    checkpoints = CheckpointDir(written / "checkpoints", 5)
    assert checkpoints.steps() == [30, 20, 10]
    assert checkpoints.read(30).state["train"]["world_size"] == 2
    assert metric_steps(written) == [5, 10, 15, 20, 25, 30]

    # back to step 10, as if both processes had died after writing it: both resume exactly
    for step in (20, 30):
        for path in checkpoints.paths(step):
            path.unlink()
    (written / "spec.yaml").unlink()
    proc = _torchrun(script, str(spec), str(written), str(got), "--resume")
    assert "resuming from step-00000010" in proc.stderr
    resumed = [load_file(str(got / f"rank{r}.safetensors")) for r in range(2)]
    assert_identical(resumed[0], first[0])
    assert_identical(resumed[1], first[0])
