"""The denoiser's training loop.

The denoiser's loop (:func:`train`) runs AdamW with warm-up and cosine decay, gradient
accumulation and clipping, mixed precision, an EMA of the weights, and data parallelism
under ``torchrun``; it writes metrics and checkpoints from which a run resumes exactly.

Exact resumption rests on one rule: every random draw comes from a generator whose
state is in the checkpoint or is a function of the step. The data order of epoch e is a
permutation drawn from a generator seeded by (seed, e) alone, so the data position is
the number of batches drawn; the noise (t, ε, dropped labels, dropout) comes from torch's
global generator, whose state is saved; the learning rate is a function of the step.
Nothing computed in a step depends on whether the run was resumed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffkit.checkpoint import CheckpointDir, TrainingCheckpoint, atomic_write, read_text, state_dict_mismatch
from diffkit.distributed import DistContext
from diffkit.errors import DiffkitError
from diffkit.interfaces import Dataset, Objective, Schedule
from diffkit.spec import TrainConfig

__all__ = [
    "resolve_device",
    "substream_seed",
    "BatchStream",
    "EMA",
    "learning_rate",
    "MetricsLog",
    "Outputs",
    "TrainResult",
    "NonFiniteLoss",
    "train",
    "drop_labels",
]


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is an error."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DiffkitError("train.device is 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DiffkitError("train.device is 'mps' but MPS is not available; use 'cpu' or 'auto'")
    return torch.device(name)


def substream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the random sub-stream ``keys`` of ``seed`` (an epoch's data
    order, a process's noise): a function of its keys alone, so any sub-stream can be
    re-created at any point, and unrelated to the others."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class BatchStream:
    """An endless stream of shuffled ``(x, y)`` batches for one process, whose position
    is the number of batches it has handed out (:attr:`position`).

    Epoch e's order is a permutation drawn from a generator seeded by (seed, e) alone,
    so a stream started at position p continues exactly where another left off at p.
    Under data parallelism each of the W processes takes every W-th index of that
    permutation (its tail cut to a multiple of W, as torch's DistributedSampler does):
    disjoint shards of every epoch. In-memory data is indexed directly on the device (no
    DataLoader overhead per step); other datasets go through a DataLoader with
    ``num_workers`` worker processes.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        seed: int,
        device: torch.device,
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.n, self.batch_size, self.seed = len(data), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shard = self.n // world_size
        self.per_epoch = self.shard // batch_size
        if self.per_epoch == 0:
            per = f" shared by {world_size} processes ({self.shard} each)" if world_size > 1 else ""
            raise DiffkitError(f"train.batch_size ({batch_size}) exceeds the dataset's {self.n} examples{per}; lower it")
        self.position = start
        self._device, self._transform = device, transform
        tensors = data.tensors()
        if tensors is not None:
            self._it: Iterator[tuple[Tensor, Tensor]] = self._in_memory(*tensors, start=start)
        else:
            loader = torch.utils.data.DataLoader(
                data,
                batch_sampler=_IndexBatches(self, start),
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                # the workers' seeds come from this generator, not from torch's global one
                generator=torch.Generator().manual_seed(substream_seed(seed, "workers", rank, start)),
            )
            self._it = self._loaded(iter(loader))

    def epoch_indices(self, epoch: int) -> Tensor:
        """This process's shard of epoch ``epoch``'s permutation of the data."""
        g = torch.Generator().manual_seed(substream_seed(self.seed, "epoch", epoch))
        perm = torch.randperm(self.n, generator=g)
        return perm[self.rank : self.shard * self.world_size : self.world_size]

    def index_batches(self, start: int, device: torch.device | None = None) -> Iterator[Tensor]:
        """The indices of each batch from position ``start`` on."""
        epoch, first = divmod(start, self.per_epoch)
        B = self.batch_size
        while True:
            idx = self.epoch_indices(epoch).to(device or "cpu")
            for b in range(first, self.per_epoch):
                yield idx[b * B : (b + 1) * B]
            epoch, first = epoch + 1, 0

    def _in_memory(self, x: Tensor, y: Tensor, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = x.to(self._device), y.to(self._device)
        if self._transform is not None:
            x = self._transform(x)
        for idx in self.index_batches(start, self._device):
            yield x[idx], y[idx]

    def _loaded(self, it: Iterator[Any]) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in it:
            x = x.to(self._device, non_blocking=True)
            yield (self._transform(x) if self._transform is not None else x), y.to(self._device, non_blocking=True)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        batch = next(self._it)
        self.position += 1
        return batch


class _IndexBatches(torch.utils.data.Sampler[list[int]]):
    """A :class:`BatchStream`'s batches of indices, as a DataLoader's batch sampler."""

    def __init__(self, stream: BatchStream, start: int) -> None:
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[int]]:
        return (idx.tolist() for idx in self.stream.index_batches(self.start))


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with warm-up d_k = min(d, (1 + k)/(10 + k))
    (the averaging of Ho et al. 2020, App. B; the warm-up is the num_updates rule of TensorFlow's
    ExponentialMovingAverage).

    With decay 0 the average is the weights themselves: nothing is done per step, and
    :meth:`sync` copies them when the averaged model is about to be read.
    """

    def __init__(self, online: nn.Module, decay: float, target: nn.Module | None = None) -> None:
        self.decay = decay
        self.model = target if target is not None else copy.deepcopy(online)
        self.model.requires_grad_(False)
        self._dst = [p.data for p in self.model.parameters()]
        self._src = [p.data for p in online.parameters()]
        self._bufs = list(zip(self.model.buffers(), online.buffers()))
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        if self.decay > 0:
            d = min(self.decay, (1 + self.updates) / (10 + self.updates))
            torch._foreach_lerp_(self._dst, self._src, 1.0 - d)
            for b_ema, b in self._bufs:
                b_ema.copy_(b)
        self.updates += 1

    @torch.no_grad()
    def sync(self) -> None:
        """Bring the averaged model up to date before it is read (only decay 0 defers work)."""
        if self.decay == 0:
            torch._foreach_copy_(self._dst, self._src)
            for b_ema, b in self._bufs:
                b_ema.copy_(b)


def learning_rate(k: int, config: TrainConfig) -> float:
    """The learning rate of step ``k`` (1-based): linear warm-up from 0 over
    ``warmup_steps`` (Goyal et al. 2017, Sec. 2.2), then constant, or cosine decay from
    ``lr`` to ``min_lr`` at the last step (Loshchilov & Hutter 2017, Eq. 5)."""
    warmup = config.warmup_steps
    if k <= warmup:
        return config.lr * k / warmup
    if config.lr_schedule == "cosine":
        span = config.steps - warmup
        progress = min(1.0, (k - warmup) / span)
        return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))
    return config.lr


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where this torch and device have one (on CPU it
    is several times cheaper per step than the per-tensor loop)."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(model.parameters(), **kwargs)


FP16_DEVICES = ("cuda",)
"""Device types that train with ``precision: fp16`` (autocast with gradient scaling)."""


def _autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the forward pass's autocast context for ``precision`` on ``device``."""
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type not in FP16_DEVICES:
        raise DiffkitError(
            f"train.precision 'fp16' needs CUDA (it trains with gradient scaling there), but training runs on"
            f" {device.type}; use 'bf16' or 'fp32'"
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


class MetricsLog:
    """Rows of metrics appended to ``metrics.jsonl`` (one JSON object per line), and to
    TensorBoard event files in ``tensorboard/`` with ``train.log: tensorboard``."""

    def __init__(self, path: str | Path, tensorboard: str | Path | None = None) -> None:
        self.path = Path(path)
        self._tb_dir = Path(tensorboard) if tensorboard is not None else None
        if self._tb_dir is not None:
            _summary_writer_class()  # fail before training, not at the first row
        self._fh: Any = None
        self._tb: Any = None
        self._purge_step: int | None = None  # TensorBoard drops events from this step on (those of a rewound run)

    def rewind(self, step: int) -> list[dict[str, Any]]:
        """Drop the rows after ``step`` (those of a run that went on past its last
        checkpoint before it died) and return the rows kept."""
        if not self.path.is_file():
            return []
        kept = []
        lines = read_text(self.path).splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last row, cut short by the crash
                    continue
                row = None
            except RecursionError:
                row = None
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise DiffkitError(
                    f"{self.path} line {number} is not a row of metrics (a JSON object with an integer 'step'); the"
                    " file was edited or damaged: fix or delete that line, then resume"
                )
            if row["step"] <= step:
                kept.append(row)
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda p: p.write_text(text, encoding="utf-8"))
        self._purge_step = step + 1
        return kept

    def write(self, row: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run; closed by close())
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self._tb_dir is not None:
            if self._tb is None:
                self._tb = _summary_writer_class()(str(self._tb_dir), purge_step=self._purge_step)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DiffkitError(
            "train.log is 'tensorboard' but the tensorboard package is not installed; install it"
            " (pip install 'diffkit[tensorboard]') or set train.log to 'jsonl'"
        ) from None
    return SummaryWriter


@dataclass
class Outputs:
    """What a training run writes besides the weights it trains. Every process of a
    data-parallel job passes the same ``checkpoints`` (they take part in gathering the
    checkpoint's contents); only rank 0 writes, and only rank 0 gets ``metrics`` and
    ``on_sample``."""

    checkpoints: CheckpointDir | None = None
    metrics: MetricsLog | None = None
    checkpoint_tensors: dict[str, Tensor] = field(default_factory=dict)
    """Tensors saved in every checkpoint besides the training state (the data's standardisation)."""
    checkpoint_state: dict[str, Any] = field(default_factory=dict)
    """JSON saved in every checkpoint besides the training state (the spec)."""
    on_sample: Callable[[int], None] | None = None
    """Called with the step every ``train.sample_every`` steps, the EMA weights up to date."""
    say: Callable[[str], None] = field(default=lambda msg: print(f"diffkit: {msg}", file=sys.stderr))
    """Where notes for the user go (rank 0's stderr)."""


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    steps: int
    seconds: float
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)
    """What training each component's network with state of its own reported, by name
    (:meth:`diffkit.Pipeline.parts`), after the denoiser's."""
    effective_batch_size: int = 0
    """Examples per optimiser step over all processes: batch_size × grad_accum × processes."""
    resumed_from: int | None = None
    """The step of the checkpoint this run resumed from, if it did."""
    skipped: int = 0
    """Steps skipped for a non-finite loss (``train.skip_nonfinite``)."""


