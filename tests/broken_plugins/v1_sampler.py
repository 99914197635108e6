"""Sampling by Euler–Maruyama steps of the reverse-time SDE (Song et al. 2021).

diffkit's schedules are the variance-preserving (VP) SDE of Song et al. 2021, Eq. 11,

    dx = −½ β(t) x dt + √β(t) dw,   with ᾱ(t) = exp(−∫_0^t β(r) dr),

whose reverse in time (Anderson 1982; Song et al. 2021, Eq. 6) is

    dx = [f(x, t) − g(t)² ∇_x log p_t(x)] dt + g(t) dw̄,   f = −½ β(t) x,  g² = β(t).

One Euler–Maruyama step from diffusion time t back to s < t, with the integral of β over
the step written through the schedule as Δ = ∫_s^t β(r) dr = log(ᾱ_s / ᾱ_t), is

    x_s = x_t + Δ (½ x_t + ∇ log p_t(x_t)) + √Δ z,   z ~ N(0, I),

and the score comes from the noise prediction: ∇ log p_t(x_t) = −ε̂(x_t, t)/σ_t
(:func:`diffkit.diffusion.eps_to_score`). The last step, to clean data (ᾱ = 1), adds no
noise, as DDPM's last step (Ho et al. 2020, Alg. 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Params, Predict, Schedule, StepCallback
from diffkit import diffusion as D


class ReverseSDEParams(Params):
    """Euler–Maruyama integration of the reverse-time VP SDE."""

    steps: int | None = Field(
        None, ge=1, description="Number of Euler–Maruyama steps (network evaluations); null takes all T."
    )
    spacing: Literal["linspace", "leading", "trailing"] = Field(
        "linspace", description="How the visited timesteps are chosen when steps < T."
    )


class ReverseSDE:
    """x_s = x_t + Δ (½ x_t − ε̂/σ_t) + √Δ z with Δ = log(ᾱ_s/ᾱ_t)  (Song et al. 2021, Eq. 6 and 11)."""

    def __init__(self, params: ReverseSDEParams) -> None:
        self.params = params

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
        if x_start is None:
            x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        else:
            x = x_start.to(device=device, dtype=dtype)
        x = _report(callback, ts[0], x)
        for i, t in enumerate(ts):
            s = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
            delta = math.log(a_s / a_t)
            t_vec = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            score = D.eps_to_score(predict(x, t_vec), schedule.alpha_bar(t_vec, x))
            x = x + delta * (0.5 * x + score)
            if s >= 0:
                z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                x = x + math.sqrt(delta) * z
            x = _report(callback, s, x)
        return x


def _report(callback: StepCallback | None, t: int, x: Tensor) -> Tensor:
    """Show the state to the callback; a tensor it returns replaces the state."""
    new = None if callback is None else callback(t, x)
    return x if new is None else new


def reverse_sde(params: ReverseSDEParams, ctx: BuildContext) -> ReverseSDE:
    return ReverseSDE(params)


# -- the plugin: the 0.1 template's reverse-SDE sampler, as it was published ----------------
from diffkit import Component, hookimpl  # noqa: E402

DIFFKIT_API_VERSION = 1


@hookimpl
def diffkit_samplers():
    return [Component("reverse-sde-v1", reverse_sde, ReverseSDEParams, "The 0.1 template's reverse-SDE loop.")]
