"""Compose a pipeline in Python from registered components: train, sample, save, load.

    python examples/compose.py                 # about a minute on two CPU cores
    python examples/compose.py --fast          # a few seconds: tiny schedule and training

Every component comes from the registry by name, exactly as a spec names it, so the
pipeline can write its spec back out. examples/swiss-roll-cosine.toml is a spec file of
the same kind (swiss roll, cosine schedule, MLP), with its own settings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffkit
from diffkit import plotting
from diffkit.spec import dump_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/examples/compose", help="directory for the run and its pictures")
    parser.add_argument("--fast", action="store_true", help="a tiny schedule and a few training steps (for tests)")
    args = parser.parse_args()
    T, steps = (50, 30) if args.fast else (1000, 3000)

    # Components are built by name from the registry, with their parameters checked;
    # the network is given as a section, because its shape depends on the data.
    schedule = diffkit.build("schedule", "cosine", timesteps=T)  # Nichol & Dhariwal 2021, Eq. 17
    objective = diffkit.build("objective", "v")  # the network predicts v = √ᾱ ε − √(1−ᾱ) x₀
    sampler = diffkit.build("sampler", "ddim", steps=min(50, T))  # deterministic, 50 steps
    pipe = diffkit.Pipeline(
        schedule,
        denoiser={"type": "mlp", "hidden": 128},
        objective=objective,
        sampler=sampler,
        data={"type": "swiss-roll"},
        train={"steps": steps, "batch_size": 256, "preview": 0},
    )
    print(pipe)

    result = pipe.fit(progress=False)
    print(f"trained {result.steps} steps in {result.seconds:.1f} s, final loss {result.final_loss:.4f}")

    x = pipe.sample(2000, seed=0)  # in the data's own coordinates
    out = Path(args.out)
    plotting.scatter(x, out / "samples.png", reference=pipe.dataset.tensors()[0][:2000], title="swiss roll: DDIM")

    # A pipeline and its spec are two faces of one thing: save writes the spec and the
    # weights (safetensors, nothing pickled); load rebuilds the same pipeline from them.
    pipe.save(out / "run")
    print(dump_spec(pipe.spec))  # the spec this pipeline was built from, as YAML
    same = diffkit.Pipeline.load(out / "run")
    again = same.sample(2000, seed=0)
    assert torch.allclose(x, again, atol=1e-5), "a loaded pipeline draws the same samples from the same seed"
    print(f"wrote {out / 'samples.png'} and the run directory {out / 'run'}; the loaded copy samples identically")


if __name__ == "__main__":
    main()
