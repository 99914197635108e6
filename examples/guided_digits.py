"""Digits by label: classifier guidance and classifier-free guidance, side by side.

    python examples/guided_digits.py            # trains both models: 10-20 minutes on two CPU cores
    python examples/guided_digits.py --fast     # seconds: tiny settings that only check the program runs

Both models start from the example specs, read here as plain dictionaries:

- examples/digits-classifier.yaml: an unconditional U-Net, steered by the gradient of a
  noise-aware classifier p_φ(y | x_t, t) that ``fit`` trains after the denoiser
  (Dhariwal & Nichol 2021): ε̃ = ε̂ − γ σ_t ∇ log p_φ(y | x_t);
- examples/digits-cfg.yaml: a U-Net trained with labels, each dropped 10% of the time, so
  one network predicts ε(x, y) and ε(x, ∅) (Ho & Salimans 2022):
  ε̃ = (1 + w) ε(x, y) − w ε(x, ∅).

For each it writes a grid with one row per digit 0–9 at three guidance scales (0 is no
guidance), under --out. docs/guidance.md explains the scales and shows full-size results.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import yaml

import diffkit
from diffkit import plotting
from diffkit.pipeline import clear_training_outputs

EXAMPLES = Path(__file__).resolve().parent


def spec(name: str, fast: bool) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    if fast:  # the same pipeline, shrunk: 50 noise levels, a narrow U-Net, a few steps
        body["schedule"]["timesteps"] = 50
        body["sampler"]["steps"] = 10
        body["denoiser"].update(channels=8)
        body["train"].update(steps=10, batch_size=32, preview=0)
    return body



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/examples/guided-digits", help="directory for the pictures and runs")
    parser.add_argument("--per-label", type=int, default=8, help="samples of each digit (default 8)")
    parser.add_argument("--fast", action="store_true", help="tiny settings that only check the program runs")
    args = parser.parse_args()
    out = Path(args.out)
    per_label = 2 if args.fast else args.per_label
    labels = torch.arange(10).repeat_interleave(per_label)  # 0,0,…,1,1,…: one row per digit

    for name, method in [("digits-classifier.yaml", "classifier"), ("digits-cfg.yaml", "classifier-free")]:
        pipe = diffkit.Pipeline.from_spec(spec(name, args.fast))
        clear_training_outputs(out / method)  # each run of the example starts afresh
        result = pipe.fit(out=out / method, progress=not args.fast)
        trained = f"denoiser: {result.steps} steps in {result.seconds:.0f} s"
        for name_, part in result.parts.items():  # the guidance's own networks (the classifier)
            trained += f"; {name_}: {part.steps} steps"
        print(f"{method}: {trained}")

        default = pipe.guidance.scale  # γ for classifier guidance, w for classifier-free
        for scale in (0.0, default, 2 * default):
            x = pipe.sample(len(labels), seed=0, labels=labels, guidance_scale=scale)
            path = out / f"{method}-scale-{scale:g}.png"
            plotting.image_grid(x, path, nrow=per_label)
            print(f"  scale {scale:g}: wrote {path}")
        pipe.save(out / method)  # `diffkit sample DIR --label 7` works on it too


if __name__ == "__main__":
    main()
