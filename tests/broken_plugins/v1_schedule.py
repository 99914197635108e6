"""A plugin written for plugin API version 1: discrete tables given as ᾱ and as β."""
import math

import torch
from pydantic import Field

from diffkit import Component, Params, Schedule, hookimpl

DIFFKIT_API_VERSION = 1


class TableParams(Params):
    timesteps: int = Field(200, ge=2, le=10_000, description="Number of diffusion steps T.")


def cosine_abar(p: TableParams, ctx) -> Schedule:
    """ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008 (Nichol & Dhariwal 2021, Eq. 17)."""
    t = torch.arange(1, p.timesteps + 1, dtype=torch.float64) / p.timesteps
    f = torch.cos((t + 0.008) / 1.008 * math.pi / 2).square() / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    return Schedule(f.clamp(min=1e-5, max=1 - 1e-7))


def linear_beta(p: TableParams, ctx) -> Schedule:
    """β_t = linspace(1e-4, 0.02·1000/T) (Ho et al. 2020, Sec. 4, scaled to T)."""
    return Schedule.from_betas(torch.linspace(1e-4, min(0.02 * 1000 / p.timesteps, 0.5), p.timesteps, dtype=torch.float64))


@hookimpl
def diffkit_schedules():
    return [
        Component("old-cosine", cosine_abar, TableParams, "Cosine ᾱ table (0.1 plugin)."),
        Component("old-linear", linear_beta, TableParams, "Linear β table (0.1 plugin)."),
    ]
