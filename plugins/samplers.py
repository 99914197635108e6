"""Samplers of the reverse process: ``ddpm`` (ancestral sampling)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from diffkit import ClipDenoised, Component, Params, Predict, Schedule, Spacing, StepCallback, hookimpl, initial_state, report


class DDPMParams(Params):
    """Ancestral sampling: one step of p_θ(x_{t−1} | x_t) at a time."""

    variance: Literal["posterior", "beta"] = Field(
        "posterior",
        description="σ_t² of each step: 'posterior' is β̃_t (exact for a point mass x_0), 'beta' is β_t"
        " (exact for x_0 ~ N(0, I)); Ho et al. 2020, Sec. 3.2.",
    )
    steps: int | None = Field(
        None, ge=1, description="Number of reverse steps; null takes all T. Fewer steps respace the chain."
    )
    spacing: Spacing = Field(
        "linspace", description="How the visited timesteps are chosen when steps < T."
    )
    clip_denoised: ClipDenoised = "auto"


class DDPM:
    """x_{s} = 1/√α_{t|s} (x_t − β_{t|s}/√(1−ᾱ_t) ε̂) + σ z  (Ho et al. 2020, Alg. 2).

    With all T steps, s = t − 1 and this is Alg. 2 as written; with fewer, the chain
    is respaced over the visited timesteps (Nichol & Dhariwal 2021, Sec. 4), which uses
    the same formula with α_{t|s} = ᾱ_t / ᾱ_s. No noise is added on the last step.
    """

    def __init__(self, params: DDPMParams) -> None:
        self.params = params
        self.clip_denoised = params.clip_denoised  # the core bounds x̂_0 (diffkit.ClipDenoised)

    def __call__(
        self,
        predict: Predict,
        schedule: Schedule,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        callback: StepCallback | None = None,
        x_start: Tensor | None = None,
        t_start: int | None = None,
    ) -> Tensor:
        p = self.params
        ts = schedule.timesteps(p.steps if steps is None else steps, p.spacing, start=t_start)
        abar = schedule.alphas_cumprod.tolist()
        x = initial_state(shape, generator=generator, device=device, dtype=dtype, x_start=x_start)
        n = x.shape[0]
        x = report(callback, ts[0], x)
        for i, t in enumerate(tqdm(ts, desc="ddpm", disable=not progress, leave=False)):
            s = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
            alpha_ts = a_t / a_s
            beta_ts = 1.0 - alpha_ts
            eps = predict(x, torch.full((n,), t, device=device, dtype=torch.long))
            # the posterior mean of Eq. 7 written in ε̂ (Eq. 11); with ε̂ from a bounded x̂_0 it is
            # the posterior mean of that x̂_0
            x = torch.add(x, eps, alpha=-beta_ts / math.sqrt(1.0 - a_t)).mul_(1.0 / math.sqrt(alpha_ts))
            if s >= 0:
                var = beta_ts if p.variance == "beta" else (1.0 - a_s) / (1.0 - a_t) * beta_ts
                z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                x = x.add_(z, alpha=math.sqrt(var))
            x = report(callback, s, x)
        return x


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [Component("ddpm", lambda p, ctx: DDPM(p), DDPMParams, "Ancestral DDPM sampling (Ho et al. 2020, Alg. 2).")]
