"""Training objectives: what the network predicts.

``epsilon`` (the noise ε, Ho et al. 2020), ``x0`` (the clean data), ``v``
(v = α ε − σ x_0, Salimans & Ho 2022), ``flow`` (the path's velocity, ε − x_0 for
rectified flow) and ``edm`` (Karras et al. 2022's preconditioned F). ``epsilon``, ``x0`` and ``v`` Every one takes ``min_snr_gamma``
for min-SNR-γ loss weighting (Hang et al. 2023); the conversions between the targets
are those of :mod:`diffkit.diffusion`.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Component, Objective, Params, Schedule, hookimpl
from diffkit import diffusion as D
from diffkit.process import TIME, Process, known_alpha_sigma, log_normal_sigma
from diffkit.sampling import Denoised


class _ObjectiveParams(Params):
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-γ loss weighting (Hang et al. 2023): clamp the x_0-space weight SNR(t) at γ"
        " (5 in the paper); null weights every timestep alike.",
    )


class EpsilonParams(_ObjectiveParams):
    """The network predicts the noise ε that was added to x_0."""


class X0Params(_ObjectiveParams):
    """The network predicts the clean data x_0."""


class VParams(_ObjectiveParams):
    """The network predicts the velocity v = √ᾱ_t ε − √(1−ᾱ_t) x_0."""


def _ab(process: Process, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """α(t), σ(t) broadcast against ``like`` in its dtype (computed in float64 first)."""
    a, s = process.coefficients(t, like)
    return a.to(like.dtype), s.to(like.dtype)


class Epsilon(Objective):
    """L_simple = E ‖ε − ε_θ(α x_0 + σ ε, t)‖²  (Ho et al. 2020, Eq. 14)."""

    parameterization = "eps"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        return eps

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        return output


class X0(Objective):
    """E ‖x_0 − x̂_θ(x_t, t)‖²: the network denoises directly (Ho et al. 2020, Sec. 3.2
    discusses this parameterisation; Karras et al. 2022 train the denoiser D this way);
    ε̂ = (x_t − α x̂_0)/σ."""

    parameterization = "x0"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        return x0

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        if isinstance(process, Schedule) and not torch.as_tensor(t).is_floating_point():
            return output, D.x0_to_eps(output, x_t, process.alpha_bar(t, x_t))
        a, s = _ab(process, t, x_t)
        return output, (x_t - a * output) / s


class V(Objective):
    """E ‖v − v̂_θ(x_t, t)‖² with v = α ε − σ x_0  (Salimans & Ho 2022, Sec. 4, there with
    α² + σ² = 1). For any process x̂_0 = (α x_t − σ v̂)/(α² + σ²) and
    ε̂ = (σ x_t + α v̂)/(α² + σ²).

    v stays well scaled at both ends of the schedule, where ε-prediction (near t = T)
    and x_0-prediction (near t = 0) make the other quantity ill-conditioned.
    """

    parameterization = "v"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        a, s = _ab(schedule, t, x0)
        return a * eps - s * x0

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        if isinstance(process, Schedule) and not torch.as_tensor(t).is_floating_point():
            abar = process.alpha_bar(t, x_t)  # the 0.1 formulas, bit for bit
            return D.v_to_x0(output, x_t, abar), D.v_to_eps(output, x_t, abar)
        a, s = process.coefficients(t, x_t)
        det = a * a + s * s
        a, s = (a / det).to(x_t.dtype), (s / det).to(x_t.dtype)
        return a * x_t - s * output, s * x_t + a * output


class FlowParams(Params):
    """The network predicts the velocity of the path: v = α'(t) x_0 + σ'(t) ε (ε − x_0 for rectified flow)."""


class Flow(Objective):
    """Conditional flow matching: E ‖v − v_θ(x_t, t)‖² with v = dx_t/dt = α' x_0 + σ' ε, which is
    ε − x_0 on the rectified-flow path (Liu et al. 2022, Eq. 1; Lipman et al. 2023, Eq. 23).
    Solving [x_t, v] = [[α, σ], [α', σ']]·[x_0, ε] with det = ασ' − σα':
    x̂_0 = (σ' x_t − σ v̂)/det, ε̂ = (α v̂ − α' x_t)/det."""

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        da, ds = _derivatives(schedule, t, x0)
        return da * x0 + ds * eps

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        known, time = known_alpha_sigma(t), getattr(t, TIME, None)
        if known is not None and time is not None:  # the loop's time: the same solve on floats
            a, s = known
            da, ds = (float(v) for v in process.derivatives(torch.tensor(time, dtype=torch.float64)))
            det = a * ds - s * da
            return x_t * (ds / det) - output * (s / det), output * (a / det) - x_t * (da / det)
        a, s = process.coefficients(t, x_t)
        da, ds = _derivatives(process, t, x_t, cast=False)
        det = a * ds - s * da
        dt = x_t.dtype
        x0 = (ds / det).to(dt) * x_t - (s / det).to(dt) * output
        eps = (a / det).to(dt) * output - (da / det).to(dt) * x_t
        return x0, eps


def _derivatives(process: Process, t: Tensor, like: Tensor, cast: bool = True) -> tuple[Tensor, Tensor]:
    """α'(t), σ'(t) broadcast against ``like`` (in its dtype unless ``cast`` is False)."""
    da, ds = process.derivatives(torch.as_tensor(t, dtype=torch.float64).cpu())
    dtype = like.dtype if cast else (torch.float32 if like.device.type == "mps" else torch.float64)
    return D.expand_like(da.to(like.device, dtype), like), D.expand_like(ds.to(like.device, dtype), like)


class EDMObjectiveParams(Params):
    """EDM's preconditioned denoiser D = c_skip·y + c_out·F (Karras et al. 2022, Eq. 7 and Table 1)."""

    sigma_data: float | None = Field(
        None,
        gt=0,
        description="σ_data of c_skip and c_out; null takes the process's own (edm) or 0.5 for images in [−1, 1]"
        " and 1 for points, which the pipeline standardises.",
    )
    p_mean: float = Field(-1.2, description="Mean of ln σ̃ when training draws it (Table 1: −1.2).")
    p_std: float = Field(1.2, gt=0, description="Standard deviation of ln σ̃ when training draws it (1.2).")


