"""Samplers in continuous time: ``euler``, ``heun``, ``euler-ancestral``, ``sde`` and ``ode``.

Each is a step of :func:`diffkit.sampling.run` and works with every process and
objective. The deterministic ones integrate the probability-flow ODE (Song et al.
2021, Eq. 13). ``euler``, ``heun`` and ``euler-ancestral`` work in σ̃ = σ/α, on
y = x/α, where the ODE reads dy/dσ̃ = ε̂ (Karras et al. 2022, Eq. 4 with s = α).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Component, Params, hookimpl
from diffkit.process import CLEAN_END_SIGMA_TILDE, Grid, Process
from diffkit.sampling import StepContext, StepSamplerBase, clip_field, spacing_field, steps_field

Positive = Annotated[float, Field(gt=0)]


class _StepParams(Params):
    steps: int | None = steps_field(None)
    spacing: Grid | None = spacing_field()
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = clip_field()


# -- euler ------------------------------------------------------------------------------------
class EulerParams(_StepParams):
    """Euler's method on the probability-flow ODE."""

    steps: int | None = steps_field(50)


class Euler(StepSamplerBase):
    """y_s = y_t + (σ̃_s − σ̃_t)·ε̂(x_t, t), x = α·y (Karras et al. 2022, Alg. 1 without its
    second-order correction). Algebraically DDIM with η = 0 (Song et al. 2021, Eq. 13)."""

    name = "euler"
    default_steps = 50

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        d = ctx.denoise(x)
        a_t, s_t, a_s, s_s = ctx.ends()
        if ctx.last:
            return d.x0
        return (x / a_t + (s_s / a_s - s_t / a_t) * d.eps) * a_s


# -- heun (EDM) ---------------------------------------------------------------------------------
class HeunParams(_StepParams):
    """Heun's second-order method with EDM's stochastic churn (Karras et al. 2022, Alg. 2)."""

    steps: int | None = steps_field(18)
    s_churn: float = Field(0.0, ge=0, description="S_churn: total noise added back (0: deterministic, Alg. 1).")
    s_tmin: float = Field(0.0, ge=0, description="S_tmin: churn only where σ̃ ≥ this.")
    s_tmax: float | None = Field(None, ge=0, description="S_tmax: churn only where σ̃ ≤ this; null: no upper limit.")
    s_noise: float = Field(1.0, gt=0, description="S_noise: scale of the noise added back (slightly above 1 in EDM).")


def _times(y: Tensor, a: float) -> Tensor:
    return y if a == 1.0 else y * a


class Heun(StepSamplerBase):
    """EDM's sampler (Karras et al. 2022, Alg. 2) in σ̃ = σ/α on y = x/α: raise the noise to
    σ̂ = (1 + γ)σ̃_t with γ = min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], take an Euler step
    to σ̃_s and correct it with the slope there (the trapezoidal rule), except on the last
    step into the clean data. 2N − 1 evaluations for N steps."""

    name = "heun"
    default_steps = 18

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        p = self.params
        a_t, s_t = ctx.alpha_sigma(ctx.t)
        sig_t = s_t / a_t
        y = x if a_t == 1.0 else x / a_t  # (α = 1 on EDM's process: no work)
        s_tmax = math.inf if p.s_tmax is None else p.s_tmax
        gamma = min(p.s_churn / ctx.n, math.sqrt(2.0) - 1.0) if p.s_tmin <= sig_t <= s_tmax else 0.0
        t_hat, sig_hat = ctx.t, sig_t
        if gamma > 0:
            t_hat = ctx.time_of_sigma_tilde(sig_t * (1.0 + gamma))
            sig_hat = ctx.sigma_tilde(t_hat)
            if sig_hat > sig_t:
                y = y + math.sqrt(sig_hat**2 - sig_t**2) * p.s_noise * ctx.noise(y)
            else:
                t_hat, sig_hat = ctx.t, sig_t
        a_hat = ctx.alpha_sigma(t_hat)[0]
        d = ctx.denoise(_times(y, a_hat), t_hat).eps
        a_s, s_s = ctx.alpha_sigma(ctx.s)
        sig_s = s_s / a_s
        y_next = y + (sig_s - sig_hat) * d
        if not ctx.last:
            d2 = ctx.denoise(_times(y_next, a_s), ctx.s).eps
            y_next = y + (sig_s - sig_hat) * 0.5 * (d + d2)
        return _times(y_next, a_s)


# -- euler-ancestral ----------------------------------------------------------------------------
class EulerAncestralParams(_StepParams):
    """Euler steps down to σ_down, then fresh noise up to σ̃_s."""

    steps: int | None = steps_field(50)
    eta: float = Field(1.0, ge=0, le=1, description="η: 1 adds the ancestral sampler's noise, 0 is euler.")
    s_noise: float = Field(1.0, gt=0, description="Scale of the noise added back.")


