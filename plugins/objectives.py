"""Training objectives: what the network predicts.

``epsilon`` (the noise ε, Ho et al. 2020), ``x0`` (the clean data) and ``v``
(v = √ᾱ ε − √(1−ᾱ) x_0, Salimans & Ho 2022). Every one takes ``min_snr_gamma``
for min-SNR-γ loss weighting (Hang et al. 2023); the conversions between the targets
are those of :mod:`diffkit.diffusion`.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from diffkit import Component, Objective, Params, Schedule, hookimpl
from diffkit import diffusion as D


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


class Epsilon(Objective):
    """L_simple = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²  (Ho et al. 2020, Eq. 14)."""

    parameterization = "eps"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return eps

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return output


class X0(Objective):
    """E ‖x_0 − x̂_θ(x_t, t)‖²: the network denoises directly (Ho et al. 2020, Sec. 3.2
    discusses this parameterisation; Karras et al. 2022 train the denoiser D this way)."""

    parameterization = "x0"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return x0

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return D.x0_to_eps(output, x_t, schedule.alpha_bar(t, x_t))

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return output


class V(Objective):
    """E ‖v − v̂_θ(x_t, t)‖² with v = √ᾱ_t ε − √(1−ᾱ_t) x_0  (Salimans & Ho 2022, Sec. 4).

    v stays well scaled at both ends of the schedule, where ε-prediction (near t = T)
    and x_0-prediction (near t = 0) make the other quantity ill-conditioned.
    """

    parameterization = "v"

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return D.x0_eps_to_v(x0, eps, schedule.alpha_bar(t, x0))

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return D.v_to_eps(output, x_t, schedule.alpha_bar(t, x_t))

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return D.v_to_x0(output, x_t, schedule.alpha_bar(t, x_t))


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
    ]
