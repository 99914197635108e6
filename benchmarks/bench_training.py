#!/usr/bin/env python3
"""Training throughput of ``Pipeline.fit`` against a raw PyTorch loop, and DDP scaling.

    python benchmarks/bench_training.py            # full run (~10 min on 2 shared CPU cores)
    python benchmarks/bench_training.py --quick    # fewer steps and rounds: checks that it runs
    python benchmarks/bench_training.py --only 1   # only the throughput section

1. Throughput. ``pipe.fit(steps=K, progress=False, **features)`` against a raw loop on a
   fresh copy of the same network with the same features, in four configurations: the
   default (fp32, EMA), without EMA (``ema_decay: 0`` against a loop with no EMA), bf16
   autocast (timed over K/4 steps: on a CPU without bf16 arithmetic it is ~8x slower
   than fp32, for both), and 4-way gradient accumulation (4 × 128 examples per step). A fifth row
   times ``fit`` writing a checkpoint every 100 steps and metrics.jsonl, against the
   same raw loop (which writes nothing): the cost of surviving a crash.
2. DDP scaling. ``diffkit train`` under ``torchrun --standalone --nproc_per_node=N`` for
   N = 1 and 2, the same per-process batch (so 2 processes take twice the examples per
   step); steps/s and examples/s from the training time ``diffkit train`` reports
   (process start-up excluded). The machine has 2 cores: 2 processes share them with
   each other (and with everything else running), so this measures the overhead of
   the gradient all-reduce more than any speed-up.

Contenders run alternately in one process (the order flips every round) and medians
are reported; torch runs one intra-op thread (``--threads``), as in bench_spine.py.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import diffkit
from diffkit.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spine import alternate, med, paired_ratio, verdict

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "examples" / "moons.yaml"
GOAL_TRAIN = 0.95  # fit / raw loop, steps per second, at least

FULL = {"K": 300, "rounds": 7, "ddp_steps": 400, "ddp_rounds": 3}
QUICK = {"K": 60, "rounds": 3, "ddp_steps": 100, "ddp_rounds": 1}

# name -> (overrides of fit, raw loop options, share of K timed): bf16 runs ~8x slower than fp32
# on CPUs without native bf16 arithmetic, so it is timed over fewer steps
CONFIGS: dict[str, tuple[dict[str, Any], dict[str, Any], float]] = {
    "fp32 + EMA (default)": ({}, {}, 1.0),
    "fp32, no EMA": ({"ema_decay": 0.0}, {"ema": False}, 1.0),
    "bf16 autocast + EMA": ({"precision": "bf16"}, {"bf16": True}, 0.25),
    "accumulate 4 × 128 + EMA": ({"grad_accum": 4, "batch_size": 128}, {"accum": 4, "batch": 128}, 1.0),
    "fp32 + EMA, checkpoint every 100 + metrics": ({"checkpoint_every": 100}, {}, 1.0),
}


class RawLoop:
    """The training step written directly in PyTorch: random batches from the standardised
    in-memory data, uniform t, q_sample, MSE on ε (Ho et al. 2020, Alg. 1), AdamW (fused where
    available, as diffkit's), grad-norm clipping, optionally bf16 autocast, gradient
    accumulation and an EMA by ``torch._foreach_lerp_`` with diffkit's warm-up; the
    running loss read back every 50 steps."""

    def __init__(
        self, net: nn.Module, x: Tensor, pipe: Pipeline, *, ema: bool = True, bf16: bool = False, accum: int = 1,
        batch: int | None = None, seed: int = 0,
    ) -> None:
        c = pipe.train_config
        self.net, self.x = net, x
        self.batch, self.accum = batch or c.batch_size, accum
        try:
            self.opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.clip, self.decay = c.grad_clip, c.ema_decay
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.ema = copy.deepcopy(net).requires_grad_(False) if ema else None
        self.src = [p.data for p in net.parameters()]
        self.dst = [p.data for p in self.ema.parameters()] if self.ema is not None else []
        abar = pipe.schedule.alphas_cumprod
        self.T = abar.numel()
        self.sqrt_abar = abar.sqrt().float()
        self.sqrt_1m_abar = (1.0 - abar).sqrt().float()
        self.cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
        self.g = torch.Generator().manual_seed(seed)
        self.updates = 0

    def run(self, steps: int) -> float:
        net, opt, g, x, B = self.net, self.opt, self.g, self.x, self.batch
        net.train()
        loss_sum, last = torch.zeros(()), float("nan")
        for k in range(1, steps + 1):
            for _ in range(self.accum):
                x0 = x[torch.randint(0, x.shape[0], (B,), generator=g)]
                t = torch.randint(0, self.T, (B,), generator=g)
                eps = torch.randn(x0.shape, generator=g)
                x_t = self.sqrt_abar[t, None] * x0 + self.sqrt_1m_abar[t, None] * eps
                with self.cast():
                    loss = F.mse_loss(net(x_t, t), eps)
                if self.accum > 1:
                    loss = loss / self.accum
                loss.backward()
                loss_sum += loss.detach()
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.ema is not None:
                d = min(self.decay, (1 + self.updates) / (10 + self.updates))
                with torch.no_grad():
                    torch._foreach_lerp_(self.dst, self.src, 1.0 - d)
            self.updates += 1
            if k % 50 == 0 or k == steps:
                last = (loss_sum / 50).item()
                loss_sum.zero_()
        net.eval()
        return last


def _fitter(pipe: Pipeline, K: int, overrides: dict[str, Any], tmp: Path) -> Callable[[], Any]:
    """``pipe.fit`` of K steps with ``overrides``; with checkpoints, into a fresh run
    directory per call (each call is a new run)."""
    calls = iter(range(10**6))

    def fit() -> Any:
        out = tmp / str(next(calls)) if "checkpoint_every" in overrides else None
        return pipe.fit(steps=K, progress=False, out=out, **overrides)

    return fit


def bench_throughput(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    rounds = cfg["rounds"]
    print("\n== 1. Throughput: pipe.fit(steps=K) vs a raw PyTorch loop, same network and features ==")
    rows = []
    spec = yaml.safe_load(SPEC_PATH.read_text())
    for name, (overrides, raw_opts, share) in CONFIGS.items():
        K = max(10, round(cfg["K"] * share))
        pipe = Pipeline.from_spec(spec)
        x = pipe.dataset.tensors()[0].double()
        x_std = ((x - x.mean(0)) / x.std(0).clamp_min(1e-8)).float()
        raw = RawLoop(copy.deepcopy(pipe.denoiser), x_std, pipe, seed=1, **raw_opts)
        with tempfile.TemporaryDirectory() as tmp:
            fit = _fitter(pipe, K, overrides, Path(tmp))
            fit()  # fits the standardisation; the timed calls continue training from there
            times = alternate({"pipe": fit, "raw": lambda: raw.run(K)}, rounds=rounds)  # noqa: B023 (called at once)
        p_sps, r_sps = K / med(times["pipe"]), K / med(times["raw"])
        ratio, pr = p_sps / r_sps, paired_ratio(times["raw"], times["pipe"])
        print(
            f"{name:<44} K={K:<4} fit {p_sps:6.1f} steps/s   raw {r_sps:6.1f} steps/s   ratio fit/raw {ratio:.3f}"
            f" (paired {pr:.3f})   goal >= {GOAL_TRAIN:.2f}x  {verdict(ratio >= GOAL_TRAIN)}"
        )
        rows.append({"name": name, "K": K, "pipe": p_sps, "raw": r_sps, "ratio": ratio, "paired": pr})
    return rows


def _torchrun(n: int, spec: Path, out: Path) -> float:
    """Seconds of training (as `diffkit train` reports them) of one run on ``n`` processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
        "--no-python", "diffkit", "train", str(spec), "--out", str(out), "--no-progress", "--force",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    m = re.search(r"trained \d+ steps in ([\d.]+) s", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"torchrun with {n} processes failed:\n{proc.stderr[-2000:]}")
    return float(m.group(1))


def bench_ddp(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    steps, rounds = cfg["ddp_steps"], cfg["ddp_rounds"]
    print(f"\n== 2. DDP on gloo: 1 vs 2 processes, {steps} steps of batch 512 per process (2 cores, shared) ==")
    spec = yaml.safe_load(SPEC_PATH.read_text())
    spec["train"] = {**spec["train"], "steps": steps, "preview": 0, "device": "cpu", "checkpoint_every": 0}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        seconds: dict[int, list[float]] = {1: [], 2: []}
        for r in range(rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                seconds[n].append(_torchrun(n, path, Path(tmp) / f"run{n}"))
    for n in (1, 2):
        s = med(seconds[n])
        rows.append({"n": n, "sps": steps / s, "eps": steps * 512 * n / s})
        print(f"{n} process{'es' if n > 1 else '  '}: {steps / s:6.1f} steps/s   {steps * 512 * n / s:9.0f} examples/s")
    print(f"examples/s, 2 processes / 1: {rows[1]['eps'] / rows[0]['eps']:.2f}x (ideal on 2 free cores: 2x)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--only", default="12", help="which sections to run, e.g. '1' (default: both)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1; 0: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    print(
        f"diffkit {diffkit.__version__}, torch {torch.__version__}, python {platform.python_version()},"
        f" {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, mode {'quick' if args.quick else 'full'}"
    )
    start = time.perf_counter()
    if "1" in args.only:
        bench_throughput(cfg)
    if "2" in args.only:
        bench_ddp(cfg)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
