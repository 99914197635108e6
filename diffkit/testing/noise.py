"""The per-sample noise contract, checked for any step sampler.

A sampler's samples must depend on the seed and the sample's index only, not on the
batch they are drawn in (:mod:`diffkit.noise`). A step that draws its noise through
``ctx.noise`` keeps this by construction; one that calls ``torch.randn`` itself, reads
torch's global generator, or mixes samples of a batch does not.
:func:`check_sampler_noise` runs the sampler with the exact denoiser of Gaussian data
(which treats every sample on its own) and checks:

1. a batch drawn whole equals the same samples drawn in two parts, and sample ``i`` of
   ``n`` samples equals sample ``i`` of ``n + 3`` (to float rounding);
2. the same seed gives the same samples bit for bit, another seed others;
3. sampling leaves torch's global generator as it found it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffkit.noise import SampleNoise
from diffkit.sampling import run
from diffkit.testing._common import ConformanceError

__all__ = ["check_sampler_noise"]


def _draw(sampler: Any, process: Any, denoise: Any, seed: int, first: int, count: int, steps: int) -> torch.Tensor:
    noise = SampleNoise(seed, first, count)
    return run(sampler, denoise, process, (count, 2), steps=steps, dtype=torch.float64, noise=noise)


def check_sampler_noise(
    sampler_or_name: Any,
    processes: Sequence[str] | Mapping[str, Any] = ("vp", "edm"),
    *,
    steps: int = 6,
    n: int = 10,
    atol: float = 1e-9,
) -> None:
    """Check that ``sampler_or_name`` (a registered name, a spec dict or a step sampler)
    draws per-sample noise on each of ``processes`` (registered names, or a name → process
    mapping); raises :class:`ConformanceError` naming what differed."""
    from diffkit.testing.certify import GAUSSIAN, _build_sampler, default_processes

    sampler, name = _build_sampler(sampler_or_name)
    procs = dict(processes) if isinstance(processes, Mapping) else default_processes(list(processes))
    for pname, process in procs.items():
        denoise = GAUSSIAN.denoiser(process)
        where = f"sampler {name} on process {pname}"
        state = torch.get_rng_state()
        whole = _draw(sampler, process, denoise, 3, 0, n, steps)
        if not torch.equal(torch.get_rng_state(), state):
            raise ConformanceError(
                f"{where} drew from torch's global generator; draw noise with ctx.noise(x), which is per sample"
            )
        if not torch.isfinite(whole).all():
            raise ConformanceError(f"{where} produced non-finite samples from the exact denoiser of Gaussian data")
        k = n // 3
        parts = torch.cat(
            [_draw(sampler, process, denoise, 3, 0, k, steps), _draw(sampler, process, denoise, 3, k, n - k, steps)]
        )
        longer = _draw(sampler, process, denoise, 3, 0, n + 3, steps)[:n]
        for what, other in (("drawn in two batches", parts), (f"drawn among {n + 3}", longer)):
            gap = float((other - whole).abs().max())
            if not gap <= atol:
                raise ConformanceError(
                    f"{where}: the samples {what} differ from the same samples drawn in one batch of {n} by up to"
                    f" {gap:.3g} (allowed {atol:g}); a sample must depend only on the seed and its index: draw noise"
                    " with ctx.noise(x) and treat each sample of the batch on its own"
                )
        again = _draw(sampler, process, denoise, 3, 0, n, steps)
        if not torch.equal(again, whole):
            raise ConformanceError(f"{where}: the same seed gave different samples")
        other_seed = _draw(sampler, process, denoise, 4, 0, n, steps)
        if torch.equal(other_seed, whole):
            raise ConformanceError(f"{where}: two seeds gave the same samples")
