"""Noise-aware classifiers p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4),
and their training.

Each is called ``classifier(x, c) -> logits [batch, classes]`` with the input the
process gives a network at t (x = c_in(t)·x_t and c the process's conditioning value:
the integer timestep of a discrete table, a scaled time or log σ of a continuous
process), so one classifier serves every process: an MLP for points and flattened data,
and for images the downsampling half of the U-Net (the same residual blocks, conditioned
on c through AdaGN) followed by global average pooling, as Dhariwal & Nichol's is.

:func:`train_classifier` trains one on noised labelled data with t drawn as the process
draws it for training, and measures its accuracy by noise level on held-out data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffkit_plugins.unet import Downsample, ResBlock
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffkit.errors import DiffkitError
from diffkit.interfaces import Dataset
from diffkit.nn import SinusoidalEmbedding
from diffkit.process import Process, expand_like
from diffkit.spec import TrainConfig
from diffkit.train import BatchStream

__all__ = [
    "MLPClassifier",
    "EncoderClassifier",
    "noisy_classifier",
    "classifier_logits",
    "classifier_loss",
    "classifier_accuracy",
    "train_classifier",
    "ClassifierResult",
]


class _Block(nn.Module):
    """LayerNorm → Linear (+ time embedding) → SiLU → Linear, with a residual connection."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(e)))


class MLPClassifier(nn.Module):
    """Logits of p_φ(y | x_t, t) for data of any shape, flattened to a vector: a residual
    MLP with the sinusoidal time embedding added inside every block."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Linear(math.prod(sample_shape), width)
        self.time = SinusoidalEmbedding(64, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        e = F.silu(self.time(t))
        h = self.inp(rearrange(x_t, "b ... -> b (...)"))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h)


class EncoderClassifier(nn.Module):
    """Logits of p_φ(y | x_t, t) for images ``[B, C, H, W]``: the U-Net's downsampling path
    (residual blocks with AdaGN time conditioning, width × 2^min(level, 2) channels, halving the
    resolution between levels), then GroupNorm, SiLU, global average pooling and a linear
    layer (Dhariwal & Nichol 2021, Sec. 4, with mean pooling in place of attention pooling)."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        channels = sample_shape[0]
        emb_dim = 4 * width
        groups = max(g for g in range(1, min(32, width) + 1) if width % g == 0)
        self.num_classes = num_classes
        self.time = SinusoidalEmbedding(width, emb_dim)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.down = nn.ModuleList()
        ch = width
        for level in range(depth):
            out = width * 2 ** min(level, 2)
            self.blocks.append(ResBlock(ch, out, emb_dim, 0.0, groups))
            ch = out
            self.down.append(Downsample(ch) if level < depth - 1 else nn.Identity())
        self.head = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU())
        self.out = nn.Linear(ch, num_classes)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        e = self.time(t)
        h = self.inp(x_t)
        for block, down in zip(self.blocks, self.down):
            h = down(block(h, e))
        return self.out(self.head(h).mean(dim=(-2, -1)))


def noisy_classifier(
    sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int, data_kind: str = "points"
) -> nn.Module:
    """The classifier that suits the data: the convolutional encoder for images
    ``(C, H, W)``, the MLP for everything else."""
    if data_kind == "images" and len(sample_shape) == 3:
        return EncoderClassifier(tuple(sample_shape), num_classes, width, depth)
    return MLPClassifier(tuple(sample_shape), num_classes, width, depth)


# -- training ----------------------------------------------------------------------------------
def classifier_logits(classifier: nn.Module, process: Process, x_t: Tensor, t: Tensor) -> Tensor:
    """log p_φ(· | x_t, t) up to a constant: the classifier at the input the process gives a
    network at t (c_in(t)·x_t and the conditioning value c(t))."""
    c_in = process.input_scale(t)
    x = x_t if c_in is None else expand_like(c_in.to(device=x_t.device, dtype=x_t.dtype), x_t) * x_t
    return classifier(x, process.conditioning(t).to(x_t.device))


def classifier_loss(classifier: nn.Module, process: Process, x0: Tensor, y: Tensor) -> Tensor:
    """E_{t, ε} −log p_φ(y | x_t, t), t drawn as the process draws it for training, x_t ~ q(x_t | x_0)
    (the noised training of Dhariwal & Nichol 2021, Sec. 4)."""
    t = process.sample_t(x0.shape[0], device=x0.device)
    x_t = process.q_sample(x0, t, torch.randn_like(x0))
    return F.cross_entropy(classifier_logits(classifier, process, x_t, t), y)


