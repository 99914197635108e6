"""Guidance on digits: does a digit asked for by label come out as that digit, and what
does a larger guidance scale cost in diversity?

    python benchmarks/bench_guidance.py                       # train both example runs, then judge
    python benchmarks/bench_guidance.py --runs runs/bench-guidance   # judge runs trained before
    python benchmarks/bench_guidance.py --quick               # a smoke run of every section

1. Trains (or loads) ``examples/digits-classifier.yaml`` (classifier guidance on an
   unconditional U-Net) and ``examples/digits-cfg.yaml`` (classifier-free guidance on a
   conditional U-Net, labels dropped at rate 0.1) into ``RUNS/classifier`` and ``RUNS/cfg``.
2. For each, at the spec's default scale and along a sweep of scales, draws
   ``--per-label`` samples of each digit 0–9 and measures
   - accuracy: the share that an SVC trained on the real training digits (not the
     guidance classifier; its held-out accuracy is printed) classifies as the asked digit.
     Goal at the default scales: ≥ 90 %.
   - diversity: the mean distance between two samples of the same digit, relative to the
     same for the real training digits (1 = as varied as the data), averaged over digits.
3. Under other samplers at the default scale: ``ddpm`` (all T steps), ``dpm-solver`` at
   20 steps and ``heun`` at 18 (goal ≥ 90 % each), and along the sweep with the guidance
   interval σ̃ ∈ [0.28, 5.42] (Kynkäänniemi et al. 2024's for EDM2) and with rescale φ = 0.7
   (Lin et al. 2024), as a Markdown table in ``RUNS/bench_guidance.md``.
4. Plots both against the scale (the fidelity–diversity trade-off) to
   ``docs/images/guidance-tradeoff.png``, draws a grid of each method's digits at its
   default scale, and, with ``--gaussians``, the guided 2-D example as a scatter plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffkit  # noqa: E402
from common import DigitsJudge  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
METHODS = {"classifier": "digits-classifier.yaml", "cfg": "digits-cfg.yaml"}
LABELS = {"classifier": "classifier guidance (unconditional U-Net), γ", "cfg": "classifier-free guidance (conditional U-Net), w"}
SWEEP = {"classifier": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0], "cfg": [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]}
SAMPLERS = {"ddpm": {"type": "ddpm"}, "dpm-solver": {"type": "dpm-solver", "steps": 20}, "heun": {"type": "heun", "steps": 18}}
INTERVAL = (0.28, 5.42)  # σ̃ = σ/α, Kynkäänniemi et al. 2024's interval for EDM2
RESCALE = 0.7  # Lin et al. 2024, Sec. 3.4
VARIANTS = {"plain": {}, "interval": {"guidance_interval": INTERVAL}, "rescale": {"guidance_rescale": RESCALE}}


def train_or_load(method: str, runs: Path, quick: bool) -> diffkit.Pipeline:
    directory = runs / method
    if (directory / "spec.yaml").is_file():
        pipe = diffkit.Pipeline.load(directory)
        parts = ", ".join(f"{p.steps_trained} {p.name} steps" for p in pipe.parts())
        print(f"{method}: loaded {directory} ({pipe.steps_trained} denoiser steps{', ' + parts if parts else ''})")
        return pipe
    spec = ROOT / "examples" / METHODS[method]
    pipe = diffkit.Pipeline.from_spec(spec)
    start = time.perf_counter()
    overrides = {"steps": 30} if quick else {}
    result = pipe.fit(progress=not quick, out=directory, **overrides)
    seconds = time.perf_counter() - start
    pipe.save(directory)
    print(f"{method}: trained {spec.name} in {seconds:.0f} s (denoiser loss {result.final_loss:.4f}); saved {directory}")
    for report in result.parts.values():
        print(f"  {report}")
    return pipe


def within_class_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance between two different samples, in pixel space."""
    flat = x.reshape(x.shape[0], -1).double()
    d = torch.cdist(flat, flat)
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def evaluate(
    pipe: diffkit.Pipeline, judge: DigitsJudge, scale: float | None, per_label: int, real: dict[int, float], **options
) -> dict:
    labels = torch.arange(10).repeat_interleave(per_label)
    start = time.perf_counter()
    x = pipe.sample(labels.numel(), seed=1, labels=labels, guidance_scale=scale, batch_size=500, **options)
    seconds = time.perf_counter() - start
    predicted = judge.proba(x).argmax(1)
    accuracy = float((predicted == labels.numpy()).mean())
    diversity = float(np.mean([within_class_distance(x[labels == k]) / real[k] for k in range(10)]))
    per_digit = [float((predicted[labels.numpy() == k] == k).mean()) for k in range(10)]
    confidence = float(judge.proba(x)[np.arange(labels.numel()), labels.numpy()].mean())
    return {
        "scale": scale,
        "accuracy": accuracy,
        "confidence": confidence,
        "diversity": diversity,
        "per_digit": per_digit,
        "seconds": seconds,
        "samples": x,
    }