class EDMObjective(Objective):
    """In σ̃ = σ/α on y = x_t/α: x̂_0 = c_skip(σ̃)·y + c_out(σ̃)·F with c_skip = σ_d²/(σ̃² + σ_d²),
    c_out = σ̃σ_d/√(σ̃² + σ_d²); F's target is (x_0 − c_skip y)/c_out, and the loss weight
    λ(σ) = 1/c_out² of Eq. 8 makes the F-space loss unweighted. Training draws
    ln σ̃ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1), mapped to the process's t."""

    def __init__(self, sigma_data: float, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__()
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def _c(self, process: Process, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, s = process.coefficients(t, like)
        sig = s / a
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sig * sig + sd2)
        c_out = sig * self.sigma_data / (sig * sig + sd2).sqrt()
        return a, c_skip, c_out

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        a, c_skip, c_out = self._c(schedule, t, x_t)
        dt = x0.dtype
        return (x0 - (c_skip / a).to(dt) * x_t) / c_out.to(dt)

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        known = known_alpha_sigma(t)
        if known is not None and known[1] > 0:  # the loop's time: the same formulas on floats
            a, s = known
            sig, sd2 = s / a, self.sigma_data**2
            c_skip = sd2 / (sig * sig + sd2)
            c_out = sig * self.sigma_data / math.sqrt(sig * sig + sd2)
            x0 = torch.add(x_t * (c_skip / a), output, alpha=c_out)
            return Denoised.from_x0(x0, x_t, a, s)
        a, c_skip, c_out = self._c(process, t, x_t)
        _, s = process.coefficients(t, x_t)
        dt = x_t.dtype
        x0 = (c_skip / a).to(dt) * x_t + c_out.to(dt) * output
        s_safe = torch.where(s > 0, s, torch.ones_like(s))
        return x0, (x_t - a.to(dt) * x0) / s_safe.to(dt)

    def sample_t(self, process: Process, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        sig = log_normal_sigma(batch, self.p_mean, self.p_std, generator=generator)
        return process.t_of_sigma_tilde(sig).to(device)


def _edm_objective(p: EDMObjectiveParams, ctx: BuildContext) -> EDMObjective:
    sigma_data = p.sigma_data if p.sigma_data is not None else (0.5 if ctx.data_kind == "images" else 1.0)
    return EDMObjective(sigma_data, p.p_mean, p.p_std)


@hookimpl
def diffkit_objectives() -> list[Component]:
    return [
        Component(
            "epsilon",
            lambda p, ctx: Epsilon(min_snr_gamma=p.min_snr_gamma),
            EpsilonParams,
            "ε-prediction, L_simple (Ho et al. 2020).",
        ),
        Component(
            "x0",
            lambda p, ctx: X0(min_snr_gamma=p.min_snr_gamma),
            X0Params,
            "x_0-prediction: the network denoises directly.",
        ),
        Component(
            "v", lambda p, ctx: V(min_snr_gamma=p.min_snr_gamma), VParams, "v-prediction (Salimans & Ho 2022)."
        ),
        Component("flow", lambda p, ctx: Flow(), FlowParams, "Velocity / flow matching (Liu et al. 2022; Lipman et al. 2023)."),
        Component("edm", _edm_objective, EDMObjectiveParams, "EDM's preconditioned denoiser (Karras et al. 2022)."),
    ]