@dataclass
class ClassifierResult:
    """What a call to :func:`train_classifier` did, and the classifier's accuracy by t."""

    steps: int
    seconds: float
    final_loss: float
    accuracy: list[dict[str, Any]]
    """One row per band of t: ``{"t_from", "t_to", "accuracy", "n"}`` (t_to exclusive)."""
    evaluated_on: str
    """``"held-out"`` (examples kept out of the classifier's training) or ``"training"``."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """The accuracy by t as two aligned lines, for a terminal."""

        def show(v: float) -> str:
            return f"{int(v)}" if float(v).is_integer() else f"{v:.3g}"

        heads = [
            f"{show(r['t_from'])}–{show(r['t_to'] - 1)}" if isinstance(r["t_to"], int) else f"{show(r['t_from'])}–{show(r['t_to'])}"
            for r in self.accuracy
        ]
        cells = [f"{r['accuracy']:.0%}" for r in self.accuracy]
        widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
        return (
            "  t    " + "  ".join(h.rjust(w) for h, w in zip(heads, widths)) + "\n"
            "  acc  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths))
        )

    def __str__(self) -> str:
        n = self.accuracy[0]["n"] if self.accuracy else 0
        return (
            f"classifier p_φ(y | x_t, t): {self.steps} steps in {self.seconds:.1f} s, final loss {self.final_loss:.4f};"
            f" accuracy on {n} noisings of {self.evaluated_on} examples per band of t:\n{self.table()}"
        )


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module,
    process: Process,
    x0: Tensor,
    y: Tensor,
    *,
    bands: int = 10,
    draws: int = 1000,
    seed: int = 0,
    batch_size: int = 1024,
) -> list[dict[str, Any]]:
    """Accuracy of argmax p_φ(y | x_t, t) on labelled data ``(x0, y)`` noised in each of
    ``bands`` equal bands of t over [t_min, t_max] (integer timesteps on a discrete table):
    at least ``draws`` noisings per band (the data repeated with fresh ε and t uniform in the band)."""
    classifier.eval()
    g = torch.Generator(device="cpu").manual_seed(seed)
    discrete = bool(getattr(process, "discrete", False))
    if discrete:
        edges: list[Any] = torch.linspace(0, process.T, bands + 1).round().long().tolist()
    else:
        edges = torch.linspace(float(process.t_min), float(process.t_max), bands + 1, dtype=torch.float64).tolist()
    reps = max(1, -(-draws // x0.shape[0]))
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi <= lo:
            continue
        correct, n = 0, 0
        for _ in range(reps):
            for i in range(0, x0.shape[0], batch_size):
                xb, yb = x0[i : i + batch_size], y[i : i + batch_size]
                if discrete:
                    t = torch.randint(lo, hi, (xb.shape[0],), generator=g).to(xb.device)
                else:
                    t = (lo + (hi - lo) * torch.rand(xb.shape[0], generator=g, dtype=torch.float64)).to(xb.device)
                eps = torch.randn(xb.shape, generator=g).to(device=xb.device, dtype=xb.dtype)
                pred = classifier_logits(classifier, process, process.q_sample(xb, t, eps), t).argmax(dim=-1)
                correct += int((pred == yb).sum())
                n += xb.shape[0]
        rows.append({"t_from": lo, "t_to": hi, "accuracy": correct / n, "n": n})
    return rows


def train_classifier(
    classifier: nn.Module,
    process: Process,
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
    own coordinates; ``transform`` maps them to model space) or, without it, on the data.
    Every random draw comes from ``seed``: the same call gives the same weights."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _train(classifier, process, data, config, seed, device, transform, held_out, metrics_path, progress, start_step)


def _train(
    classifier: nn.Module,
    process: Process,
    data: Dataset,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    transform: Any,
    held_out: tuple[Tensor, Tensor] | None,
    metrics_path: Path | None,
    progress: bool,
    start_step: int,
) -> ClassifierResult:
    classifier.to(device).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    params = [p for p in classifier.parameters() if p.requires_grad]
    stream = BatchStream(data, config.batch_size, seed, device, transform, num_workers=config.num_workers)
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
            loss = classifier_loss(classifier, process, x0, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            loss_sum += loss.detach()
            since += 1
            if k % config.log_every == 0 or k == config.steps:
                mean = (loss_sum / since).item()
                if not math.isfinite(mean):
                    raise DiffkitError(
                        f"the classifier's training loss became {mean} by step {start_step + k}; lower its lr"
                        " (guidance.lr) or set train.grad_clip"
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
            tensors = (torch.stack(xs), torch.as_tensor([int(v) for v in ys]))
        x_eval, y_eval, where = tensors[0][:5000], tensors[1][:5000], "training"
    x_eval, y_eval = x_eval.to(device), y_eval.to(device)
    if transform is not None:
        x_eval = transform(x_eval)
    accuracy = classifier_accuracy(classifier, process, x_eval, y_eval, seed=seed)
    final = history[-1]["loss"] if history else float("nan")
    return ClassifierResult(config.steps, seconds, final, accuracy, where, history)
