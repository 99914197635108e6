"""Sampling by Euler–Maruyama steps of the reverse-time SDE (Song et al. 2021).

A variance-preserving (VP) process x_t = α(t) x_0 + σ(t) ε with α² + σ² = 1 is the SDE of
Song et al. 2021, Eq. 11,

    dx = −½ β(t) x dt + √β(t) dw,   with α(t)² = exp(−∫_0^t β(r) dr),

whose reverse in time (Anderson 1982; Song et al. 2021, Eq. 6) is

    dx = [f(x, t) − g(t)² ∇_x log p_t(x)] dt + g(t) dw̄,   f = −½ β(t) x,  g² = β(t).

One Euler–Maruyama step from time t back to s < t, with the integral of β over the step
written through the process as Δ = ∫_s^t β(r) dr = 2 log(α_s / α_t), is

    x_s = x_t + Δ (½ x_t + ∇ log p_t(x_t)) + √Δ z,   z ~ N(0, I),

and the score comes from the model's noise estimate: ∇ log p_t(x_t) = −ε̂(x_t, t)/σ_t. The
last step, to clean data (α = 1), adds no noise, as DDPM's last step (Ho et al. 2020,
Alg. 2).

The sampler is one step of diffkit's sampling loop (plugin API version 2): the loop
draws the starting noise, walks the grid, calls callbacks and bounds x̂_0; the step
sees the model only as ``ctx.denoise``.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Params, Process, StepContext, StepSamplerBase
from diffkit.sampling import clip_field

VP_TOLERANCE = 1e-6
"""How far α² + σ² may be from 1 at the start of the grid for the process to count as VP."""


class ReverseSDEParams(Params):
    """Euler–Maruyama integration of the reverse-time VP SDE."""

    steps: int | None = Field(
        None, ge=1, description="Number of Euler–Maruyama steps (network evaluations); null takes 1000, at most T."
    )
    spacing: Literal["linspace", "leading", "trailing"] = Field(
        "linspace", description="How the visited times are chosen: evenly in t, or a discrete table's leading/trailing."
    )
    clip_denoised: float | Literal["auto", "dynamic"] | None = clip_field()


class ReverseSDE(StepSamplerBase):
    """x_s = x_t + Δ (½ x_t − ε̂/σ_t) + √Δ z with Δ = 2 log(α_s/α_t)  (Song et al. 2021, Eq. 6 and 11)."""

    name = "reverse-sde"
    default_steps = 1000

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor:
        """The grid of :class:`~diffkit.StepSamplerBase`, on variance-preserving processes only."""
        ts = process.grid(steps, self.params.spacing, start=start)
        a, s = process.alpha_sigma(ts[:1])
        if abs(float(a * a + s * s) - 1.0) > VP_TOLERANCE:
            raise ValueError(
                f"reverse-sde integrates the VP SDE, and {type(process).__name__} is not variance-preserving"
                " (α² + σ² ≠ 1); use a VP schedule (a table, vp, cosine) or another sampler"
            )
        return ts

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        a_t, s_t, a_s, _ = ctx.ends()
        eps = ctx.denoise(x).eps
        delta = 2.0 * math.log(a_s / a_t)
        x = x + delta * (0.5 * x - eps / s_t)
        if ctx.last:
            return x
        return x + math.sqrt(delta) * ctx.noise(x)


def reverse_sde(params: ReverseSDEParams, ctx: BuildContext) -> ReverseSDE:
    return ReverseSDE(params)
