"""Quality per network evaluation, and the applications on real digits.

    python benchmarks/bench_steps.py                      # everything (about 1 h 20 min on one CPU core)
    python benchmarks/bench_steps.py --quick              # a smoke run of every section
    python benchmarks/bench_steps.py --digits-run runs/digits   # judge an existing digits run

1. Two moons: sliced Wasserstein-2 (diffkit.metrics) between 20,000 samples and fresh
   draws of the data, against the number of steps (= network evaluations) of ``ddpm``,
   ``ddim`` (η = 0) and ``dpm-solver``, each the mean over seeds of samples and of
   fresh data draws. Two networks, each trained once: examples/moons.yaml (ε) and
   examples/moons-ddim.yaml (v), and the exact denoiser of a mixture along the moons
   (its yardstick: exact draws from the mixture). At 20 steps the ODE samplers also
   run with the ``quadratic`` and ``logsnr`` spacings. Goal: at 20 steps, ddim and
   dpm-solver within 1.25× of 1000-step DDPM's distance (ratios paired by seed, each
   pair scored against the same data draw). Plot: docs/images/moons-steps.png.
2. Digits: the right half (4 of 8 columns) of held-out real digits is erased and
   inpainted; a classifier trained on real digits (benchmarks/common.py) judges
   whether the result shows the digit it was. Goal: ≥ 70 %. The half-erased input and
   the real digits themselves are judged beside it. Also ILVR from 4×4 and SDEdit.
   Pictures: docs/images/digits-{inpaint,upscale,denoise}.png.

Runs are trained into runs/bench-steps/ on first use and reused afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffkit  # noqa: E402
from common import DigitsJudge  # noqa: E402
from diffkit import applications as A  # noqa: E402
from diffkit.metrics import sliced_wasserstein  # noqa: E402
from diffkit.oracles import GaussianMixture  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "bench-steps"
IMAGES = ROOT / "docs" / "images"
SAMPLERS = ("ddpm", "ddim", "dpm-solver")


def pictures(args: argparse.Namespace) -> Path:
    """docs/images for a full run; a quick run's pictures stay in runs/."""
    return RUNS / "quick-pictures" if args.quick else IMAGES


def trained(spec: Path, out: Path, steps: int | None) -> diffkit.Pipeline:
    if (out / "spec.yaml").is_file():
        print(f"using the trained run {out}")
        return diffkit.Pipeline.load(out)
    pipe = diffkit.Pipeline.from_spec(spec)
    start = time.perf_counter()
    pipe.fit(progress=False, **({"steps": steps} if steps else {}))
    pipe.save(out)
    print(f"trained {spec.name} for {pipe.steps_trained} steps in {time.perf_counter() - start:.0f} s -> {out}")
    return pipe


# -- 1. moons: distance against steps --------------------------------------------------------
class MixtureDenoiser(nn.Module):
    """The exact ε̂ of a Gaussian mixture, as a pipeline's network."""

    def __init__(self, mixture: GaussianMixture, schedule: diffkit.Schedule) -> None:
        super().__init__()
        self.predict = mixture.predict(schedule)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(x_t, t)


MOONS_STD = 0.05  # the data's noise: each mixture component's standard deviation


def moons_means() -> torch.Tensor:
    """200 points spaced π/99 apart along the two half circles of two moons, in data coordinates."""
    theta = torch.linspace(0, math.pi, 100, dtype=torch.float64)
    upper = torch.stack([theta.cos(), theta.sin()], dim=1)
    lower = torch.stack([1 - theta.cos(), 0.5 - theta.sin()], dim=1)
    return torch.cat([upper, lower])


def moons_oracle() -> diffkit.Pipeline:
    """Two moons as 200 Gaussians of std 0.05 centred on :func:`moons_means`, with the
    exact denoiser: what the samplers do with no network error. On examples/moons.yaml's
    linear schedule."""
    mixture = GaussianMixture(moons_means(), MOONS_STD)
    schedule = diffkit.build("schedule", "linear", timesteps=1000)
    return diffkit.Pipeline(schedule=schedule, denoiser=MixtureDenoiser(mixture, schedule), shape=(2,))


def mixture_draws(n: int, seed: int) -> torch.Tensor:
    """Exact draws from the mixture of :func:`moons_oracle`: what a perfect sampler of it returns."""
    g = torch.Generator().manual_seed(seed)
    means = moons_means()
    picked = means[torch.randint(0, len(means), (n,), generator=g)]
    return (picked + MOONS_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)).float()


