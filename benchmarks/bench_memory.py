#!/usr/bin/env python3
"""Peak memory of sampling many points: ``diffkit sample RUN --n N --batch-size 4096 --out x.npy``.

    python benchmarks/bench_memory.py            # N = 100,000 and 1,000,000 (~5 min here)

A moons run (examples/moons.yaml, 50 training steps: memory does not depend on quality)
is sampled into an ``.npy`` file by the command line, in a child process each time, and
the child's peak resident memory (``ru_maxrss``) is reported. The samples are written
batch by batch into a memory-mapped file and the noise is drawn per sample, chunk by
chunk, so the peak should not grow with N. ``--steps 10`` keeps the run short: the memory
held per batch does not depend on the number of steps. Goal: under 1 GB at N = 1,000,000.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
GOAL_BYTES = 1 << 30


def peak_of(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes, seconds) of a child process running ``cmd``."""
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter();"
        " subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        " print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return int(out[0]) * 1024, float(out[1])  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load((ROOT / "examples" / "moons.yaml").read_text())
        spec["train"] = {**spec.get("train", {}), "steps": 50, "preview": 0}
        spec_path = Path(tmp) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        run = Path(tmp) / "run"
        subprocess.run(["diffkit", "train", str(spec_path), "--out", str(run), "--no-progress"], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"diffkit sample (ddpm, --steps 10, --batch-size {args.batch_size}) into an .npy file:")
        for n in args.n:
            out = Path(tmp) / f"x{n}.npy"
            cmd = ["diffkit", "sample", str(run), "--n", str(n), "--batch-size", str(args.batch_size), "--steps", "10",
                   "--seed", "0", "--out", str(out), "--no-progress"]
            peak, seconds = peak_of(cmd)
            shape = np.load(out, mmap_mode="r").shape
            ok = "PASS" if peak < GOAL_BYTES or n < 1_000_000 else "MISS"
            print(f"--n {n:>9,}: peak RSS {peak / 2**20:7.1f} MiB   {seconds:6.1f} s   wrote {shape}   goal < 1 GiB at 1,000,000: {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
