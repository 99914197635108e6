"""The training loop: AdamW, gradient clipping, an EMA of the weights, metrics and a progress bar."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffkit.errors import DiffkitError
from diffkit.interfaces import Dataset, Objective, Schedule
from diffkit.spec import TrainConfig

__all__ = ["resolve_device", "batches", "EMA", "TrainResult", "train"]


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


@dataclass
class TrainResult:
    """What a call to :func:`train` did."""

    steps: int
    seconds: float
    final_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


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
    opt = torch.optim.AdamW(online.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
            loss = objective.loss(online, schedule, x0, y if conditional else None)
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
    online.eval()
    return TrainResult(config.steps, time.perf_counter() - start, history[-1]["loss"] if history else float("nan"), history)
