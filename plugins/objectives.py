"""Training objectives: ``epsilon`` (the network predicts the noise)."""

from __future__ import annotations

from torch import Tensor

from diffkit import BuildContext, Component, Objective, Params, Schedule, hookimpl


class EpsilonParams(Params):
    """The network predicts the noise ε that was added to x_0."""


class Epsilon(Objective):
    """L_simple = E ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖²  (Ho et al. 2020, Eq. 14)."""

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return eps

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        return output


@hookimpl
def diffkit_objectives() -> list[Component]:
    return [Component("epsilon", lambda p, ctx: Epsilon(), EpsilonParams, "ε-prediction, L_simple (Ho et al. 2020).")]