class NonFiniteLoss(DiffkitError):
    """The training loss became NaN or infinite; ``step`` is the first step it did."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def drop_labels(y: Tensor, p: float) -> Tensor:
    """Labels with each replaced by −1 ("no label") with probability ``p``, so that one
    network learns ε(x, y) and ε(x, ∅) (Ho & Salimans 2022, Alg. 1)."""
    if p <= 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, -1), y)


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_payload(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimiser's state as safetensors-ready tensors and JSON (no pickles)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Tensor], saved: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*_part(tensors, "optimizer.").items(), *saved["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """This process's global generators: torch's CPU one, and its CUDA device's or MPS's."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        out["mps"] = torch.mps.get_rng_state()
    return out


def _restore(
    resume: TrainingCheckpoint,
    online: nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
) -> None:
    """Load the weights, EMA, optimiser and gradient scaler of ``resume``."""
    saved = resume.state["train"]
    for prefix, module in (("online.", online), ("ema.", ema.model)):
        mismatch = state_dict_mismatch(module.state_dict(), _part(resume.tensors, prefix))
        if mismatch is not None:
            raise DiffkitError(
                f"{resume.path.with_suffix('.safetensors')} does not fit the network and optimiser this spec builds"
                f" ('{prefix}*': {mismatch}); the checkpoint is damaged or the denoiser's plugin changed: move"
                f" {resume.name}.* aside to resume from an earlier one, or start over with --force"
            )
    online.load_state_dict(_part(resume.tensors, "online."))
    ema.model.load_state_dict(_part(resume.tensors, "ema."))
    ema.updates = saved["ema_updates"]
    opt.load_state_dict(_optimizer_state(resume.tensors, saved["optimizer"]))
    for group in opt.param_groups:  # load_state_dict takes state of any shape; a step would fail on it
        for p in group["params"]:
            for name, value in opt.state.get(p, {}).items():
                want = () if name == "step" else p.shape
                if isinstance(value, Tensor) and value.shape != want:
                    shapes = f"{tuple(value.shape)} for a parameter of shape {tuple(want)}"
                    raise ValueError(f"optimizer state '{name}' has shape {shapes}")
    for group in opt.param_groups:  # a resumed run may have been allowed another lr or weight decay
        group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])


