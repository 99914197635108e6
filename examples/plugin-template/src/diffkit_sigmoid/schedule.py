"""The sigmoid noise schedule (Chen 2023, "On the Importance of Noise Scheduling for
Diffusion Models", Alg. 1)."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from diffkit import BuildContext, Params, Schedule

MIN_BETA = 1e-10
"""Floor of β_t: where the sigmoid saturates in float64 (steep τ, wide range) two values of γ
coincide, and every step must still add some noise for ᾱ to decrease strictly."""


class SigmoidParams(Params):
    """ᾱ follows a rescaled sigmoid: it stays near 1 longer, then falls faster, than the linear schedule."""

    timesteps: int = Field(1000, ge=2, le=100_000, description="Number of diffusion steps T.")
    start: float = Field(-3.0, ge=-20, le=20, description="Left end of the sigmoid's input range.")
    end: float = Field(3.0, ge=-20, le=20, description="Right end of the sigmoid's input range.")
    tau: float = Field(1.0, ge=0.05, le=10, description="Temperature τ: smaller values make the fall of ᾱ steeper.")
    max_beta: float = Field(0.999, ge=0.01, lt=1, description="β_t is clipped to at most this, so that ᾱ_(T−1) > 0.")

    @model_validator(mode="after")
    def _ordered(self) -> SigmoidParams:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


def sigmoid(params: SigmoidParams, ctx: BuildContext) -> Schedule:
    """γ(u) = (S(e/τ) − S((u(e − s) + s)/τ)) / (S(e/τ) − S(s/τ)) for u ∈ [0, 1], S the logistic
    sigmoid (Chen 2023, Alg. 1), read at u = (t + 1)/T as ᾱ_t; β_t = 1 − ᾱ_t/ᾱ_(t−1) with
    ᾱ_(−1) = γ(0) = 1, clipped to [MIN_BETA, max_beta] as Nichol & Dhariwal 2021 clip the
    cosine schedule (Eq. 17)."""
    s, e, tau = params.start, params.end, params.tau
    u = torch.linspace(0.0, 1.0, params.timesteps + 1, dtype=torch.float64)
    v_start, v_end = torch.sigmoid(torch.tensor([s / tau, e / tau], dtype=torch.float64)).tolist()
    gamma = (v_end - torch.sigmoid((u * (e - s) + s) / tau)) / (v_end - v_start)
    betas = (1.0 - gamma[1:] / gamma[:-1]).clamp(min=MIN_BETA, max=params.max_beta)
    return Schedule.from_betas(betas)
