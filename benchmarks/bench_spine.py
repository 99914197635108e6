#!/usr/bin/env python3
"""Benchmarks of diffkit's spine: sampling overhead, training throughput, sample quality.

    python benchmarks/bench_spine.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/bench_spine.py --quick    # about a minute; same three sections, smaller T

1. Sampling overhead: ``pipe.sample(n, seed=...)`` against a hand-written DDPM loop
   (Ho et al. 2020, Alg. 2) over the *same* network, at batch 64 and 4096.
2. Training throughput: ``pipe.fit(steps=K)`` against a raw PyTorch loop with the
   same features (AdamW, grad-norm clip, EMA with ``torch._foreach_lerp_``, MSE on ε).
3. Quality: the default moons spec trained fully, its sliced Wasserstein-2 distance
   to fresh moons draws, against the noise floor between two fresh draws.

Contenders are always timed alternately in one process (the order flips every round,
A B / B A / ...), and medians are reported: the machine this was written on has two
shared CPU cores, so single timings mean little and only ratios are worth quoting.
torch runs one intra-op thread unless ``--threads`` says otherwise (0: torch's choice):
both contenders of every comparison run the same network on the same threads, so the
ratios do not depend on it, and one thread does not stall when a neighbour takes a core.
See benchmarks/README.md for the results of a full run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import diffkit
from diffkit.metrics import sliced_wasserstein
from diffkit.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "examples" / "moons.yaml"

GOAL_SAMPLE_64 = 1.10  # pipe / hand, ms per step, at most
GOAL_SAMPLE_4096 = 1.03
GOAL_TRAIN = 0.95  # pipe.fit / raw loop, steps per second, at least
GOAL_TRAIN_WALL_S = 60.0  # full 3000-step training of the moons spec, at most
GOAL_SW_RATIO = 1.5  # SW2(model, fresh) / SW2(fresh, fresh), at most
DIFFUSERS_DDPM_OVERHEAD_US = 210.0  # diffusers' DDPMScheduler.step overhead per step (quoted, not measured)


# -- configuration ---------------------------------------------------------------------
FULL = dict(
    T=1000,  # diffusion steps of the sampling benchmark
    fit_steps_for_sampling=300,  # speed does not depend on quality
    rounds_64=9,
    rounds_4096=5,
    rounds_null=9,
    train_K=400,  # steps per timed fit() call
    rounds_train=7,
    quality_T=None,  # None: the spec's own (1000)
    quality_steps=None,  # None: the spec's own (3000)
    quality_refs=9,
)
QUICK = dict(
    T=100,
    fit_steps_for_sampling=100,
    rounds_64=3,
    rounds_4096=3,
    rounds_null=3,
    train_K=100,
    rounds_train=3,
    quality_T=100,
    quality_steps=600,
    quality_refs=5,
)


def moons_spec(timesteps: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """examples/moons.yaml as a dict, with the schedule's T and the training steps optionally overridden."""
    spec = yaml.safe_load(SPEC_PATH.read_text())
    if timesteps is not None:
        spec["schedule"] = {**spec["schedule"], "timesteps": timesteps}
    if steps is not None:
        spec["train"] = {**spec["train"], "steps": steps}
    return spec