class EulerAncestral(StepSamplerBase):
    """σ_up = min(σ̃_s, η σ̃_s √(1 − σ̃_s²/σ̃_t²)), σ_down = √(σ̃_s² − σ_up²);
    y_s = y_t + (σ_down − σ̃_t) ε̂ + σ_up z, x = α·y (k-diffusion's ancestral step; with
    η = 1 the law of DDPM's posterior, Ho et al. 2020, Eq. 7)."""

    name = "euler-ancestral"
    default_steps = 50

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        d = ctx.denoise(x)
        if ctx.last:
            return d.x0
        a_t, s_t, a_s, s_s = ctx.ends()
        sig_t, sig_s = s_t / a_t, s_s / a_s
        up = min(sig_s, self.params.eta * sig_s * math.sqrt(max(1.0 - (sig_s / sig_t) ** 2, 0.0)))
        down = math.sqrt(max(sig_s**2 - up**2, 0.0))
        y = x / a_t + (down - sig_t) * d.eps
        if up > 0:
            y = y + up * self.params.s_noise * ctx.noise(y)
        return y * a_s


# -- reverse SDE, Euler–Maruyama ------------------------------------------------------------------
class SDEParams(_StepParams):
    """Euler–Maruyama on the reverse-time SDE."""

    steps: int | None = steps_field(500)


class SDE(StepSamplerBase):
    """dx = [f x − g² ∇log p_t(x)] dt + g dw̄ integrated backward with Euler–Maruyama
    (Song et al. 2021, Eq. 6), ∇log p = −ε̂/σ; the last step returns x̂_0 (the noise-free
    denoising step of Song et al. 2021, App. G)."""

    name = "sde"
    default_steps = 500

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        d = ctx.denoise(x)
        if ctx.last:
            return d.x0
        _, s_t = ctx.alpha_sigma(ctx.t)
        f, g2 = ctx.drift_diffusion(ctx.t)
        dt = ctx.s - ctx.t  # negative: backward in time
        score = d.eps * (-1.0 / s_t)
        x = x + (f * x - g2 * score) * dt
        return x + math.sqrt(max(g2 * -dt, 0.0)) * ctx.noise(x)


# -- probability-flow ODE, adaptive ----------------------------------------------------------------
class ODEParams(Params):
    """The probability-flow ODE with an adaptive Runge–Kutta solver (torchdiffeq)."""

    method: Literal["dopri5", "bosh3", "adaptive_heun", "dopri8"] = Field(
        "dopri5", description="torchdiffeq's adaptive method (dopri5: Dormand–Prince 5(4))."
    )
    rtol: float = Field(1e-5, gt=0, lt=1, description="Relative tolerance of the solver.")
    atol: float = Field(1e-5, gt=0, lt=1, description="Absolute tolerance of the solver.")
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = Field(
        None,
        description="What is done to x̂_0 while integrating; null (the default) keeps the ODE smooth, as the"
        " exact flow needs; 'auto', a number or 'dynamic' bound it as the other samplers do.",
    )


class ODE(StepSamplerBase):
    """dx/dt = α'(t) x̂_0 + σ'(t) ε̂ (the probability-flow ODE of Song et al. 2021, Eq. 13,
    written with x_t = α x̂_0 + σ ε̂) from t_max to t_min with an adaptive solver, then the
    denoising step to x̂_0. ``steps`` does not apply: the solver chooses its own."""

    name = "ode"
    default_steps = 1

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor:
        hi = process.t_max if start is None else float(start)
        lo = min(process.t_min, hi)
        if lo == process.t_clean:  # σ(t_min) = 0 (rectified flow): stop where ε̂ is still defined
            lo = float(process.t_of_sigma_tilde(torch.tensor(CLEAN_END_SIGMA_TILDE, dtype=torch.float64)))
        return torch.tensor([hi, lo, process.t_clean], dtype=torch.float64)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        if ctx.last:  # the jump from t_min to the clean data
            return ctx.denoise(x).x0
        from torchdiffeq import odeint

        lo, hi = min(ctx.s, ctx.t), max(ctx.s, ctx.t)

        def velocity(t: Tensor, y: Tensor) -> Tensor:
            tf = min(max(float(t), lo), hi)
            d = ctx.denoise(y, tf)
            da, ds = ctx.derivatives(tf)
            return da * d.x0 + ds * d.eps

        times = torch.tensor([ctx.t, ctx.s], dtype=torch.float64, device=x.device).to(x.dtype)
        p = self.params
        return odeint(velocity, x, times, method=p.method, rtol=p.rtol, atol=p.atol)[-1]


def _factory(cls: type[StepSamplerBase]):
    def build(params: Params, ctx: BuildContext) -> StepSamplerBase:
        return cls(params)

    return build


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component("euler", _factory(Euler), EulerParams, "Euler on the probability-flow ODE (Karras et al. 2022)."),
        Component("heun", _factory(Heun), HeunParams, "EDM's Heun sampler with churn (Karras et al. 2022, Alg. 2)."),
        Component(
            "euler-ancestral",
            _factory(EulerAncestral),
            EulerAncestralParams,
            "Euler steps with ancestral noise (k-diffusion).",
        ),
        Component("sde", _factory(SDE), SDEParams, "Reverse-time SDE, Euler–Maruyama (Song et al. 2021)."),
        Component("ode", _factory(ODE), ODEParams, "Probability-flow ODE, adaptive solver (Song et al. 2021)."),
    ]