def plot_tradeoff(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, rows in results.items():
        scales = [r["scale"] for r in rows]
        axes[0].plot(scales, [100 * r["accuracy"] for r in rows], "o-", label=LABELS[method])
        axes[1].plot(scales, [r["diversity"] for r in rows], "o-", label=LABELS[method])
    axes[0].axhline(90, color="0.6", ls="--", lw=1)
    axes[0].set_ylabel("asked digit produced (%)")
    axes[0].set_title("fidelity: judged by an SVC on real digits")
    axes[1].set_ylabel("within-digit distance / real data's")
    axes[1].set_title("diversity")
    ticks = sorted({r["scale"] for rows in results.values() for r in rows})
    for ax in axes:
        ax.set_xlabel("guidance scale (γ for classifier, w for classifier-free)")
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
        ax.set_xticks(ticks, [f"{s:g}" for s in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("digits 8×8: the fidelity–diversity trade-off of guidance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_options(rows: dict[str, dict[str, list[dict]]], path: Path) -> None:
    """Accuracy and judge confidence against the scale, plain, with the interval and with the rescale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = {"plain": "o-", "interval": "s--", "rescale": "^:"}
    names = {"plain": "plain", "interval": f"interval σ̃ ∈ [{INTERVAL[0]}, {INTERVAL[1]}]", "rescale": f"rescale φ = {RESCALE}"}
    for method, variants in rows.items():
        for variant, points in variants.items():
            scales = [p["scale"] for p in points]
            label = f"{'classifier γ' if method == 'classifier' else 'classifier-free w'}, {names[variant]}"
            axes[0].plot(scales, [100 * p["accuracy"] for p in points], styles[variant], label=label)
            axes[1].plot(scales, [p["confidence"] for p in points], styles[variant], label=label)
    axes[0].axhline(90, color="0.6", ls="--", lw=1)
    axes[0].set_ylabel("asked digit produced (%)")
    axes[1].set_ylabel("judge's probability of the asked digit")
    for ax in axes:
        ax.set_xlabel("guidance scale")
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.6)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle("digits 8×8, ddim 50 steps: guidance with and without its interval and rescale")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gaussians_figure(path: Path, quick: bool) -> None:
    """The 2-D example: labels 0, 2 and 5 at scales 0, 1 and the default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipe = diffkit.Pipeline.from_spec(ROOT / "examples" / "gaussians-guided.yaml")
    pipe.fit(progress=not quick, **({"steps": 30} if quick else {}))
    default = pipe.guidance.scale
    asked = torch.tensor([0, 2, 5]).repeat_interleave(300)
    data = pipe.dataset.tensors()
    cmap = plt.get_cmap("tab10")
    scales = [0.0, 1.0, default]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), sharex=True, sharey=True)
    axes[0].scatter(data[0][:4000, 0], data[0][:4000, 1], s=2, c=cmap(data[1][:4000].numpy()), linewidths=0)
    axes[0].set_title("data, coloured by label")
    for ax, scale in zip(axes[1:], scales):
        x = pipe.sample(asked.numel(), seed=0, labels=asked, guidance_scale=scale)
        ax.scatter(data[0][:4000, 0], data[0][:4000, 1], s=1, color="0.85", linewidths=0)
        ax.scatter(x[:, 0], x[:, 1], s=2, c=cmap(asked.numpy()), linewidths=0)
        ax.set_title(f"asked for 0, 2, 5: γ = {scale:g}" + (" (default)" if scale == default else ""))
    for ax in axes:
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-guidance"), help="where the two runs are (or go)")
    parser.add_argument("--per-label", type=int, default=50, help="samples of each digit per scale (default 50)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every section")
    parser.add_argument("--gaussians", action="store_true", help="also draw the 2-D example's figure")
    parser.add_argument("--no-figures", action="store_true", help="write no pictures")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--sweep", help="scales of both sweeps, e.g. 0,1,2,4 (default: 0,0.5,1,2,4,8)")
    parser.add_argument("--ddpm-steps", type=int, help="steps of the ddpm row (default: all T)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = Path(args.runs)
    images = runs / "images" if args.quick else IMAGES  # a smoke run leaves the docs' pictures alone
    images.mkdir(parents=True, exist_ok=True)
    per_label = 3 if args.quick else args.per_label
    if args.sweep:
        for method in SWEEP:
            SWEEP[method] = [float(s) for s in args.sweep.split(",")]
    if args.ddpm_steps:
        SAMPLERS["ddpm"] = {"type": "ddpm", "steps": args.ddpm_steps}
    judge = DigitsJudge()
    print(f"judge: SVC on real digits, held-out accuracy {judge.test_accuracy:.1%}")
    train = diffkit.get_registry().build("data", {"type": "digits", "split": "train"})
    xr, yr = train.tensors()
    real = {k: within_class_distance(xr[yr == k]) for k in range(10)}

    results: dict[str, list[dict]] = {}
    summary: dict[str, dict] = {}
    for method in METHODS:
        pipe = train_or_load(method, runs, args.quick)
        default = pipe.guidance.scale
        sweep = sorted(set((SWEEP[method][:2] if args.quick else SWEEP[method]) + [default]))
        rows = []
        print(f"\n{LABELS[method]}: {per_label} samples of each digit per scale (default {default:g})")
        print(f"{'scale':>6} {'accuracy':>9} {'diversity':>10} {'seconds':>8}  per digit")
        for scale in sweep:
            r = evaluate(pipe, judge, scale, per_label, real)
            rows.append(r)
            mark = "  ← default" if scale == default else ""
            digits = " ".join(f"{a:.0%}" for a in r["per_digit"])
            print(f"{scale:>6g} {r['accuracy']:>9.1%} {r['diversity']:>10.2f} {r['seconds']:>8.0f}  {digits}{mark}")
        results[method] = rows
        best = next(r for r in rows if r["scale"] == default)
        summary[method] = {"default_scale": default, "accuracy": best["accuracy"], "diversity": best["diversity"]}
        print(f"at the default scale {default:g}: {best['accuracy']:.1%} of the digits are the one asked for (goal ≥ 90%)")
        if not args.no_figures:
            from diffkit import plotting

            grid = best["samples"].reshape(10, per_label, *best["samples"].shape[1:])[:, :10].reshape(-1, *best["samples"].shape[1:])
            plotting.image_grid(grid, images / f"guidance-digits-{method}.png", nrow=min(10, per_label))

    if not args.no_figures:
        plot_tradeoff(results, images / "guidance-tradeoff.png")
        print(f"\nwrote {images / 'guidance-tradeoff.png'}")
        if args.gaussians:
            gaussians_figure(images / "guidance-gaussians.png", args.quick)
    options_rows: dict[str, dict[str, list[dict]]] = {}
    markdown = ["| method | sampler | scale | " + " | ".join(f"{v}: accuracy, confidence" for v in VARIANTS) + " |"]
    markdown.append("|---|---|---|" + "---|" * len(VARIANTS))
    samplers_table: dict[str, dict] = {}
    for method in METHODS:
        pipe = train_or_load(method, runs, args.quick)
        default = pipe.guidance.scale
        for sampler in SAMPLERS.values():
            name = f"{sampler['type']} {sampler['steps']}" if "steps" in sampler else f"{sampler['type']} (all T)"
            chosen = {**sampler, "steps": 10} if args.quick and sampler["type"] == "ddpm" else sampler
            r = evaluate(pipe, judge, None, per_label, real, sampler=chosen)
            samplers_table[f"{method} {name}"] = {k: v for k, v in r.items() if k != "samples"}
            print(f"{method}, {name}, default scale {default:g}: {r['accuracy']:.1%} asked digit (goal ≥ 90%), {r['seconds']:.0f} s")
        sweep = SWEEP[method][:3] if args.quick else SWEEP[method]
        for scale in sweep:
            cells = []
            for variant, options in VARIANTS.items():
                r = evaluate(pipe, judge, scale, per_label, real, **options)
                cells.append(f"{r['accuracy']:.1%}, {r['confidence']:.2f}")
                options_rows.setdefault(method, {}).setdefault(variant, []).append({k: v for k, v in r.items() if k != "samples"})
            markdown.append(f"| {method} | ddim 50 | {scale:g} | " + " | ".join(cells) + " |")
            print(markdown[-1])
    (runs / "bench_guidance.md").write_text("\n".join(markdown) + "\n")
    if not args.no_figures:
        plot_options(options_rows, images / "guidance-options.png")
        print(f"wrote {images / 'guidance-options.png'}")
    table = {m: [{k: v for k, v in r.items() if k != "samples"} for r in rows] for m, rows in results.items()}
    table["samplers"] = samplers_table  # type: ignore[assignment]
    table["options"] = options_rows  # type: ignore[assignment]
    out = runs / "bench_guidance.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"judge_accuracy": judge.test_accuracy, "summary": summary, "sweep": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
