"""Objectives of score matching: ``score`` (denoising score matching).

The network's output is read as the score s_θ(x_t, t) ≈ ∇_{x_t} log p_t(x_t), for any
process x_t = α(t) x_0 + σ(t) ε. Every sampler still receives (x̂_0, ε̂) (through
:meth:`Score.denoised`), so a sampler never knows that the network was trained to output
a score.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import Component, Objective, Params, hookimpl
from diffkit.process import Process


class ScoreParams(Params):
    """Denoising score matching: regress the score s_θ(x_t, t) on ∇ log q(x_t | x_0) = −ε/σ(t)."""

    scale_by_sigma: bool = Field(
        True,
        description="Read the network's output F divided by σ(t) as the score, s_θ = F/σ (Song & Ermon 2020,"
        " Technique 3): F then regresses on −ε, of unit size at every noise level, where the score itself grows"
        " as 1/σ near the data. false reads the output as the score itself (what runs saved before this"
        " parameter existed do).",
    )

    weighting: Literal["sigma2", "likelihood"] = Field(
        "sigma2",
        description="λ(t) of the loss E λ(t) ‖s_θ(x_t, t) + ε/σ(t)‖²: 'sigma2' is λ = σ(t)² (Song & Ermon 2019,"
        " Sec. 4.2; it makes the loss equal to the ε loss L_simple), 'likelihood' is λ ∝ g(t)², the squared"
        " diffusion of the forward SDE (β_t on a discrete table; Song et al. 2021, 'Maximum likelihood training"
        " of score-based diffusion models', Thm. 1), scaled so that its average over t of λ/σ² is 1.",
    )

    saved_defaults: ClassVar[dict[str, Any]] = {"scale_by_sigma": False}  # runs saved before it existed read the output as the score


LIKELIHOOD_QUADRATURE = 4096
"""Midpoints of [t_min, t_max] over which a continuous process's g²/σ² is averaged to scale
the likelihood weighting."""


class Score(Objective):
    """Denoising score matching (Vincent 2011; Song & Ermon 2019, Eq. 5–6), for any process.

    With x_t = α x_0 + σ ε, the conditional score is
    ∇_{x_t} log q(x_t | x_0) = −(x_t − α x_0)/σ² = −ε/σ, and the minimiser of
    E ‖s_θ(x_t, t) − ∇ log q(x_t | x_0)‖² is the marginal score ∇ log p_t(x_t)
    (Vincent 2011, Eq. 11). The loss is E_{t, ε} λ(t) ‖s_θ − (−ε/σ)‖².

    The output converts by Tweedie's formula: ε̂ = −σ s_θ and x̂_0 = (x_t − σ ε̂)/α =
    (x_t + σ² s_θ)/α. With λ(t) = σ² the loss equals E ‖−σ s_θ − ε‖² = E ‖ε̂ − ε‖², the ε loss
    of Ho et al. 2020 (Eq. 14): the two objectives share their minimiser and differ only in
    what the network outputs. Likelihood weighting λ ∝ g(t)² puts the weight of the
    variational bound on each t instead (Song et al. 2021, Thm. 1; on a table g² = β_t, in
    ε terms λ/σ² ∝ β_t/σ_t², Ho et al. 2020 Eq. 12 up to the factor 1/(2α_t)). On ``ve``
    g² = 2σ² ln(σ_max/σ_min) ∝ σ², so both weightings are one there.

    With ``scale_by_sigma`` (the default) the network outputs F and s_θ = F/σ (Song & Ermon
    2020, Technique 3; score_sde divides its VP and VE models' outputs by σ the same way): the
    same loss is then E (λ/σ²) ‖F − (−ε)‖², so F regresses on a target of unit size at every
    t instead of one that grows as 1/σ near the data; with λ = σ² it is the ε loss with the
    output's sign flipped.
    """

    def __init__(self, params: ScoreParams) -> None:
        super().__init__()
        self.params = params

    @property
    def scaled(self) -> bool:
        return self.params.scale_by_sigma

    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """∇_{x_t} log q(x_t | x_0) = −ε/σ(t); with ``scale_by_sigma`` the output's target σ·(−ε/σ) = −ε."""
        if self.scaled:
            return -eps
        _, s = schedule.coefficients(t, x_t)
        return -eps / s.to(x_t.dtype)

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        """ε̂ = −σ s_θ (−F with ``scale_by_sigma``), x̂_0 = (x_t − σ ε̂)/α (Tweedie's formula)."""
        a, s = process.coefficients(t, x_t)
        eps = -output if self.scaled else -output * s.to(x_t.dtype)
        return (x_t - s.to(x_t.dtype) * eps) / a.to(x_t.dtype), eps

    def to_score(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """s_θ: the output divided by σ(t) with ``scale_by_sigma``, else the output itself."""
        if self.scaled:
            _, s = schedule.coefficients(t, x_t)
            return output / s.to(x_t.dtype)
        return output

    def weight(self, t: Tensor, schedule: Process, like: Tensor) -> Tensor:
        """λ(t) per sample, shape ``[batch]``, in ``like``'s dtype; with ``scale_by_sigma`` λ(t)/σ², the
        same loss E λ ‖s_θ + ε/σ‖² written on the output F = σ s_θ."""
        _, s = schedule.coefficients(t, like)
        sigma2 = s.reshape(s.shape[0], -1)[:, 0].square()
        if self.params.weighting == "sigma2":
            lam = sigma2
        else:
            lam = _g2(schedule, t, like) / _mean_g2_over_sigma2(schedule)
        return (lam / sigma2.to(lam.dtype) if self.scaled else lam).to(like.dtype)


def _g2(process: Process, t: Tensor, like: Tensor) -> Tensor:
    """g(t)² per sample, float64: β_t = 1 − ᾱ_t/ᾱ_{t−1} on a table at integer t (the discretised
    VP SDE), otherwise the forward SDE's diffusion (Process.drift_diffusion)."""
    tt = torch.as_tensor(t)
    if process.discrete and not tt.is_floating_point():
        a_t, _ = process.coefficients(tt, like)
        a_prev, _ = process.coefficients(tt - 1, like)
        return (1.0 - (a_t / a_prev).square()).reshape(tt.shape[0], -1)[:, 0]
    _, g2 = process.drift_diffusion(tt.to(torch.float64).cpu())
    return g2.to(like.device)


def _mean_g2_over_sigma2(process: Process) -> float:
    """The average of g²/σ² over t: over the T steps of a table, over midpoints of [t_min, t_max] otherwise."""
    if process.discrete:
        return float((process.betas / process.sigmas.square()).mean())  # type: ignore[attr-defined]
    n = LIKELIHOOD_QUADRATURE
    t = process.t_min + (process.t_max - process.t_min) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
    _, g2 = process.drift_diffusion(t)
    _, s = process.alpha_sigma(t)
    return float((g2 / s.square()).mean())


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
