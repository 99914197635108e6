"""Regenerate the pictures in README.md and docs/ from the project's own runs.

    python docs/make_images.py                # trains what is missing under runs/, then draws
    python docs/make_images.py --benchmarks   # also the pictures the benchmarks draw (slow: about an hour)

The pictures of the main jobs are drawn by diffkit's CLI, so they show exactly what a
user gets; those that come with measurements are drawn by the benchmark that makes the
measurements. ``PICTURES`` says which does which, and the test suite checks that every
picture in docs/images is listed there and that every picture a page shows exists.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"

CLI = "docs/make_images.py (diffkit CLI)"
BENCH_STEPS = "benchmarks/bench_steps.py"
BENCH_GUIDANCE = "benchmarks/bench_guidance.py --gaussians"
BENCH_PROCESSES = "benchmarks/bench_processes.py"
PICTURES: dict[str, str] = {
    "moons.png": CLI,
    "moons-trajectory.png": CLI,
    "moons-forward.png": CLI,
    "digits.png": CLI,
    "digits-trajectory.png": CLI,
    "digits-forward.png": CLI,
    "digits-loss.png": CLI,
    "moons-steps.png": BENCH_STEPS,
    "digits-inpaint.png": BENCH_STEPS,
    "digits-denoise.png": BENCH_STEPS,
    "digits-upscale.png": BENCH_STEPS,
    "guidance-gaussians.png": BENCH_GUIDANCE,
    "guidance-tradeoff.png": BENCH_GUIDANCE,
    "guidance-digits-classifier.png": BENCH_GUIDANCE,
    "guidance-digits-cfg.png": BENCH_GUIDANCE,
    "guidance-options.png": BENCH_GUIDANCE,
    "moons-processes.png": BENCH_PROCESSES,
}
"""Every picture in docs/images and what draws it."""


def diffkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffkit.cli", *args], check=True, cwd=ROOT)


def run(spec: str, out: str) -> Path:
    path = ROOT / out
    if not (path / "spec.yaml").exists():
        diffkit("train", spec, "--out", out, "--no-progress")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the pictures of README.md and docs/.")
    parser.add_argument("--benchmarks", action="store_true", help="also run the benchmarks that draw pictures")
    args = parser.parse_args()
    IMAGES.mkdir(parents=True, exist_ok=True)
    moons = run("examples/moons.yaml", "runs/moons")
    diffkit("sample", str(moons), "--n", "5000", "--seed", "0", "--out", str(IMAGES / "moons.png"), "--no-progress",
            "--trajectory", str(IMAGES / "moons-trajectory.png"))
    diffkit("forward", "examples/moons.yaml", "--out", str(IMAGES / "moons-forward.png"))
    digits = run("examples/digits.yaml", "runs/digits")
    diffkit("sample", str(digits), "--n", "64", "--seed", "0", "--out", str(IMAGES / "digits.png"), "--no-progress",
            "--trajectory", str(IMAGES / "digits-trajectory.png"))
    diffkit("forward", "examples/digits.yaml", "--out", str(IMAGES / "digits-forward.png"))
    shutil.copy(digits / "loss.png", IMAGES / "digits-loss.png")
    if args.benchmarks:
        for script in sorted(set(PICTURES.values()) - {CLI}):
            name, *flags = script.split()
            subprocess.run([sys.executable, name, *flags], check=True, cwd=ROOT)
    print(f"pictures written to {IMAGES}")


if __name__ == "__main__":
    main()