@contextmanager
def _checkpoint_fits(resume: TrainingCheckpoint) -> Iterator[None]:
    """Turn what torch raises on a checkpoint's tensors that do not fit this run (wrong
    shapes, dtypes or names, in a checkpoint whose JSON was rewritten to match) into one
    message naming the checkpoint."""
    try:
        yield
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        if "out of memory" in str(exc).lower():
            raise
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        first = (f"no tensor {text}" if isinstance(exc, KeyError) else text or type(exc).__name__)[:300]
        raise DiffkitError(
            f"{resume.path.with_suffix('.safetensors')} does not fit the network and optimiser this spec builds"
            f" ({first}); the checkpoint is damaged: move {resume.name}.* aside to resume from an earlier one, or"
            " start over with --force"
        ) from None


def _optimizer_step(
    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[nn.Parameter], clip: float | None
) -> None:
    """One update from the accumulated gradients: unscaled (fp16), clipped, applied, cleared."""
    if scaler is not None:
        scaler.unscale_(opt)
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _stop_message(value: float, bad: int, now: int, last: Path | None) -> str:
    found = f" (found at step {now})" if now != bad else ""
    if last is not None:
        keep = f"The last good checkpoint, {last.stem} in {last.parent}, is intact: resume from it after lowering"
    else:
        keep = "Nothing of this run was saved: lower"
    return (
        f"the training loss was {value} at step {bad}{found}; training stopped. {keep} train.lr, setting"
        " train.grad_clip, or letting train.skip_nonfinite skip such steps"
    )


