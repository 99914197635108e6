"""Samplers for few steps: ``ddim`` (Song et al. 2021) and ``dpm-solver`` (DPM-Solver++ 2M,
Lu et al. 2022).

Both walk the timesteps of :meth:`diffkit.Schedule.timesteps` (any number of steps
≤ T, spacing ``linspace``, ``leading``, ``trailing``, ``quadratic`` or ``logsnr``); each update goes from the
visited timestep t to the next visited one s, and the last from the last visited
timestep to the clean data (ᾱ_s = 1), so no noise is left in the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from diffkit import ClipDenoised, Component, Params, Predict, Schedule, Spacing, StepCallback, hookimpl, initial_state, report
from diffkit import diffusion as D

DDIM_DEFAULT_STEPS = 50
DPM_SOLVER_DEFAULT_STEPS = 20


class _FewStepParams(Params):
    spacing: Spacing = Field(
        "trailing",
        description="How the visited timesteps are chosen when steps < T: 'trailing' starts at T−1 and spends every"
        " step on noise it can remove (Lin et al. 2024); 'linspace' ends on t = 0, a nearly clean step; 'quadratic'"
        " (Song et al. 2021) and 'logsnr' (Lu et al. 2022) crowd the steps towards the clean end, where sharp data"
        " needs them ('logsnr' spends several steps at the very start of the cosine schedule, whose last SNRs are"
        " tiny).",
    )
    clip_denoised: ClipDenoised = "auto"


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


class DDIM:
    """x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z,
    σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s)  (Song et al. 2021, Eq. 12 and 16).

    s is the next visited timestep (ᾱ_s = 1 after the last). With η = 1, σ² is DDPM's
    posterior variance β̃ and the update is the posterior mean plus that noise: the
    ancestral sampler, drawing the same noise from the same generator. With η = 0 it is
    deterministic: a first-order solver of the probability-flow ODE.
    """

    def __init__(self, params: DDIMParams) -> None:
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
        steps = steps or p.steps or min(schedule.T, DDIM_DEFAULT_STEPS)
        ts = schedule.timesteps(steps, p.spacing, start=t_start)
        abar = schedule.alphas_cumprod.tolist()
        x = initial_state(shape, generator=generator, device=device, dtype=dtype, x_start=x_start)
        n = x.shape[0]
        x = report(callback, ts[0], x)
        for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress, leave=False)):
            s = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_s = abar[t], (abar[s] if s >= 0 else 1.0)
            t_b = torch.full((n,), t, device=device, dtype=torch.long)
            eps = predict(x, t_b)
            x0 = D.eps_to_x0(eps, x, schedule.alpha_bar(t_b, x))
            var = p.eta**2 * (1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)
            x = torch.add(x0.mul_(math.sqrt(a_s)), eps, alpha=math.sqrt(max(1.0 - a_s - var, 0.0)))
            if var > 0:
                z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                x = x.add_(z, alpha=math.sqrt(var))
            x = report(callback, s, x)
        return x


class DPMSolver:
    """DPM-Solver++ 2M (Lu et al. 2022, "DPM-Solver++", Alg. 2), on the data prediction x̂_0.

    With α = √ᾱ, σ = √(1 − ᾱ), λ = log(α/σ) and h = λ_s − λ_t, one step from t to s is

        x_s = (σ_s/σ_t) x_t + α_s (1 − e^{−h}) D,

    D = x̂_0(x_t) for the first step (DPM-Solver++ 1, i.e. DDIM with η = 0) and after it
    D = (1 + 1/(2r)) x̂_0(x_t) − 1/(2r) x̂_0(x_{t'}), r = h'/h, from the previous step
    t' → t of size h'. The last step lands on the clean data (σ_s = 0, h = ∞) and so
    takes the first-order step, x_s = x̂_0(x_t). One network evaluation per step.
    """

    def __init__(self, params: DPMSolverParams) -> None:
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
        steps = steps or p.steps or min(schedule.T, DPM_SOLVER_DEFAULT_STEPS)
        ts = schedule.timesteps(steps, p.spacing, start=t_start)
        abar = schedule.alphas_cumprod.tolist()
        x = initial_state(shape, generator=generator, device=device, dtype=dtype, x_start=x_start)
        n = x.shape[0]
        x = report(callback, ts[0], x)
        x0_prev: Tensor | None = None
        h_prev = 0.0
        for i, t in enumerate(tqdm(ts, desc="dpm-solver", disable=not progress, leave=False)):
            s = ts[i + 1] if i + 1 < len(ts) else -1
            t_b = torch.full((n,), t, device=device, dtype=torch.long)
            x0 = D.eps_to_x0(predict(x, t_b), x, schedule.alpha_bar(t_b, x))
            if s < 0:  # σ_s = 0: the step lands on x̂_0 itself
                x = x0
            else:
                a_t, a_s = abar[t], abar[s]
                lam_t = 0.5 * math.log(a_t / (1.0 - a_t))
                lam_s = 0.5 * math.log(a_s / (1.0 - a_s))
                h = lam_s - lam_t
                d = x0
                if p.order == 2 and x0_prev is not None:
                    # (1 + 1/(2r)) x̂_0 − 1/(2r) x̂_0' = x̂_0 + (x̂_0' − x̂_0)·(−1/(2r)), r = h'/h
                    d = torch.lerp(x0, x0_prev, -h / (2.0 * h_prev))
                coef = math.sqrt(a_s) * -math.expm1(-h)  # α_s (1 − e^{−h})
                x = d.mul(coef).add_(x, alpha=math.sqrt((1.0 - a_s) / (1.0 - a_t)))
                x0_prev, h_prev = x0, h
            x = report(callback, s, x)
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
            "DPM-Solver++ 2M (Lu et al. 2022): second-order multistep ODE solver for 10–25 steps.",
        ),
    ]
