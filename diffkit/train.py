"""The training loops: the denoiser's (AdamW, gradient clipping, an EMA of the weights, metrics
and a progress bar, with labels dropped for classifier-free guidance), and that of the
noise-aware classifier of classifier guidance, with its accuracy as a function of t."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffkit.errors import DiffkitError
from diffkit.interfaces import Dataset, Objective, Schedule
from diffkit.spec import TrainConfig

__all__ = [
    "resolve_device",
    "batches",
    "EMA",
    "TrainResult",
    "train",
    "drop_labels",
    "ClassifierResult",
    "train_classifier",
    "classifier_accuracy",
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


def batches(
    data: Dataset,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    transform: Any = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """An endless stream of shuffled ``(x, y)`` batches, epoch after epoch.

    In-memory data is indexed directly on the device (no DataLoader overhead per
    step); other datasets go through a DataLoader.
    """
    tensors = data.tensors()
    if tensors is not None:
        x, y = (t.to(device) for t in tensors)
        if transform is not None:
            x = transform(x)
        n = x.shape[0]
        if batch_size > n:
            raise DiffkitError(f"train.batch_size ({batch_size}) exceeds the dataset's {n} examples; lower it")
        while True:
            perm = torch.randperm(n, generator=generator).to(device)
            for i in range(0, n - batch_size + 1, batch_size):
                idx = perm[i : i + batch_size]
                yield x[idx], y[idx]
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    if len(loader) == 0:
        raise DiffkitError(f"train.batch_size ({batch_size}) exceeds the dataset's {len(data)} examples; lower it")
    while True:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            yield (transform(x) if transform is not None else x), y.to(device, non_blocking=True)


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ with warm-up d_k = min(d, (1 + k)/(10 + k))
    (the averaging of Ho et al. 2020, App. B; warm-up as in Tarvainen & Valpola 2017)."""

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
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._dst, self._src, 1.0 - d)
        for b_ema, b in self._bufs:
            b_ema.copy_(b)
        self.updates += 1


