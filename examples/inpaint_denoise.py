"""Inpainting and denoising held-out digits with a trained DDPM (diffkit.applications).

    python examples/inpaint_denoise.py --run runs/digits   # a model from `make demo`: about a minute
    python examples/inpaint_denoise.py                     # trains one first (5-10 minutes on 2 CPU cores)
    python examples/inpaint_denoise.py --fast              # seconds: tiny settings that only check it runs

Neither application needs a model trained for it: both reach the reverse process of
any sampler only through its callback and its start state.

- Inpainting (``applications.inpaint``): the right half of each digit is erased; at
  every step the known half is replaced by a fresh draw of q(x_t | x_0), and RePaint's
  resampling (``resample``, ``jump``) makes the two halves agree.
- Denoising (``applications.denoise``, SDEdit): each noisy digit is noised further by
  q(x_t | x_0) to a chosen strength (the fraction of the schedule, here 0.1 and 0.3),
  and the reverse process runs from there down to a clean digit.

Pictures under --out: ``inpaint.png`` (originals, masked inputs, results) and
``denoise.png`` (originals, noisy inputs, results at two strengths).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import diffkit
from diffkit import applications as A
from diffkit import plotting


def trained(args: argparse.Namespace) -> diffkit.Pipeline:
    if args.run:
        return diffkit.Pipeline.load(args.run)
    fast = args.fast
    pipe = diffkit.Pipeline.from_spec(
        {
            "data": {"type": "digits"},
            "schedule": {"type": "linear", "timesteps": 50 if fast else 1000},
            "denoiser": {"type": "unet", "channels": 8} if fast else {"type": "unet"},
            "sampler": {"type": "ddpm"},
            "train": {"steps": 10 if fast else 2000, "batch_size": 32 if fast else 128, "lr": 2e-3, "preview": 0},
        }
    )
    result = pipe.fit(progress=not fast)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s")
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained digits run directory (from `diffkit train`); default: train one")
    parser.add_argument("--out", default="runs/examples/inpaint-denoise", help="directory for the pictures")
    parser.add_argument("--fast", action="store_true", help="tiny settings that only check the program runs")
    args = parser.parse_args()
    out = Path(args.out)
    pipe = trained(args)
    steps = min(pipe.schedule.T, 10 if args.fast else 100)
    ddim = {"type": "ddim"}  # x̂₀ held in the data's range [−1, 1] by default

    # Held-out digits: the 'test' split is never seen in training.
    test = diffkit.build("data", {"type": "digits", "split": "test"})
    x = test.tensors()[0][: 4 if args.fast else 8]

    # Inpainting: 1 = known, 0 = to generate; [1, H, W] broadcasts to every image.
    mask = torch.ones(1, *x.shape[2:])
    mask[..., x.shape[-1] // 2 :] = 0
    resample, jump = (2, 5) if args.fast else (20, 10)  # RePaint: go back `jump` steps, `resample` times
    filled = A.inpaint(pipe, x, mask, sampler="ddpm", steps=steps, resample=resample, jump=jump, seed=0)
    assert torch.equal(filled * mask, x * mask), "the known half comes back exactly"
    rows = torch.cat([x, A.masked_view(x, mask), filled])
    plotting.image_grid(rows, out / "inpaint.png", nrow=len(x))

    # Denoising: add Gaussian noise of std σ, then run SDEdit from the matching level.
    sigma = 0.6
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    results = [A.denoise(pipe, noisy, strength=s, sampler=ddim, steps=2 * steps, seed=0) for s in (0.1, 0.3)]
    plotting.image_grid(torch.cat([x, noisy.clamp(-1, 1), *results]), out / "denoise.png", nrow=len(x))
    before = ((noisy - x) ** 2).mean()
    for s, r in zip((0.1, 0.3), results):
        print(
            f"SDEdit strength {s}: mean squared error to the clean digits {((r - x) ** 2).mean():.3f} (noisy: {before:.3f})"
        )
    print(f"wrote {out / 'inpaint.png'} and {out / 'denoise.png'}")


if __name__ == "__main__":
    main()