def train(
    online: nn.Module,
    ema: EMA,
    objective: Objective,
    schedule: Schedule,
    data: Dataset,
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    transform: Callable[[Tensor], Tensor] | None = None,
    conditional: bool = False,
    outputs: Outputs | None = None,
    resume: TrainingCheckpoint | None = None,
    dist: DistContext | None = None,
    progress: bool = True,
    start_step: int = 0,
) -> TrainResult:
    """Train ``online`` until step ``config.steps``, updating ``ema`` after each step.

    Steps are numbered from ``start_step`` + 1 in metrics and checkpoints. With
    ``resume`` (a checkpoint of this same run), the weights, EMA, optimiser, gradient
    scaler, random generators and data position are restored from it and training
    continues after its step, exactly as if it had never stopped.
    """
    out = outputs or Outputs()
    dist = dist or DistContext(device=device)
    saved = resume.state["train"] if resume is not None else None
    done = saved["step"] - start_step if saved is not None else 0
    accum = config.grad_accum
    torch.manual_seed(seed if dist.rank == 0 else substream_seed(seed, "noise", dist.rank))
    stream = BatchStream(
        data,
        config.batch_size,
        seed,
        device,
        transform,
        rank=dist.rank,
        world_size=dist.world_size,
        start=saved["batches"] if saved is not None else 0,
        num_workers=config.num_workers,
    )
    online.train()
    opt = _adamw(online, config)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    cast = _autocast(config.precision, device)
    # The mean loss of each step since the last log row; kept on the device, read every log_every steps.
    losses = torch.zeros(config.log_every, device=device)
    window, skipped = 0, 0
    history: list[dict[str, Any]] = []
    last_checkpoint: Path | None = None
    if resume is not None and saved is not None:
        with _checkpoint_fits(resume):
            _restore(resume, online, ema, opt, scaler, config)
            window, skipped = saved["window"], saved["skipped"]
            kept = resume.tensors[f"losses.rank{dist.rank}"]
            if kept.shape != (window,) or window > config.log_every:
                name = f"losses.rank{dist.rank}"
                raise ValueError(f"{name} has shape {tuple(kept.shape)} for a window of {window} losses")
            losses[:window] = kept.to(device)
        last_checkpoint = resume.path
        if out.metrics is not None:
            history = out.metrics.rewind(saved["step"])
    model: nn.Module = online
    if dist.distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(online, device_ids=ids)
    if config.compile:  # the same parameters, run through torch.compile (falls back uncompiled, saying why)
        from diffkit.compiled import CompiledNetwork

        model = CompiledNetwork(model, "training")  # type: ignore[assignment]
    if resume is not None:  # last: nothing after this may draw from torch's generators before the loop
        with _checkpoint_fits(resume):
            torch.set_rng_state(resume.tensors[f"rng.rank{dist.rank}.cpu"])
            device_state = resume.tensors.get(f"rng.rank{dist.rank}.{device.type}")
            if device.type == "cuda" and device_state is not None:
                torch.cuda.set_rng_state(device_state, device)
            elif device.type == "mps" and device_state is not None:
                torch.mps.set_rng_state(device_state)
    params = [p for p in online.parameters() if p.requires_grad]
    constant_lr = config.warmup_steps == 0 and config.lr_schedule == "constant"
    every = config.checkpoint_every
    since, start = 0, time.perf_counter()
    last = start
    bar = tqdm(
        total=config.steps, initial=done, desc="train", unit="step", disable=not (progress and dist.is_writer),
        dynamic_ncols=True,
    )

    def checkpoint_payload(k: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything needed to continue after step ``k``; collective under data parallelism."""
        ema.sync()
        tensors = {f"online.{n}": v for n, v in online.state_dict().items()}
        tensors.update({f"ema.{n}": v for n, v in ema.model.state_dict().items()})
        opt_tensors, opt_state = _optimizer_payload(opt)
        tensors.update(opt_tensors)
        for name, value in _rng_state(device).items():
            for r, v in enumerate(dist.all_gather(value)):
                tensors[f"rng.rank{r}.{name}"] = v
        for r, v in enumerate(dist.all_gather(losses)):
            tensors[f"losses.rank{r}"] = v[:window]
        tensors.update(out.checkpoint_tensors)
        state = {
            "step": start_step + k,
            "batches": stream.position,
            "ema_updates": ema.updates,
            "window": window,
            "skipped": skipped,
            "world_size": dist.world_size,
            "optimizer": opt_state,
            "scaler": scaler.state_dict() if scaler is not None else None,
        }
        return tensors, {**out.checkpoint_state, "train": state}

    try:
        for k in range(done + 1, config.steps + 1):
            if not constant_lr:
                lr = learning_rate(k, config)
                for group in opt.param_groups:
                    group["lr"] = lr
            step_loss: Tensor | None = None
            for i in range(accum):
                x0, y = next(stream)
                cond = drop_labels(y, config.cond_drop_prob) if conditional else None
                # gradients are averaged across processes on the last pass of a step only
                sync = nullcontext() if i == accum - 1 or not dist.distributed else model.no_sync()  # type: ignore[operator]
                with sync:
                    with cast():
                        loss = objective.loss(model, schedule, x0, cond)
                    if accum > 1:
                        loss = loss / accum
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            assert step_loss is not None
            losses[window] = step_loss
            window += 1
            if config.skip_nonfinite and not math.isfinite(dist.all_sum(step_loss).item()):
                skipped += 1
                opt.zero_grad(set_to_none=True)
                if skipped > config.skip_nonfinite:
                    raise NonFiniteLoss(
                        _stop_message(step_loss.item(), start_step + k, start_step + k, last_checkpoint)
                        + f" (non-finite step {skipped}; train.skip_nonfinite skips {config.skip_nonfinite})",
                        start_step + k,
                    )
                out.say(f"step {start_step + k}: non-finite loss, step skipped ({skipped} of {config.skip_nonfinite})")
            else:
                _optimizer_step(opt, scaler, params, config.grad_clip)
                ema.update()
            since += 1
            bar.update(1)
            if out.on_sample is not None and config.sample_every and k % config.sample_every == 0:
                ema.sync()
                out.on_sample(start_step + k)
            save_now = out.checkpoints is not None and (k == config.steps or (every > 0 and k % every == 0))
            log_now = k % config.log_every == 0 or k == config.steps
            if not (save_now or log_now):
                continue
            # The one host sync of a window of steps: their losses, summed over processes.
            values = (dist.all_sum(losses[:window]) / dist.world_size).tolist()
            bad = [(j, v) for j, v in enumerate(values) if not math.isfinite(v)]
            if bad and not config.skip_nonfinite:
                j, v = bad[0]
                first = start_step + k - window + 1 + j
                raise NonFiniteLoss(_stop_message(v, first, start_step + k, last_checkpoint), first)
            if log_now:
                finite = [v for v in values if math.isfinite(v)]
                now = time.perf_counter()
                row = {
                    "step": start_step + k,
                    "loss": sum(finite) / len(finite) if finite else float("nan"),
                    "lr": opt.param_groups[0]["lr"],
                    "steps_per_s": since / (now - last),
                    "elapsed_s": now - start,
                }
                if skipped:
                    row["skipped_nonfinite"] = skipped
                history.append(row)
                if out.metrics is not None:
                    out.metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window, since, last = 0, 0, now
            if save_now:  # after the log row: a checkpoint at a log step holds an empty window
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    raise NonFiniteLoss(_stop_message(float("nan"), start_step + k, start_step + k, last_checkpoint), start_step + k)
                tensors, state = checkpoint_payload(k)
                if dist.is_writer:
                    assert out.checkpoints is not None
                    last_checkpoint = out.checkpoints.write(start_step + k, tensors, state)
    finally:
        bar.close()
        if out.metrics is not None:
            out.metrics.close()
    ema.sync()
    opt.zero_grad(set_to_none=True)  # no stale gradients left on the weights (nor their memory)
    online.eval()
    return TrainResult(
        config.steps,
        time.perf_counter() - start,
        history[-1]["loss"] if history else float("nan"),
        history,
        effective_batch_size=config.batch_size * accum * dist.world_size,
        resumed_from=saved["step"] if saved is not None else None,
        skipped=skipped,
    )