def moons(args: argparse.Namespace) -> dict[str, Any]:
    registry = diffkit.get_registry()
    n = 1000 if args.quick else args.n
    seeds = range(1 if args.quick else args.seeds)
    grid = [5, 10, 20] if args.quick else [5, 10, 20, 50, 200]
    reference_steps = 20 if args.quick else 1000  # DDPM's, the yardstick
    train_steps = 100 if args.quick else None
    fresh = {k: registry.build("data", {"type": "moons", "n": n, "seed": 1000 + k}).x for k in seeds}
    floors = [sliced_wasserstein(registry.build("data", {"type": "moons", "n": n, "seed": 2000 + k}).x, fresh[k]) for k in seeds]
    floor = statistics.mean(floors)
    print(
        f"\nmoons: SW2 of {n} samples to fresh data, mean ± standard error over {len(seeds)} seeds"
        f" (sample seed k against data seed 1000 + k); two fresh draws: {floor:.4f} ± {_se(floors):.4f}"
    )
    results: dict[str, Any] = {"n": n, "seeds": len(seeds), "floor": floor, "floor_se": _se(floors), "models": {}}

    def distances(pipe: diffkit.Pipeline, sampler: dict[str, Any], steps: int, m: int) -> list[float]:
        return [
            sliced_wasserstein(pipe.sample(m, seed=k, sampler=sampler, steps=steps, progress=False), fresh[k][:m])
            for k in seeds
        ]

    def show(label: str, name: str, steps: int, d: list[float], seconds: float) -> None:
        print(f"  {label:<15} {name:<22} {steps:>5} steps  SW2 {statistics.mean(d):.4f} ± {_se(d):.4f}  ({seconds:.0f} s)", flush=True)

    # The ε-network (examples/moons.yaml) needs x̂_0 clipped for the deterministic samplers:
    # its MLP's output is bounded (a LayerNorm before the last layer), so ε̂ cannot grow with
    # x_t beyond the few training points at |x_T| > 4, and a deterministic path started out
    # there runs away (an SDE's fresh noise hides it). ±3 is outside the standardised data.
    # The exact denoiser's yardstick is exact draws from its mixture, not a sampler: its
    # 1000-step DDPM would take longer than the rest of the section together. Its 200
    # components make each step slow, so it samples (and draws) at most 5,000 points.
    models: list[tuple[str, Any, dict[str, Any]]] = [
        ("exact denoiser (mixture along the moons; n ≤ 5,000)", moons_oracle, {}),
        ("ε-network (moons.yaml), x̂0 clipped to ±3", "moons.yaml", {"clip_denoised": 3.0}),
        ("v-network (moons-ddim.yaml)", "moons-ddim.yaml", {}),
    ]
    for label, source, extra in models:
        short = label.split(" (")[0]
        oracle = callable(source)
        m = min(n, 5000) if oracle else n
        if oracle:
            pipe = source()
        else:
            pipe = trained(ROOT / "examples" / source, RUNS / (("quick-" if args.quick else "") + Path(source).stem), train_steps)
        table: dict[str, dict[int, list[float]]] = {}
        model_grid = [s for s in grid if s <= 50] if oracle else grid
        for name in SAMPLERS:
            table[name] = {}
            for steps in sorted(set(model_grid) | ({reference_steps} if name == "ddpm" and not oracle else set())):
                start = time.perf_counter()
                table[name][steps] = d = distances(pipe, {"type": name, **(extra if name != "ddpm" else {})}, steps, m)
                show(short, name, steps, d, time.perf_counter() - start)
        if oracle:
            exact = [sliced_wasserstein(mixture_draws(m, 3000 + k), fresh[k][:m]) for k in seeds]
            table["exact draws"] = {reference_steps: exact}
            print(f"  {short:<15} {'exact mixture draws':<22}        SW2 {statistics.mean(exact):.4f} ± {_se(exact):.4f}")
        yardstick = "exact draws" if oracle else "ddpm"
        ref = table[yardstick][reference_steps]
        verdicts: dict[str, Any] = {}
        by_spacing: dict[str, dict[str, list[float]]] = {}
        for name in ("ddim", "dpm-solver"):
            by_spacing[name] = {"trailing": table[name][20]}
            for spacing in ("quadratic", "logsnr"):
                start = time.perf_counter()
                by_spacing[name][spacing] = d = distances(pipe, {"type": name, "spacing": spacing, **extra}, 20, m)
                show(short, f"{name}, {spacing}", 20, d, time.perf_counter() - start)
            for spacing, d in by_spacing[name].items():
                # paired by seed: each ratio compares two sample sets scored against the same data draw
                ratios = [a / b for a, b in zip(d, ref)]
                verdicts[f"{name} {spacing}"] = {"mean": statistics.mean(ratios), "se": _se(ratios)}
                verdict = "meets" if statistics.mean(ratios) <= 1.25 else "misses"
                print(
                    f"  {label}: {name} ({spacing}) at 20 steps is {statistics.mean(ratios):.2f} ± {_se(ratios):.2f}×"
                    f" {'exact draws' if oracle else f'{reference_steps}-step DDPM'} ({verdict} the 1.25× goal)"
                )
            if extra:
                d = distances(pipe, {"type": name, "clip_denoised": None}, 20, m)
                verdicts[f"{name} unclipped"] = statistics.mean(d) / statistics.mean(ref)
                print(f"  {label}: {name} at 20 steps without clipping: SW2 {statistics.mean(d):.4f}")
        results["models"][label] = {"table": table, "spacings_at_20": by_spacing, "ratio_at_20": verdicts}
    results["reference_steps"] = reference_steps
    plot_moons(results, pictures(args) / "moons-steps.png")
    return results


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def plot_moons(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4), sharey=True, squeeze=False)
    for ax, (label, model) in zip(axes[0], models.items()):
        table = model["table"]
        for name, marker in zip(SAMPLERS, "osD"):
            steps = sorted(table[name])
            mean = [statistics.mean(table[name][s]) for s in steps]
            se = [_se(table[name][s]) for s in steps]
            ax.errorbar(steps, mean, yerr=se, marker=marker, label=name, color=f"C{SAMPLERS.index(name)}", capsize=2)
        for name, spacings in model.get("spacings_at_20", {}).items():
            for spacing, marker in (("quadratic", "^"), ("logsnr", "v")):
                ax.scatter([20], [statistics.mean(spacings[spacing])], marker=marker, facecolors="none",
                           edgecolors=f"C{SAMPLERS.index(name)}", label=f"{name}, {spacing} spacing", zorder=3)
        ref = results["reference_steps"]
        if "exact draws" in table:
            ax.axhline(1.25 * statistics.mean(table["exact draws"][ref]), color="grey", ls="--", lw=1, label="1.25 × exact draws")
        else:
            ax.axhline(1.25 * statistics.mean(table["ddpm"][ref]), color="grey", ls="--", lw=1, label=f"1.25 × DDPM-{ref}")
        ax.axhline(results["floor"], color="grey", ls=":", lw=1, label="two data draws")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(sorted(table["ddpm"]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("steps (network evaluations)")
        ax.set_title(label, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"two moons: sliced W2 to fresh data (n = {results['n']})")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"  wrote {path}")


# -- 2. digits: inpainting, ILVR, SDEdit -----------------------------------------------------
def digits(args: argparse.Namespace) -> dict[str, Any]:
    judge = DigitsJudge()
    print(f"\ndigits: judge = SVC on real training digits, held-out accuracy {judge.test_accuracy:.1%}")
    if args.digits_run:
        pipe = diffkit.Pipeline.load(args.digits_run)
        print(f"using {args.digits_run} ({pipe.steps_trained} training steps)")
    else:
        pipe = trained(ROOT / "examples" / "digits.yaml", RUNS / ("quick-digits" if args.quick else "digits"), 50 if args.quick else None)
    test = diffkit.get_registry().build("data", {"type": "digits", "split": "test"})
    x, y = test.tensors()
    n = 40 if args.quick else min(args.digits, x.shape[0])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(x.shape[0], generator=g)[:n]
    x, y = x[pick], y[pick].numpy()
    mask = torch.zeros(1, 8, 8)
    mask[..., :4] = 1  # the left half is known

    def accuracy(images: torch.Tensor) -> float:
        return float((judge.proba(images).argmax(1) == y).mean())

    results: dict[str, Any] = {
        "n": n,
        "judge_test_accuracy": judge.test_accuracy,
        "real": accuracy(x),
        "left_half_only": accuracy(A.masked_view(x, mask, fill=-1.0)),
        "inpaint": {},
    }
    print(f"  {n} held-out digits: real {results['real']:.1%}; left half, right half blank {results['left_half_only']:.1%}")
    # images in [−1, 1]: every sampler clips x̂_0 there, as examples/digits.yaml's DDPM does.
    # (sampler, steps, resample, jump); RePaint's resampling with jumps is what ties the
    # generated half to the known half.
    configs = [
        ("ddpm", 100, 1, 1),
        ("ddim", 50, 1, 1),
        ("dpm-solver", 20, 1, 1),
        ("ddpm", 100, 20, 10),
        ("ddim", 50, 10, 5),
        ("dpm-solver", 20, 10, 4),
    ]
    if args.quick:
        configs = [(s, 10, 1, 1) for s in SAMPLERS] + [("ddpm", 10, 2, 2)]
    shown = None
    for name, steps, resample, jump in configs:
        start = time.perf_counter()
        sampler = {"type": name, "clip_denoised": 1.0}
        out = A.inpaint(pipe, x, mask, sampler=sampler, steps=steps, seed=1, resample=resample, jump=jump, batch_size=250)
        seconds = time.perf_counter() - start
        assert torch.equal(out[..., :4], x[..., :4])
        acc = accuracy(out)
        key = f"{name}, {steps} steps" + (f", resample {resample}, jump {jump}" if resample > 1 else "")
        results["inpaint"][key] = {"accuracy": acc, "seconds": seconds}
        print(f"  inpaint right half, {key:<38} right digit {acc:.1%} (goal ≥ 70%)  {seconds:.0f} s", flush=True)
        if resample > 1 and shown is None:
            shown = out
    k = 12
    diffkit.plotting.image_grid(torch.cat([x[:k], A.masked_view(x[:k], mask, fill=0.0), shown[:k]]), pictures(args) / "digits-inpaint.png", nrow=k)

    low = torch.nn.functional.avg_pool2d(x, 2)
    up = A.upscale(pipe, low, sampler={"type": "ddpm", "clip_denoised": 1.0}, seed=2, batch_size=250)
    nearest = torch.nn.functional.interpolate(low, scale_factor=2)
    results["upscale"] = {
        "accuracy": accuracy(up),
        "nearest_accuracy": accuracy(nearest),
        "max_block_mean_error": float((torch.nn.functional.avg_pool2d(up, 2) - low).abs().max()),
    }
    print(
        f"  upscale 4×4 → 8×8 (ILVR, ddpm): right digit {results['upscale']['accuracy']:.1%} (nearest upsampling"
        f" {results['upscale']['nearest_accuracy']:.1%}); block means kept to {results['upscale']['max_block_mean_error']:.1e}"
    )
    diffkit.plotting.image_grid(torch.cat([x[:k], nearest[:k], up[:k]]), pictures(args) / "digits-upscale.png", nrow=k)

    noisy = x + 0.6 * torch.randn(x.shape, generator=g)
    results["denoise"] = {"noisy": {"accuracy": accuracy(noisy), "mse": float((noisy - x).square().mean())}}
    rows = [x[:k], noisy[:k]]
    # noise of std 0.6 is the noise of x_t/√ᾱ_t at ᾱ = 1/(1 + 0.6²), t ≈ 170 of 1000: strength ≈ 0.17
    for strength in (0.1, 0.3):
        out = A.denoise(pipe, noisy, strength, sampler={"type": "ddim", "clip_denoised": 1.0}, steps=200, seed=3, batch_size=250)
        results["denoise"][strength] = {"accuracy": accuracy(out), "mse": float((out - x).square().mean())}
        rows.append(out[:k])
    print(
        "  SDEdit on digits + N(0, 0.6²) noise, judged right (mean squared error to the clean digit): "
        + ", ".join(f"{key if isinstance(key, str) else f'strength {key}'} {r['accuracy']:.1%} ({r['mse']:.3f})" for key, r in results["denoise"].items())
    )
    diffkit.plotting.image_grid(torch.cat(rows), pictures(args) / "digits-denoise.png", nrow=k)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run of every section")
    parser.add_argument("--digits-run", help="a trained digits run (default: train examples/digits.yaml once)")
    parser.add_argument("--digits", type=int, default=300, help="held-out digits to inpaint (default 300)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds averaged on moons (default 4)")
    parser.add_argument("--n", type=int, default=20_000, help="samples per seed on moons (default 20000)")
    parser.add_argument("--skip-moons", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import diffkit.plotting  # noqa: F401  (used by the digits section)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    results: dict[str, Any] = {}
    if not args.skip_moons:
        results["moons"] = moons(args)
    if not args.skip_digits:
        results["digits"] = digits(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
