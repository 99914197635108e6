"""Samplers for few steps: ``ddim`` (Song et al. 2021) and ``dpm-solver`` (DPM-Solver++ 2M,
Lu et al. 2022, with its SDE variant).

Both are steps of :func:`diffkit.sampling.run` and work with every process: each update
goes from the visited time t to the next visited one s, and the last from the last
visited time to the clean data (α = 1, σ = 0), so no noise is left in the output. On a
discrete table the grid is 0.1's timesteps (spacing ``linspace``, ``leading``,
``trailing``, ``quadratic``, ``logsnr``, or ``karras``).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import Component, Params, hookimpl
from diffkit.process import Grid, Process
from diffkit.sampling import StepContext, StepSamplerBase, clip_field

DDIM_DEFAULT_STEPS = 50
DPM_SOLVER_DEFAULT_STEPS = 20

Positive = Annotated[float, Field(gt=0)]


class _FewStepParams(Params):
    spacing: Grid | None = Field(
        None,
        description="The grid of noise levels; null takes 'trailing' on a discrete table (it starts at T−1 and spends"
        " every step on noise it can remove, Lin et al. 2024) and otherwise the process's own default for ddim and"
        " 'logsnr' for dpm-solver. 'linspace'"
        " ends on t = 0, a nearly clean step; 'quadratic' (Song et al. 2021), 'logsnr' (Lu et al. 2022) and"
        " 'karras' (Karras et al. 2022) crowd the steps towards the clean end, where sharp data needs them.",
    )
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = clip_field()


class DDIMParams(_FewStepParams):
    """Denoising diffusion implicit models: deterministic for η = 0, DDPM's law for η = 1."""

    eta: float = Field(
        0.0,
        ge=0,
        description="η of Song et al. 2021, Eq. 16: 0 follows the probability-flow path deterministically, 1 adds"
        " the ancestral sampler's noise (σ² = β̃).",
    )
    steps: int | None = Field(
        None,
        ge=1,
        description=f"Number of reverse steps (network evaluations); null takes {DDIM_DEFAULT_STEPS}, or T if fewer.",
    )


class DPMSolverParams(_FewStepParams):
    """DPM-Solver++ (2M): a second-order multistep solver of the diffusion ODE in x_0-prediction form."""

    steps: int | None = Field(
        None,
        ge=1,
        description=f"Number of reverse steps (network evaluations); null takes {DPM_SOLVER_DEFAULT_STEPS},"
        " or T if fewer.",
    )
    order: Literal[1, 2] = Field(
        2, description="2 is DPM-Solver++ 2M; 1 is its first-order step, which equals DDIM with η = 0."
    )
    variant: Literal["ode", "sde"] = Field(
        "ode",
        description="'ode' solves the probability-flow ODE; 'sde' is DPM-Solver++ (2M) SDE, which adds fresh noise"
        " each step (Lu et al. 2022, Sec. 5; as k-diffusion's dpmpp_2m_sde).",
    )


class _FewStep(StepSamplerBase):
    continuous_grid: Grid | None = None  # None: the process's own default

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor:
        spacing = self.params.spacing or ("trailing" if process.discrete else self.continuous_grid)
        return process.grid(steps, spacing, start=start)


class DDIM(_FewStep):
    """x_s = α_s x̂_0 + √(σ_s² − c²) ε̂ + c z with c² = η² σ_s² (1 − e^{λ_t − λ_s}), λ = log α²/σ²
    (Song et al. 2021, Eq. 12 and 16, where on a table c² = η²(1 − ᾱ_s)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_s)).

    With η = 1, c² is DDPM's posterior variance β̃ and the update is the posterior mean
    plus that noise: the ancestral sampler. With η = 0 it is deterministic: Euler's
    method on the probability-flow ODE in σ/α (as ``euler``).
    """

    name = "ddim"
    default_steps = DDIM_DEFAULT_STEPS

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        d = ctx.denoise(x)
        a_t, s_t, a_s, s_s = ctx.ends()
        eta = self.params.eta
        var = 0.0
        if eta > 0 and s_s > 0:
            var = eta**2 * s_s * s_s * -math.expm1(2.0 * (math.log(a_t * s_s) - math.log(a_s * s_t)))
        coef = s_s if var == 0.0 else math.sqrt(max(s_s * s_s - var, 0.0))
        x = torch.add(d.x0 * a_s, d.eps, alpha=coef)
        if var > 0:
            x = x.add_(ctx.noise(x), alpha=math.sqrt(var))
        return x


class DPMSolver(_FewStep):
    """DPM-Solver++ 2M (Lu et al. 2022, "DPM-Solver++", Alg. 2), on the data prediction x̂_0.

    With λ = log(α/σ) and h = λ_s − λ_t, one step from t to s is

        x_s = (σ_s/σ_t) e^{−ηh} x_t + α_s (1 − e^{−(1+η)h}) D + σ_s √(1 − e^{−2ηh}) z,

    η = 0 for the ODE (Alg. 2) and 1 for the SDE variant; D = x̂_0(x_t) for the first
    step and after it D = (1 + 1/(2r)) x̂_0(x_t) − 1/(2r) x̂_0(x_{t'}), r = h'/h, from the
    previous step t' → t of size h'. The last step lands on the clean data (σ_s = 0,
    h = ∞) and so is x̂_0 itself. One network evaluation per step.
    """

    name = "dpm-solver"
    default_steps = DPM_SOLVER_DEFAULT_STEPS
    continuous_grid = "logsnr"  # its steps are uniform in λ (Lu et al. 2022, Sec. 3.3)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        p = self.params
        x0 = ctx.denoise(x).x0
        if ctx.last:
            return x0
        a_t, s_t, a_s, s_s = ctx.ends()
        h = (math.log(a_s) - math.log(s_s)) - (math.log(a_t) - math.log(s_t))
        mem = ctx.memory
        d = x0
        if p.order == 2 and "x0" in mem:
            # (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0' = x̂_0 + (x̂_0' − x̂_0)·(−1/(2r)), r = h'/h
            d = torch.lerp(x0, mem["x0"], -h / (2.0 * mem["h"]))
        eta = 1.0 if p.variant == "sde" else 0.0
        coef = a_s * -math.expm1(-(1.0 + eta) * h)  # α_s (1 − e^{−(1+η)h})
        x = d.mul(coef).add_(x, alpha=s_s / s_t * math.exp(-eta * h))
        if eta > 0:
            x = x.add_(ctx.noise(x), alpha=s_s * math.sqrt(-math.expm1(-2.0 * h)))
        mem["x0"], mem["h"] = x0, h
        return x


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component(
            "ddim",
            lambda p, ctx: DDIM(p),
            DDIMParams,
            "DDIM (Song et al. 2021): deterministic for η = 0, ancestral for η = 1; any steps ≤ T.",
        ),
        Component(
            "dpm-solver",
            lambda p, ctx: DPMSolver(p),
            DPMSolverParams,
            "DPM-Solver++ 2M (Lu et al. 2022): second-order multistep solver for 10–25 steps, ODE or SDE.",
        ),
    ]
