#!/usr/bin/env python3
"""Benchmarks of score matching, the Langevin samplers and the variational bound.

    python benchmarks/bench_score.py                       # full run (timings in benchmarks/README.md)
    python benchmarks/bench_score.py --quick               # a smoke run of every section
    python benchmarks/bench_score.py --digits-run runs/digits   # judge an existing digits run

1. Quality: examples/moons-score-sgld.yaml (objective ``score``) trained fully, then
   5,000 samples from ``sgld`` and from ``pc`` with their default settings (and from
   ``ddpm`` on the same network, for reference). Sliced Wasserstein-2 to fresh moons
   draws against the noise floor between two fresh draws, exactly as
   benchmarks/bench_spine.py measures it. Goal: at most 2× the floor.
2. The variational bound of that moons model on 2,000 fresh points, in bits/dim in
   the data's own coordinates (``diffkit evaluate``).
3. The variational bound of the digits model (examples/digits.yaml, ε objective, the
   spine's) on the 359 held-out test digits, in bits/dim, with its terms; optionally
   (``--score-digits``) the same U-Net trained with the score objective beside it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import diffkit
from diffkit.likelihood import variational_bound
from diffkit.metrics import sliced_wasserstein
from diffkit.pipeline import SPEC_FILE, Pipeline

ROOT = Path(__file__).resolve().parent.parent
GOAL_SW_RATIO = 2.0
N_SAMPLES = 5000


def fresh_moons(n: int, seed: int, noise: float) -> torch.Tensor:
    return diffkit.build("data", {"type": "moons", "n": n, "seed": seed, "noise": noise}).tensors()[0]


def load_spec(name: str, **train: Any) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "examples" / name).read_text())
    spec["train"] = {**spec.get("train", {}), **train}
    return spec


def print_bound(label: str, r: dict[str, Any]) -> None:
    t = r["terms"]
    extra = f"   jacobian {t['jacobian']:+.4f}" if "jacobian" in t else ""
    levels = f", {r['levels']} levels" if r["levels"] else ""
    print(
        f"{label:<34} {r['bpd']:8.4f} ± {r['bpd_se']:.4f} bits/dim   L_T {t['L_T']:.4f}   ΣL_t-1 {t['L_sum']:.4f}"
        f"   L_0 {t['L_0']:+.4f}{extra}   [n {r['n']}, {r['timesteps']} t/example, σ²={r['variance']}{levels}]"
    )


# -- 1 and 2: moons ---------------------------------------------------------------------------
def bench_moons(args: argparse.Namespace) -> dict[str, Any]:
    steps = 300 if args.quick else None
    spec = load_spec("moons-score-sgld.yaml", **({"steps": steps} if steps else {}))
    n, refs = (1000, 2) if args.quick else (N_SAMPLES, 5)
    note = "  (--quick: shortened, not comparable with the goal)" if args.quick else ""
    print(f"\n== 1. Quality: moons, objective score, {spec['train']['steps']} training steps, {n} samples{note} ==")
    pipe = Pipeline.from_spec(spec)
    t0 = time.perf_counter()
    pipe.fit(progress=False)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    noise = spec["data"].get("noise", 0.05)
    references = [(fresh_moons(n, 10_000 + 2 * i, noise), fresh_moons(n, 10_001 + 2 * i, noise)) for i in range(refs)]
    floor = statistics.median(sliced_wasserstein(b, a, seed=i) for i, (a, b) in enumerate(references))
    print(f"noise floor SW2(fresh, fresh), median of {refs}: {floor:.4f}")
    out: dict[str, Any] = {"floor": floor, "steps": spec["train"]["steps"]}
    samplers = {"sgld": {"type": "sgld"}, "pc": {"type": "pc"}, "ddpm (reference)": {"type": "ddpm"}}
    for name, section in samplers.items():
        t0 = time.perf_counter()
        x = pipe.sample(n, seed=12345, sampler=section)
        seconds = time.perf_counter() - t0
        sw = statistics.median(sliced_wasserstein(x, a, seed=i) for i, (a, _) in enumerate(references))
        ratio = sw / floor
        verdict = ("PASS" if ratio <= GOAL_SW_RATIO else "MISS") if "reference" not in name else ""
        print(f"{name:<18} SW2 {sw:.4f}   ratio {ratio:.2f}   goal <= {GOAL_SW_RATIO:.1f}x {verdict:4}   sampling {seconds:.0f} s")
        out[name] = {"sw": sw, "ratio": ratio, "seconds": seconds}

    m = 500 if args.quick else 2000
    print(f"\n== 2. Variational bound of that moons model on {m} fresh points (data coordinates) ==")
    x = fresh_moons(m, 20_000, noise)
    t0 = time.perf_counter()
    r = variational_bound(pipe, x, timesteps=50 if args.quick else None, seed=0)
    print_bound("moons, score objective", r)
    print(f"({time.perf_counter() - t0:.0f} s)")
    out["bound"] = {k: r[k] for k in ("bpd", "bpd_se", "terms")}
    return out


# -- 3: digits ------------------------------------------------------------------------------
def digits_pipeline(args: argparse.Namespace, objective: str) -> tuple[Pipeline, str]:
    if objective == "epsilon" and args.digits_run:
        run = Path(args.digits_run)
        if not (run / SPEC_FILE).is_file():
            raise SystemExit(f"{run} is not a finished run (no {SPEC_FILE})")
        pipe = Pipeline.load(run)
        return pipe, f"{run} ({pipe.steps_trained} steps)"
    steps = 50 if args.quick else args.digits_steps
    spec = load_spec("digits.yaml", **({"steps": steps} if steps else {}), preview=0)
    spec["objective"] = {"type": objective}
    pipe = Pipeline.from_spec(spec)
    t0 = time.perf_counter()
    pipe.fit(progress=not args.no_progress)
    return pipe, f"examples/digits.yaml, objective {objective}, trained here ({pipe.steps_trained} steps, {time.perf_counter() - t0:.0f} s)"


def bench_digits(args: argparse.Namespace) -> dict[str, Any]:
    test = diffkit.build("data", {"type": "digits", "split": "test"}).tensors()[0]
    if args.quick:
        test = test[:32]
    print(f"\n== 3. Variational bound of the digits model on the {test.shape[0]} held-out test digits ==")
    out: dict[str, Any] = {}
    for objective in ("epsilon", "score") if args.score_digits else ("epsilon",):
        pipe, source = digits_pipeline(args, objective)
        print(f"model: {source}")
        full = None if not args.quick else 20
        t0 = time.perf_counter()
        r = variational_bound(pipe, test, timesteps=full, seed=0, progress=not args.no_progress)
        print_bound(f"digits, {objective}", r)
        print(f"({time.perf_counter() - t0:.0f} s)")
        out[objective] = {k: r[k] for k in ("bpd", "bpd_se", "terms", "levels")}
        # Variants, each from 100 stratified timesteps per example (unbiased, noisier):
        for kwargs in ({"variance": "posterior"}, {"levels": 256}):
            v = variational_bound(pipe, test, timesteps=20 if args.quick else 100, seed=1, **kwargs)
            print_bound(f"  … {', '.join(f'{k}={w}' for k, w in kwargs.items())}", v)
            out[f"{objective}:{kwargs}"] = v["bpd"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run of every section (numbers not comparable)")
    ap.add_argument("--only", default="123", help="which sections to run, e.g. '3' (default: all)")
    ap.add_argument("--digits-run", help="bound of this trained digits run instead of training examples/digits.yaml")
    ap.add_argument("--digits-steps", type=int, help="train the digits model(s) for this many steps instead of the spec's")
    ap.add_argument("--score-digits", action="store_true", help="also train examples/digits.yaml with objective: score")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"diffkit {diffkit.__version__}, torch {torch.__version__}, python {platform.python_version()},"
        f" torch threads {torch.get_num_threads()}, mode {'quick' if args.quick else 'full'}"
    )
    start = time.perf_counter()
    if "1" in args.only or "2" in args.only:
        bench_moons(args)
    if "3" in args.only:
        bench_digits(args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
