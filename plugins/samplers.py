"""Samplers of the reverse process: ``ddpm`` (ancestral sampling)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field
from torch import Tensor

from diffkit import Component, Params, hookimpl
from diffkit.process import Grid
from diffkit.sampling import StepContext, StepSamplerBase, clip_field, spacing_field

Positive = Annotated[float, Field(gt=0)]


class DDPMParams(Params):
    """Ancestral sampling: one step of p_θ(x_s | x_t) at a time."""

    variance: Literal["posterior", "beta"] = Field(
        "posterior",
        description="σ² of each step: 'posterior' is β̃ (exact for a point mass x_0), 'beta' is β (exact for"
        " x_0 ~ N(0, I)); Ho et al. 2020, Sec. 3.2.",
    )
    steps: int | None = Field(
        None, ge=1, description="Number of reverse steps; null takes all T of a table (1000 on a continuous process)."
    )
    spacing: Grid | None = spacing_field()
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = clip_field()


class DDPM(StepSamplerBase):
    """x_s ~ q(x_s | x_t, x̂_0) = N(c_0 x̂_0 + c_t x_t, σ² I) (Ho et al. 2020, Alg. 2 and Eq. 7),
    for any process: with α_{t|s} = α_t/α_s and σ²_{t|s} = σ_t² − α_{t|s}² σ_s²
    (Kingma et al. 2021, Eq. 27–29),

        c_0 = α_s σ²_{t|s}/σ_t²,   c_t = α_{t|s} σ_s²/σ_t²,   β̃ = σ²_{t|s} σ_s²/σ_t².

    On a table with all T steps this is Alg. 2 as written (β_{t|s} = σ²_{t|s}); with fewer
    the chain is respaced (Nichol & Dhariwal 2021, Sec. 4). No noise on the last step.
    """

    name = "ddpm"
    default_steps = 1000

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        d = ctx.denoise(x)
        if ctx.last:
            return d.x0
        a_t, s_t, a_s, s_s = ctx.ends()
        alpha_ts = a_t / a_s
        var_ts = s_t * s_t - alpha_ts * alpha_ts * s_s * s_s
        c0 = a_s * var_ts / (s_t * s_t)
        ct = alpha_ts * s_s * s_s / (s_t * s_t)
        var = var_ts if self.params.variance == "beta" else var_ts * s_s * s_s / (s_t * s_t)
        x = (d.x0 * c0).add_(x, alpha=ct)
        return x.add_(ctx.noise(x), alpha=math.sqrt(max(var, 0.0)))


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [Component("ddpm", lambda p, ctx: DDPM(p), DDPMParams, "Ancestral DDPM sampling (Ho et al. 2020, Alg. 2).")]
