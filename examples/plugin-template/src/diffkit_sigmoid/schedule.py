"""The sigmoid noise schedule (Chen 2023, "On the Importance of Noise Scheduling for
Diffusion Models", Alg. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from diffkit import BuildContext, Params, Schedule

MIN_RANGE = 0.1
"""Narrowest input range of the sigmoid: over a narrower one S is a straight line to
rounding, and the normalisation of γ divides by almost nothing."""
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
        if self.end - self.start < MIN_RANGE:
            raise ValueError(f"end ({self.end}) must exceed start ({self.start}) by at least {MIN_RANGE}")
        return self


def sigmoid(params: SigmoidParams, ctx: BuildContext) -> Schedule:
    """γ(u) = (S(e/τ) − S(x_u)) / (S(e/τ) − S(s/τ)), x_u = (u(e − s) + s)/τ, for u ∈ [0, 1] and S
    the logistic sigmoid (Chen 2023, Alg. 1), read at u = (t + 1)/T as ᾱ_t; β_t = 1 − ᾱ_t/ᾱ_(t−1)
    with ᾱ_(−1) = γ(0) = 1, clipped to [MIN_BETA, max_beta] as Nichol & Dhariwal 2021 clip the
    cosine schedule (Eq. 17).

    In float64 S rounds to 1 beyond x ≈ 37, so γ is formed in log space from the identity
    S(a) − S(b) = S(a) S(−b) (1 − e^(b − a)):  log γ(u) = log S(−x_u) + log(1 − e^(x_u − e/τ)) + c,
    where the constant c cancels in the ratios ᾱ_t/ᾱ_(t−1) = exp(log γ_t − log γ_(t−1))."""
    u = torch.linspace(0.0, 1.0, params.timesteps + 1, dtype=torch.float64)
    x = (u * (params.end - params.start) + params.start) / params.tau
    # x_1 may round past e/τ; γ(1) = 0 whichever way it rounds
    log_gamma = F.logsigmoid(-x) + torch.log(-torch.expm1((x - params.end / params.tau).clamp(max=0.0)))
    betas = (-torch.expm1(log_gamma[1:] - log_gamma[:-1])).clamp(min=MIN_BETA, max=params.max_beta)
    return Schedule.from_betas(betas)