def _adamw(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, with the fused kernel where this torch and device have one (on CPU it
    is several times cheaper per step than the per-tensor loop)."""
    kwargs = {"lr": config.lr, "weight_decay": config.weight_decay}
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.AdamW(model.parameters(), **kwargs)


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    steps: int
    seconds: float
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)
    classifier: ClassifierResult | None = None
    """The training of classifier guidance's classifier, where the pipeline has one."""


def drop_labels(y: Tensor, p: float) -> Tensor:
    """Labels with each replaced by −1 ("no label") with probability ``p``, so that one
    network learns ε(x, y) and ε(x, ∅) (Ho & Salimans 2022, Alg. 1)."""
    if p <= 0:
        return y
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, -1), y)


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
    transform: Any = None,
    conditional: bool = False,
    metrics_path: Path | None = None,
    progress: bool = True,
    start_step: int = 0,
) -> TrainResult:
    """Train ``online`` for ``config.steps`` steps, updating ``ema`` after each."""
    torch.manual_seed(seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    online.train()
    opt = _adamw(online, config)
    warmup = config.warmup_steps
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup)) if warmup > 0 else None
    )
    params = [p for p in online.parameters() if p.requires_grad]
    stream = batches(data, config.batch_size, generator, device, transform)
    history: list[dict[str, Any]] = []
    metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path is not None else None
    loss_sum = torch.zeros((), device=device)
    since = 0
    start = last = time.perf_counter()
    bar = tqdm(total=config.steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(1, config.steps + 1):
            x0, y = next(stream)
            loss = objective.loss(online, schedule, x0, drop_labels(y, config.cond_drop_prob) if conditional else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            ema.update()
            loss_sum += loss.detach()
            since += 1
            if k % config.log_every == 0 or k == config.steps:
                mean = (loss_sum / since).item()  # the one host sync, every log_every steps
                if not torch.isfinite(torch.tensor(mean)):
                    raise DiffkitError(
                        f"the training loss became {mean} by step {start_step + k}; lower train.lr or"
                        " set train.grad_clip. Nothing was saved from this run"
                    )
                now = time.perf_counter()
                row = {
                    "step": start_step + k,
                    "loss": mean,
                    "lr": opt.param_groups[0]["lr"],
                    "steps_per_s": since / (now - last),
                    "elapsed_s": now - start,
                }
                history.append(row)
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{mean:.4f}")
                loss_sum.zero_()
                since, last = 0, now
            bar.update(1)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    opt.zero_grad(set_to_none=True)  # no stale gradients left on the weights (nor their memory)
    online.eval()
    return TrainResult(config.steps, time.perf_counter() - start, history[-1]["loss"] if history else float("nan"), history)


# -- the noise-aware classifier of classifier guidance ---------------------------------------------
@dataclass
class ClassifierResult:
    """What a call to :func:`train_classifier` did, and the classifier's accuracy by t."""

    steps: int
    seconds: float
    final_loss: float
    accuracy: list[dict[str, Any]]
    """One row per band of timesteps: ``{"t_from", "t_to", "accuracy", "n"}`` (t_to exclusive)."""
    evaluated_on: str
    """``"held-out"`` (examples kept out of the classifier's training) or ``"training"``."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """The accuracy by t as two aligned lines, for a terminal."""
        heads = [f"{r['t_from']}–{r['t_to'] - 1}" for r in self.accuracy]
        cells = [f"{r['accuracy']:.0%}" for r in self.accuracy]
        widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
        return (
            "  t    " + "  ".join(h.rjust(w) for h, w in zip(heads, widths)) + "\n"
            "  acc  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        )


def classifier_loss(classifier: nn.Module, schedule: Schedule, x0: Tensor, y: Tensor) -> Tensor:
    """E_{t, ε} −log p_φ(y | x_t, t), t uniform over the T steps, x_t ~ q(x_t | x_0)
    (the noised training of Dhariwal & Nichol 2021, Sec. 4)."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), device=x0.device)
    x_t = schedule.q_sample(x0, t, torch.randn_like(x0))
    return F.cross_entropy(classifier(x_t, t), y)


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module,
    schedule: Schedule,
    x0: Tensor,
    y: Tensor,
    *,
    bands: int = 10,
    draws: int = 1000,
    seed: int = 0,
    batch_size: int = 1024,
) -> list[dict[str, Any]]:
    """Accuracy of argmax p_φ(y | x_t, t) on labelled data ``(x0, y)`` noised in each of
    ``bands`` equal bands of timesteps: at least ``draws`` noisings per band (the data
    repeated with fresh ε and t drawn uniformly in the band)."""
    classifier.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = schedule.T
    edges = torch.linspace(0, T, bands + 1).round().long().tolist()
    reps = max(1, -(-draws // x0.shape[0]))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi <= lo:
            continue
        correct, n = 0, 0
        for _ in range(reps):
            for i in range(0, x0.shape[0], batch_size):
                xb, yb = x0[i : i + batch_size], y[i : i + batch_size]
                t = torch.randint(lo, hi, (xb.shape[0],), generator=g).to(xb.device)
                eps = torch.randn(xb.shape, generator=g).to(device=xb.device, dtype=xb.dtype)
                pred = classifier(schedule.q_sample(xb, t, eps), t).argmax(dim=-1)
                correct += int((pred == yb).sum())
                n += xb.shape[0]
        rows.append({"t_from": lo, "t_to": hi, "accuracy": correct / n, "n": n})
    return rows


def train_classifier(
    classifier: nn.Module,
    schedule: Schedule,
    data: Dataset,
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    transform: Any = None,
    held_out: tuple[Tensor, Tensor] | None = None,
    metrics_path: Path | None = None,
    progress: bool = True,
    start_step: int = 0,
) -> ClassifierResult:
    """Train the noise-aware classifier p_φ(y | x_t, t) for ``config.steps`` steps of AdamW
    on noised labelled data, then measure its accuracy by t on ``held_out`` (in the data's
    own coordinates; ``transform`` maps them to model space) or, without it, on the data."""
    torch.manual_seed(seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    classifier.to(device).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    params = [p for p in classifier.parameters() if p.requires_grad]
    stream = batches(data, config.batch_size, generator, device, transform)
    history: list[dict[str, Any]] = []
    metrics = open(metrics_path, "a", encoding="utf-8") if metrics_path is not None else None
    loss_sum = torch.zeros((), device=device)
    since = 0
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc="classifier", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(1, config.steps + 1):
            x0, y = next(stream)
            if (y < 0).any():
                raise DiffkitError("classifier guidance needs every training example labelled; this data has unlabelled ones")
            loss = classifier_loss(classifier, schedule, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            loss_sum += loss.detach()
            since += 1
            if k % config.log_every == 0 or k == config.steps:
                mean = (loss_sum / since).item()
                if not torch.isfinite(torch.tensor(mean)):
                    raise DiffkitError(
                        f"the classifier's training loss became {mean} by step {start_step + k}; lower its lr"
                        " (sampler.guidance.lr) or set train.grad_clip"
                    )
                row = {"step": start_step + k, "loss": mean, "elapsed_s": time.perf_counter() - start}
                history.append(row)
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{mean:.4f}")
                loss_sum.zero_()
                since = 0
            bar.update(1)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - start
    opt.zero_grad(set_to_none=True)
    classifier.eval()
    if held_out is not None:
        x_eval, y_eval, where = held_out[0], held_out[1], "held-out"
    else:
        tensors = data.tensors()
        if tensors is None:
            xs, ys = zip(*(data[i] for i in range(min(len(data), 2000))))
            tensors = (torch.stack(xs), torch.stack(ys))
        x_eval, y_eval, where = tensors[0][:5000], tensors[1][:5000], "training"
    x_eval, y_eval = x_eval.to(device), y_eval.to(device)
    if transform is not None:
        x_eval = transform(x_eval)
    accuracy = classifier_accuracy(classifier, schedule, x_eval, y_eval, seed=seed)
    final = history[-1]["loss"] if history else float("nan")
    return ClassifierResult(config.steps, seconds, final, accuracy, where, history)
