"""The MNIST walk-through: a DDPM with a U-Net, from the forward process to samples.

    python examples/mnist.py --root data       # MNIST from data/MNIST/raw (torchvision's layout)
    python examples/mnist.py --download        # fetch MNIST into --root first (needs internet)
    python examples/mnist.py                   # no MNIST files: the bundled 8×8 digits instead
    python examples/mnist.py --fast            # seconds: a tiny schedule, network and training

It writes, under --out:

1. ``forward.png``    the forward process q(x_t | x_0) destroying real digits;
2. ``loss.png``       the training loss (L_simple, Ho et al. 2020, Eq. 14);
3. ``samples.png``    a grid of 64 samples (Ho et al. 2020, Alg. 2);
4. ``trajectory.png`` the reverse process: an image emerging from noise;
5. ``run/``           the trained pipeline (spec.yaml + safetensors), reloadable with
                      ``diffkit.Pipeline.load`` or ``diffkit sample``.

On two CPU cores the bundled digits train in 5-10 minutes; MNIST (60,000 images of
28×28) wants a GPU or patience: try ``--steps 5000`` and a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import diffkit
from diffkit import DiffkitError, plotting
from diffkit.pipeline import clear_training_outputs


def build(data: dict[str, Any], fast: bool, steps: int | None, device: str) -> diffkit.Pipeline:
    T = 20 if fast else 1000
    unet = {"type": "unet", "channels": 8, "channel_mult": [1, 2]} if fast else {"type": "unet"}
    return diffkit.Pipeline.from_spec(
        {
            "seed": 0,
            "data": data,
            "schedule": {"type": "linear", "timesteps": T},  # β from 1e-4 to 0.02 (Ho et al. 2020)
            "denoiser": unet,
            "objective": {"type": "epsilon"},
            "sampler": {"type": "ddpm"},
            "train": {
                "steps": steps or (10 if fast else 2000),
                "batch_size": 32 if fast else 128,
                "lr": 2e-3,
                "log_every": 2 if fast else 50,
                "preview": 0,
                "device": device,
            },
        }
    )



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="where MNIST's files are (torchvision's layout)")
    parser.add_argument("--download", action="store_true", help="download MNIST into --root if it is missing")
    parser.add_argument("--steps", type=int, help="training steps (default 2000; 10 with --fast)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--out", default="runs/examples/mnist", help="directory for the pictures and the run")
    parser.add_argument("--fast", action="store_true", help="tiny settings that only check the program runs")
    args = parser.parse_args()
    out = Path(args.out)

    try:  # MNIST where its files are (or can be fetched), else the bundled digits
        pipe = build(
            {"type": "mnist", "root": args.root, "download": args.download}, args.fast, args.steps, args.device
        )
    except DiffkitError as exc:
        print(f"MNIST is not available ({str(exc).splitlines()[0]})\n-> using the bundled 8×8 digits instead")
        pipe = build({"type": "digits"}, args.fast, args.steps, args.device)
    T = pipe.schedule.T
    print(pipe)

    # 1. The forward process: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) at eight timesteps.
    x0 = pipe.dataset.tensors()[0][: 4 if args.fast else 6]
    ts = [round((T - 1) * i / 7) for i in range(8)]
    plotting.frames(
        pipe.forward_process(x0, ts), [f"t = {t}" for t in ts], out / "forward.png", "forward process q(x_t | x_0)"
    )

    # 2. Training: minimise ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² over random t and ε.
    clear_training_outputs(out)  # each run of the walk-through starts afresh
    result = pipe.fit(out=out, progress=not args.fast)
    plotting.loss_curve(result.history, out / "loss.png")
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {result.final_loss:.4f}")

    # 3. Samples: ancestral sampling from pure noise x_{T−1} ~ N(0, I) down to x_0.
    samples = pipe.sample(8 if args.fast else 64, seed=0, progress=not args.fast)
    plotting.image_grid(samples, out / "samples.png")

    # 4. The image emerging from noise: eight states of the reverse process of 8 samples.
    ts, states = pipe.trajectory(n=4 if args.fast else 8, frames=8, seed=0)
    names = [f"t = {t}" if t >= 0 else "x₀" for t in ts]
    plotting.frames(states, names, out / "trajectory.png", "reverse process: noise → digits")

    # 5. Save, and load again: the run directory is what `diffkit sample` reads too.
    pipe.save(out / "run")
    same = diffkit.Pipeline.load(out / "run")
    assert same.spec == pipe.spec
    print(f"wrote {', '.join(p + '.png' for p in ('forward', 'loss', 'samples', 'trajectory'))} and run/ to {out}")
    print(f"draw more with: diffkit sample {out / 'run'} --n 64 --out more.png")


if __name__ == "__main__":
    main()
