"""An EDM-style σ-grid schedule whose ρ has no bounds in its Params model: ρ = 0 divides by zero."""
import torch
from pydantic import Field

from diffkit import Component, Params, Schedule, hookimpl

DIFFKIT_API_VERSION = 2


class RhoParams(Params):
    timesteps: int = Field(100, ge=2, le=10_000, description="Number of steps T.")
    rho: float = Field(7.0, description="Exponent ρ of the σ grid (unbounded: the planted bug).")


def rho_table(p: RhoParams, ctx):
    """σ_i = (σ_max^{1/ρ} + i/(T−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, Eq. 5), as a VP table."""
    inv = 1.0 / p.rho
    ramp = torch.linspace(1, 0, p.timesteps, dtype=torch.float64)
    sigma = (0.002**inv + ramp * (80.0**inv - 0.002**inv)) ** p.rho
    return Schedule(1.0 / (1.0 + sigma.square()))


@hookimpl
def diffkit_schedules():
    return [Component("rho-table", rho_table, RhoParams, "A VP table from the EDM σ grid.")]
