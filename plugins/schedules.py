"""Noise schedules: ``linear`` (Ho et al. 2020) and ``cosine`` (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from diffkit import BuildContext, Component, Params, Schedule, hookimpl


class LinearParams(Params):
    """β_t rising linearly from ``beta_start`` to ``beta_end`` over ``timesteps`` steps."""

    timesteps: int = Field(1000, ge=2, le=100_000, description="Number of diffusion steps T.")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="β_1, the first step's noise variance.")
    beta_end: float = Field(0.02, gt=0, lt=1, description="β_T, the last step's noise variance.")

    @model_validator(mode="after")
    def _ordered(self) -> LinearParams:
        if self.beta_start > self.beta_end:
            raise ValueError(
                f"beta_start ({self.beta_start}) must not exceed beta_end ({self.beta_end}); swap them"
            )
        return self


def linear(params: LinearParams, ctx: BuildContext) -> Schedule:
    """β_t = linspace(β_1, β_T, T)  (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T = 1000)."""
    betas = torch.linspace(params.beta_start, params.beta_end, params.timesteps, dtype=torch.float64)
    return Schedule.from_betas(betas)


class CosineParams(Params):
    """ᾱ_t following a squared cosine, which destroys information more slowly than the linear schedule."""

    timesteps: int = Field(1000, ge=2, le=100_000, description="Number of diffusion steps T.")
    s: float = Field(0.008, ge=0, le=1, description="Offset that keeps β_t from being too small near t = 0.")
    max_beta: float = Field(0.999, gt=0, lt=1, description="β_t is clipped to at most this, avoiding a singularity at t = T.")


def cosine(params: CosineParams, ctx: BuildContext) -> Schedule:
    """ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)); β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta)
    (Nichol & Dhariwal 2021, Eq. 17)."""
    T, s = params.timesteps, params.s
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = (1 - abar[1:] / abar[:-1]).clamp(min=0.0, max=params.max_beta)
    return Schedule.from_betas(betas)


@hookimpl
def diffkit_schedules() -> list[Component]:
    return [
        Component("linear", linear, LinearParams, "Linear β schedule (Ho et al. 2020)."),
        Component("cosine", cosine, CosineParams, "Cosine ᾱ schedule (Nichol & Dhariwal 2021)."),
    ]