# -- timing ----------------------------------------------------------------------------
def alternate(
    contenders: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, collect: bool = True
) -> dict[str, list[float]]:
    """Seconds per call of each contender, called in turn ``rounds`` times after ``warmup``
    untimed rounds; the order of the contenders flips every round (A B, B A, ...).

    ``collect``: a full garbage collection before every timed call (no collection lands
    inside one). For calls of a few milliseconds it is not neutral: a full collection walks
    every Python object of the process and leaves the caches cold, which the first
    milliseconds after it pay in proportion to the Python objects a contender touches.
    ``collect=False`` collects once after the warm-up and then times the steady state, the
    garbage collector running as it does in use."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    if not collect:
        gc.collect()
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if collect:
                gc.collect()
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i: robust to load that drifts between rounds."""
    return med([x / y for x, y in zip(a, b)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# -- 1. sampling overhead --------------------------------------------------------------
def make_hand_ddpm(pipe: Pipeline, net: nn.Module) -> Callable[[int, int], Tensor]:
    """Ho et al. 2020, Alg. 2 written plainly over ``net``, with the posterior variance
    β̃_t as σ_t² and no noise on the last step; returns samples in data coordinates."""
    schedule = pipe.schedule
    T = schedule.T
    betas = schedule.betas.tolist()
    alphas = schedule.alphas.tolist()
    alphas_cumprod = schedule.alphas_cumprod.tolist()
    sigmas = schedule.posterior_variance.sqrt().tolist()
    shape = pipe.context.sample_shape
    mean, std = pipe.data_mean, pipe.data_std

    def sample(n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            x = torch.randn((n, *shape), generator=g)
            for t in reversed(range(T)):
                eps = net(x, torch.full((n,), t))
                x = (x - betas[t] / math.sqrt(1.0 - alphas_cumprod[t]) * eps) / math.sqrt(alphas[t])
                if t > 0:
                    x = x + sigmas[t] * torch.randn(x.shape, generator=g)
            return x * std + mean

    return sample


class NullNet(nn.Module):
    """A denoiser that costs (almost) nothing: isolates the sampler's own per-step cost."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return torch.zeros_like(x_t)


def bench_sampling(cfg: dict[str, Any]) -> dict[str, Any]:
    T = cfg["T"]
    print(f"\n== 1. Sampling overhead: pipe.sample vs hand-written DDPM (Alg. 2), T = {T} ==")
    pipe = Pipeline.from_spec(moons_spec(timesteps=T))
    t0 = time.perf_counter()
    pipe.fit(steps=cfg["fit_steps_for_sampling"], progress=False)
    print(f"fitted {cfg['fit_steps_for_sampling']} steps in {time.perf_counter() - t0:.1f} s (speed does not depend on quality)")
    hand = make_hand_ddpm(pipe, pipe.denoiser)

    # The two do the same arithmetic on the same random numbers: check it before timing.
    a, b = pipe.sample(256, seed=7), hand(256, 7)
    diff = (a - b).abs().max().item()
    print(f"sanity: max |pipe - hand| over 256 samples with one seed = {diff:.2e}")

    out: dict[str, Any] = {"T": T, "same_samples_maxdiff": diff}
    for n, rounds, goal in ((64, cfg["rounds_64"], GOAL_SAMPLE_64), (4096, cfg["rounds_4096"], GOAL_SAMPLE_4096)):
        times = alternate(
            {"pipe": lambda: pipe.sample(n, seed=1), "hand": lambda: hand(n, 1)}, rounds=rounds
        )
        p_ms, h_ms = med(times["pipe"]) / T * 1e3, med(times["hand"]) / T * 1e3
        ratio, pr = p_ms / h_ms, paired_ratio(times["pipe"], times["hand"])
        print(
            f"batch {n:>4}: pipe {p_ms:7.3f} ms/step   hand {h_ms:7.3f} ms/step   ratio pipe/hand {ratio:.3f}"
            f" (paired median {pr:.3f})   goal <= {goal:.2f}x  {verdict(ratio <= goal)}   [{rounds} rounds]"
        )
        out[n] = dict(pipe_ms=p_ms, hand_ms=h_ms, ratio=ratio, paired=pr, goal=goal, rounds=rounds)

    # The sampler's own cost per step, the network taken out (a zeros-returning stand-in).
    null = NullNet()
    hand_null = make_hand_ddpm(pipe, null)
    real = pipe.denoiser
    pipe.denoiser = null
    try:
        for n in (64, 4096):
            times = alternate(
                {"pipe": lambda: pipe.sample(n, seed=1), "hand": lambda: hand_null(n, 1)}, rounds=cfg["rounds_null"]
            )
            p_us, h_us = med(times["pipe"]) / T * 1e6, med(times["hand"]) / T * 1e6
            print(
                f"sampler loop alone (network replaced by zeros_like), batch {n:>4}: pipe {p_us:6.1f} us/step"
                f"   hand {h_us:6.1f} us/step   (diffusers DDPMScheduler: ~{DIFFUSERS_DDPM_OVERHEAD_US:.0f} us/step overhead)"
            )
            out[f"null_{n}"] = dict(pipe_us=p_us, hand_us=h_us)
    finally:
        pipe.denoiser = real
    return out


# -- 2. training throughput ------------------------------------------------------------
class RawLoop:
    """The training loop written directly in PyTorch with the features of ``diffkit.train``:
    AdamW, grad-norm clipping, an EMA by ``torch._foreach_lerp_`` with the same warm-up,
    random batches from an in-memory standardised tensor, uniform t, q_sample and MSE on ε,
    and the running loss read back every 50 steps."""

    def __init__(self, net: nn.Module, x: Tensor, pipe: Pipeline, seed: int = 0) -> None:
        c = pipe.train_config
        self.net, self.x, self.batch = net, x, c.batch_size
        self.opt = torch.optim.AdamW(net.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        self.clip, self.decay = c.grad_clip, c.ema_decay
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.src = [p.data for p in net.parameters()]
        self.dst = [p.data for p in self.ema.parameters()]
        abar = pipe.schedule.alphas_cumprod
        self.T = abar.numel()
        self.sqrt_abar = abar.sqrt().float()
        self.sqrt_1m_abar = (1.0 - abar).sqrt().float()
        self.g = torch.Generator().manual_seed(seed)
        self.updates = 0

    def run(self, steps: int) -> float:
        net, opt, g, x, B = self.net, self.opt, self.g, self.x, self.batch
        net.train()
        loss_sum, since, last = torch.zeros(()), 0, float("nan")
        for k in range(1, steps + 1):
            x0 = x[torch.randint(0, x.shape[0], (B,), generator=g)]
            t = torch.randint(0, self.T, (B,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            x_t = self.sqrt_abar[t, None] * x0 + self.sqrt_1m_abar[t, None] * eps
            loss = F.mse_loss(net(x_t, t), eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            opt.step()
            d = min(self.decay, (1 + self.updates) / (10 + self.updates))
            with torch.no_grad():
                torch._foreach_lerp_(self.dst, self.src, 1.0 - d)
            self.updates += 1
            loss_sum += loss.detach()
            since += 1
            if k % 50 == 0 or k == steps:
                last = (loss_sum / since).item()
                loss_sum.zero_()
                since = 0
        net.eval()
        return last


def bench_training(cfg: dict[str, Any]) -> dict[str, Any]:
    K, rounds = cfg["train_K"], cfg["rounds_train"]
    print(f"\n== 2. Training throughput: pipe.fit(steps={K}) vs a raw PyTorch loop ==")
    pipe = Pipeline.from_spec(moons_spec())
    net = copy.deepcopy(pipe.denoiser)  # a fresh copy of the same (untrained) network
    x = pipe.dataset.tensors()[0].double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x_std = ((x - mean) / std).float()
    raw = RawLoop(net, x_std, pipe, seed=1)
    times = alternate({"pipe": lambda: pipe.fit(steps=K, progress=False), "raw": lambda: raw.run(K)}, rounds=rounds)
    p_sps, r_sps = K / med(times["pipe"]), K / med(times["raw"])
    ratio = p_sps / r_sps
    pr = paired_ratio(times["raw"], times["pipe"])  # (K/pipe) / (K/raw) per round
    print(
        f"batch {pipe.train_config.batch_size}: pipe.fit {p_sps:6.1f} steps/s   raw {r_sps:6.1f} steps/s"
        f"   ratio pipe/raw {ratio:.3f} (paired median {pr:.3f})   goal >= {GOAL_TRAIN:.2f}x  {verdict(ratio >= GOAL_TRAIN)}"
        f"   [{rounds} rounds of {K} steps]"
    )
    return dict(pipe_sps=p_sps, raw_sps=r_sps, ratio=ratio, paired=pr, K=K, rounds=rounds)


# -- 3. quality ------------------------------------------------------------------------
def fresh_moons(n: int, seed: int, noise: float) -> Tensor:
    return diffkit.build("data", {"type": "moons", "n": n, "seed": seed, "noise": noise}).tensors()[0]


def bench_quality(cfg: dict[str, Any], quick: bool) -> dict[str, Any]:
    spec = moons_spec(timesteps=cfg["quality_T"], steps=cfg["quality_steps"])
    steps, T, n = spec["train"]["steps"], spec["schedule"]["timesteps"], 5000
    note = "  (--quick: shortened, not comparable with the goals)" if quick else ""
    print(f"\n== 3. Quality: moons spec, {steps} training steps, T = {T}, {n} samples{note} ==")
    pipe = Pipeline.from_spec(spec)
    t0 = time.perf_counter()
    pipe.fit(progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = pipe.sample(n, seed=12345)
    sample_s = time.perf_counter() - t0
    # The training data is drawn with the spec's seed; every reference here uses others.
    noise = spec["data"].get("noise", 0.05)
    assert spec["seed"] not in range(10_000, 10_000 + 2 * cfg["quality_refs"])
    model_sw, floor_sw, ratios = [], [], []
    for i in range(cfg["quality_refs"]):
        ref, ref2 = fresh_moons(n, 10_000 + 2 * i, noise), fresh_moons(n, 10_001 + 2 * i, noise)
        m, f = sliced_wasserstein(samples, ref, seed=i), sliced_wasserstein(ref2, ref, seed=i)
        model_sw.append(m)
        floor_sw.append(f)
        ratios.append(m / f)
    ratio = med(ratios)
    print(f"training wall time {train_s:.1f} s   goal < {GOAL_TRAIN_WALL_S:.0f} s  {verdict(train_s < GOAL_TRAIN_WALL_S)}")
    print(f"sampling {n} points: {sample_s:.1f} s")
    print(f"SW2(model, fresh)  per reference: {', '.join(f'{v:.4f}' for v in model_sw)}   median {med(model_sw):.4f}")
    print(f"SW2(fresh, fresh)  per reference: {', '.join(f'{v:.4f}' for v in floor_sw)}   median {med(floor_sw):.4f}")
    print(f"ratio model/floor  per reference: {', '.join(f'{v:.2f}' for v in ratios)}   median {ratio:.2f}"
          f"   goal <= {GOAL_SW_RATIO:.1f}x  {verdict(ratio <= GOAL_SW_RATIO)}")
    return dict(
        steps=steps, T=T, train_s=train_s, sample_s=sample_s, sw=med(model_sw), floor=med(floor_sw), ratio=ratio,
        refs=cfg["quality_refs"],
    )


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, T = 100, short training: about a minute")
    ap.add_argument("--only", default="123", help="which sections to run, e.g. '13' (default: all three)")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1; 0 keeps torch's own choice). On a shared machine two threads"
        " stall whenever another process holds a core, which made single timings 3-20x slower and erratic",
    )
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    torch.manual_seed(0)
    print(
        f"diffkit {diffkit.__version__}, torch {torch.__version__}, python {platform.python_version()},"
        f" {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()},"
        f" mode {'quick' if args.quick else 'full'}"
    )
    start = time.perf_counter()
    s = bench_sampling(cfg) if "1" in args.only else None
    tr = bench_training(cfg) if "2" in args.only else None
    q = bench_quality(cfg, args.quick) if "3" in args.only else None

    rows = []
    if s is not None:
        for n in (64, 4096):
            r = s[n]
            rows.append((f"sample, batch {n}, T={s['T']}", f"pipe {r['pipe_ms']:.3f} / hand {r['hand_ms']:.3f} ms/step",
                         f"{r['ratio']:.3f}x", f"<= {r['goal']:.2f}x", verdict(r["ratio"] <= r["goal"])))
        for n in (64, 4096):
            r = s[f"null_{n}"]
            rows.append((f"sampler loop alone, batch {n}", f"pipe {r['pipe_us']:.1f} / hand {r['hand_us']:.1f} us/step",
                         f"{r['pipe_us'] / r['hand_us']:.3f}x", f"(diffusers ~{DIFFUSERS_DDPM_OVERHEAD_US:.0f} us)", ""))
    if tr is not None:
        rows.append((f"train, {tr['K']} steps/call", f"fit {tr['pipe_sps']:.1f} / raw {tr['raw_sps']:.1f} steps/s",
                     f"{tr['ratio']:.3f}x", f">= {GOAL_TRAIN:.2f}x", verdict(tr["ratio"] >= GOAL_TRAIN)))
    if q is not None:
        rows.append((f"train {q['steps']} steps (T={q['T']})", f"{q['train_s']:.1f} s wall", "",
                     f"< {GOAL_TRAIN_WALL_S:.0f} s", verdict(q["train_s"] < GOAL_TRAIN_WALL_S)))
        rows.append((f"SW2 model/floor (median of {q['refs']})", f"{q['sw']:.4f} / {q['floor']:.4f}",
                     f"{q['ratio']:.2f}x", f"<= {GOAL_SW_RATIO:.1f}x", verdict(q["ratio"] <= GOAL_SW_RATIO)))
    head = ("benchmark", "result", "ratio", "goal", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    print(f"\n== Summary ({'quick: shortened, not comparable with the goals' if args.quick else 'full'};"
          f" total {time.perf_counter() - start:.0f} s) ==")
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
