#!/usr/bin/env python3
"""Sampling speed: ``pipe.sample`` against loops written by hand over the same network.

    python benchmarks/bench_sampling.py           # ddpm and heun, batch 64 and 4096 (~10 min here)
    python benchmarks/bench_sampling.py --quick   # fewer rounds and steps: checks that it runs
    python benchmarks/bench_sampling.py --compiled  # only compiled sampling (compile time, cached start, speed)
    python benchmarks/bench_sampling.py --rows heun # one section (ddpm, heun, compiled)
    python benchmarks/bench_sampling.py --rows heun --parts  # and the cost of the bound and of per-sample noise

Two contenders per row, over the *same* network object, alternated round by round (A B,
B A, ...) after a warm-up; medians and the paired median of per-round ratios are printed.
The timed calls run in the steady state, the garbage collector running as in use
(``--collect``: a full collection before every timed call, which leaves the caches cold
for the milliseconds after it; see bench_spine.alternate).

- ``ddpm``: examples/moons.yaml (linear table, T = 1000, the residual MLP, ε-objective)
  against Ho et al. 2020, Alg. 2 written plainly with ``torch.randn`` (bench_spine's loop).
- ``heun``: examples/moons-edm.yaml (EDM process and preconditioning, 18 steps on the
  karras grid, 35 evaluations) against Karras et al. 2022, Alg. 1 written plainly:
  D(x; σ) = c_skip x + c_out F(c_in x, c_noise), d = (x − D)/σ, an Euler step and the
  trapezoidal correction except on the last step.

``pipe.sample`` runs with every option at its default: per-sample noise (diffkit.noise),
the x̂_0 bound ('auto'), the progress machinery switched off as the API default has it.
Before timing, each pair is checked to compute the same samples from the same noise
(``noise="batch"``, ``clip_denoised: null``). Goals: pipe/hand ≤ 1.10 at batch 64 and
≤ 1.03 at batch 4096. The network is then replaced by ``zeros_like`` to report the
loop's own cost per network evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spine import NullNet, alternate, make_hand_ddpm, med, paired_ratio, verdict  # noqa: E402

from diffkit.pipeline import Pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GOALS = {64: 1.10, 4096: 1.03}


def load_spec(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


def make_hand_heun(pipe: Pipeline, net: nn.Module, steps: int = 18) -> Any:
    """Karras et al. 2022, Alg. 1 over ``net`` with EDM's preconditioning (Table 1)."""
    proc = pipe.schedule
    sd = pipe.objective.sigma_data
    rho = proc.rho
    smin, smax = float(proc.t_min), float(proc.t_max)
    i = torch.arange(steps, dtype=torch.float64)
    sig = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho  # Eq. 5
    sigmas = sig.tolist() + [0.0]
    shape = pipe.context.sample_shape
    mean, std = pipe.data_mean, pipe.data_std
    prior_std = proc.prior_std()

    def D(x: Tensor, s: float) -> Tensor:
        c_skip = sd * sd / (s * s + sd * sd)
        c_out = s * sd / math.sqrt(s * s + sd * sd)
        c_in = 1 / math.sqrt(s * s + sd * sd)
        c_noise = torch.full((x.shape[0],), 250.0 * math.log(s))
        return c_skip * x + c_out * net(c_in * x, c_noise)

    def sample(n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            x = torch.randn((n, *shape), generator=g) * prior_std
            for k in range(steps):
                s, s_next = sigmas[k], sigmas[k + 1]
                d = (x - D(x, s)) / s
                x_next = x + (s_next - s) * d
                if s_next > 0:
                    d2 = (x_next - D(x_next, s_next)) / s_next
                    x_next = x + (s_next - s) * 0.5 * (d + d2)
                x = x_next
            return x * std + mean

    return sample


def fitted(spec: dict[str, Any], steps: int) -> Pipeline:
    spec = {**spec, "train": {**spec.get("train", {}), "steps": steps, "preview": 0, "device": "cpu"}}
    pipe = Pipeline.from_spec(spec)
    pipe.fit(progress=False)
    return pipe


def bench(
    name: str, pipe: Pipeline, hand: Any, evals: int, rounds: int, sampler: dict[str, Any], collect: bool = False
) -> dict[str, Any]:
    a = pipe.sample(256, seed=7, sampler={**sampler, "clip_denoised": None}, noise="batch")
    b = hand(256, 7)
    print(f"\n== {name}: {evals} network evaluations per sample ==")
    print(f"same arithmetic: max |pipe - hand| over 256 samples from the same noise = {(a - b).abs().max():.2e}")
    out: dict[str, Any] = {}
    for n, goal in GOALS.items():
        times = alternate({"pipe": lambda: pipe.sample(n, seed=1), "hand": lambda: hand(n, 1)}, rounds=rounds, collect=collect)
        p, h = med(times["pipe"]) / evals * 1e3, med(times["hand"]) / evals * 1e3
        ratio, pr = p / h, paired_ratio(times["pipe"], times["hand"])
        print(
            f"batch {n:>4}: pipe {p:7.3f} ms/eval   hand {h:7.3f} ms/eval   pipe/hand {ratio:.3f}"
            f" (paired {pr:.3f})   goal <= {goal:.2f}  {verdict(pr <= goal)}   [{rounds} rounds]"
        )
        out[n] = dict(pipe_ms=p, hand_ms=h, ratio=ratio, paired=pr)
    real = pipe.denoiser
    null = NullNet()
    pipe.denoiser = null
    hand_null = (make_hand_ddpm if name == "ddpm" else make_hand_heun)(pipe, null)
    try:
        times = alternate(
            {"pipe": lambda: pipe.sample(64, seed=1), "hand": lambda: hand_null(64, 1)}, rounds=rounds, collect=collect
        )
        p, h = med(times["pipe"]) / evals * 1e6, med(times["hand"]) / evals * 1e6
        print(f"the loop alone (network -> zeros_like), batch 64: pipe {p:6.1f} us/eval   hand {h:6.1f} us/eval")
        out["null"] = dict(pipe_us=p, hand_us=h)
    finally:
        pipe.denoiser = real
    return out


def bench_parts(name: str, pipe: Pipeline, hand: Any, sampler: dict[str, Any], rounds: int, collect: bool) -> None:
    """Where ``pipe.sample``'s extra time at batch 64 goes: the default against the hand loop,
    then without the x̂_0 bound, with batch noise (``torch.randn`` from one generator instead
    of per-sample streams), and without either."""
    variants = {
        "every option at its default": {},
        "clip_denoised: null": {"sampler": {**sampler, "clip_denoised": None}},
        'noise="batch"': {"noise": "batch"},
        'both': {"sampler": {**sampler, "clip_denoised": None}, "noise": "batch"},
    }
    print(f"\n== {name}, batch 64: pipe.sample / hand loop with parts of the defaults switched off ==")
    for label, options in variants.items():
        times = alternate(
            {"pipe": lambda o=options: pipe.sample(64, seed=1, **o), "hand": lambda: hand(64, 1)}, rounds=rounds, collect=collect
        )
        print(f"{label:30s} {paired_ratio(times['pipe'], times['hand']):.3f}   [{rounds} rounds]", flush=True)


def first_call(compiled: bool) -> float:
    """Seconds of the first ``sample`` call of a fresh pipeline (compiled: compilation included)."""
    pipe = fitted(load_spec("moons.yaml"), 1)
    t0 = time.perf_counter()
    pipe.sample(64, seed=0, sampler={"type": "ddpm", "steps": 10}, compile=compiled)
    return time.perf_counter() - t0


def bench_compiled(rounds: int) -> None:
    """Compiled sampling of the moons MLP at batch 64 against the eager hand loop: compile
    time in this process (cold cache), then in a fresh process (warm cache), then the time per step."""
    print("\n== compiled sampling (torch.compile), moons MLP, ddpm, batch 64 ==")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--first-call"]
        cold = float(subprocess.run(cmd + ["compiled"], env=env, capture_output=True, text=True, check=True).stdout)
        warm = float(subprocess.run(cmd + ["compiled"], env=env, capture_output=True, text=True, check=True).stdout)
        eager = float(subprocess.run(cmd + ["eager"], env=env, capture_output=True, text=True, check=True).stdout)
    print(f"first call, 10 steps: eager {eager:.2f} s   compiled, empty cache {cold:.1f} s   compiled, cached {warm:.1f} s")
    pipe = fitted(load_spec("moons.yaml"), 100)
    hand = make_hand_ddpm(pipe, pipe.denoiser)
    T = pipe.schedule.T
    pipe.sample(64, seed=0, compile=True)
    times = alternate(
        {"compiled": lambda: pipe.sample(64, seed=1, compile=True), "hand": lambda: hand(64, 1)}, rounds=rounds
    )
    c, h = med(times["compiled"]) / T * 1e3, med(times["hand"]) / T * 1e3
    speedup = 1 / paired_ratio(times["compiled"], times["hand"])
    print(
        f"per step: compiled pipe {c:.3f} ms   eager hand {h:.3f} ms   speed-up {h / c:.2f}x (paired {speedup:.2f}x)"
        f"   goal >= 2x  {verdict(speedup >= 2)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, T = 100: checks that it runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    parser.add_argument("--compiled", action="store_true", help="only the compiled-sampling section")
    parser.add_argument("--rows", default="ddpm,heun,compiled", help="sections, comma-separated (default: ddpm,heun,compiled)")
    parser.add_argument(
        "--collect",
        action="store_true",
        help="a full garbage collection before every timed call (cold caches after it; default: the steady state)",
    )
    parser.add_argument(
        "--parts", action="store_true", help="after each row, the ratio at batch 64 with the bound and per-sample noise switched off"
    )
    parser.add_argument("--first-call", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.first_call:
        print(first_call(args.first_call == "compiled"))
        return 0
    rounds = 3 if args.quick else 7
    if args.compiled:
        bench_compiled(rounds)
        return 0
    timing = "a full garbage collection before each timed call" if args.collect else "steady state"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); timing: {timing}")
    spec = load_spec("moons.yaml")
    if args.quick:
        spec["schedule"] = {**spec["schedule"], "timesteps": 100}
    rows = set(args.rows.split(","))
    if "ddpm" in rows:
        pipe = fitted(spec, 100)
        bench("ddpm", pipe, make_hand_ddpm(pipe, pipe.denoiser), pipe.schedule.T, rounds, {"type": "ddpm"}, args.collect)
        if args.parts:
            bench_parts("ddpm", pipe, make_hand_ddpm(pipe, pipe.denoiser), {"type": "ddpm"}, rounds, args.collect)
    if "heun" in rows:
        edm = fitted(load_spec("moons-edm.yaml"), 100)
        bench("heun", edm, make_hand_heun(edm, edm.denoiser), 35, rounds * 3, {"type": "heun", "steps": 18}, args.collect)
        if args.parts:
            bench_parts("heun", edm, make_hand_heun(edm, edm.denoiser), {"type": "heun", "steps": 18}, rounds * 4, args.collect)
    if "compiled" in rows:
        bench_compiled(rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
