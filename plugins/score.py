"""Objectives of score matching: ``score`` (denoising score matching).

The network's output is read as the score s_θ(x_t, t) ≈ ∇_{x_t} log p_t(x_t). Every
sampler still receives ε̂ (through :meth:`Score.to_eps`, i.e.
:func:`diffkit.diffusion.score_to_eps`), so a sampler never knows that the network
was trained to output a score.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Component, Objective, Params, Schedule, hookimpl
from diffkit import diffusion as D


class ScoreParams(Params):
    """Denoising score matching: regress the network's output on ∇ log q(x_t | x_0) = −ε/σ_t."""

    weighting: Literal["sigma2", "likelihood"] = Field(
        "sigma2",
        description="λ(t) of the loss E λ(t) ‖s_θ(x_t, t) + ε/σ_t‖²: 'sigma2' is λ = σ_t² (Song & Ermon 2019,"
        " Sec. 4.2; it makes the loss equal to the ε loss L_simple), 'likelihood' is λ ∝ β_t, the discrete"
        " g(t)² of the VP SDE (Song et al. 2021, 'Maximum likelihood training of score-based diffusion"
        " models', Thm. 1), scaled so that its average over t of λ/σ_t² is 1.",
    )


class Score(Objective):
    """Denoising score matching (Vincent 2011; Song & Ermon 2019, Eq. 5–6).

    With x_t = √ᾱ_t x_0 + σ_t ε, the conditional score is
    ∇_{x_t} log q(x_t | x_0) = −(x_t − √ᾱ_t x_0)/σ_t² = −ε/σ_t, and the minimiser of
    E ‖s_θ(x_t, t) − ∇ log q(x_t | x_0)‖² is the marginal score ∇ log p_t(x_t)
    (Vincent 2011, Eq. 11). The loss is E_{t, ε} λ(t) ‖s_θ − (−ε/σ_t)‖².

    With λ(t) = σ_t² this equals E ‖−σ_t s_θ − ε‖² = E ‖ε̂ − ε‖², the ε loss of Ho et
    al. 2020 (Eq. 14) with ε̂ = −σ_t s_θ: the two objectives share their minimiser and
    differ only in what the network outputs. Likelihood weighting λ(t) ∝ β_t puts the
    weight of the variational bound on each t instead (Song et al. 2021, Thm. 1; in
    ε terms λ/σ_t² ∝ β_t/σ_t², Ho et al. 2020 Eq. 12 up to the factor 1/(2α_t)).
    """

    def __init__(self, params: ScoreParams) -> None:
        self.params = params

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """∇_{x_t} log q(x_t | x_0) = −ε/σ_t."""
        return D.eps_to_score(eps, schedule.alpha_bar(t, x_t))

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """ε̂ = −σ_t s_θ (Tweedie's formula)."""
        return D.score_to_eps(output, schedule.alpha_bar(t, x_t))

    def to_score(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Schedule) -> Tensor:
        """The output is the score already."""
        return output

    def weight(self, t: Tensor, schedule: Schedule, like: Tensor) -> Tensor:
        """λ(t) per sample, shape ``[batch]``, in ``like``'s dtype."""
        abar_t = schedule.alpha_bar(t, t)  # float64 [B]; t itself serves as the [B]-shaped template
        sigma2 = 1.0 - abar_t
        if self.params.weighting == "sigma2":
            return sigma2.to(like.dtype)
        beta = 1.0 - abar_t / schedule.alpha_bar(t - 1, t)  # β_t = 1 − ᾱ_t/ᾱ_{t−1}, ᾱ_{−1} = 1
        norm = float((schedule.betas / schedule.sigmas.square()).mean())
        return (beta / norm).to(like.dtype)


@hookimpl
def diffkit_objectives() -> list[Component]:
    return [
        Component(
            "score",
            lambda p, ctx: Score(p),
            ScoreParams,
            "Denoising score matching: the network outputs ∇ log p(x_t) (Vincent 2011; Song & Ermon 2019).",
        )
    ]
