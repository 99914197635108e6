"""Regenerate the pictures in README.md and docs/ from the project's own runs.

    python docs/make_images.py            # trains what is missing under runs/, then draws

Every picture is drawn by diffkit's CLI, so they show exactly what a user gets.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"


def diffkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "diffkit.cli", *args], check=True, cwd=ROOT)


def run(spec: str, out: str) -> Path:
    path = ROOT / out
    if not (path / "spec.yaml").exists():
        diffkit("train", spec, "--out", out, "--no-progress")
    return path


def main() -> None:
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
    print(f"pictures written to {IMAGES}")


if __name__ == "__main__":
    main()
