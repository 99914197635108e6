"""Samplers driven by the score: ``sgld`` (annealed Langevin dynamics) and ``pc``
(predictor–corrector).

Like every sampler they receive only ``predict(x_t, t) -> ε̂`` and turn it into the
score with :func:`diffkit.diffusion.eps_to_score` (∇ log p_t(x) = −ε̂/σ_t), so they
work with a network trained by any objective.

**Noise levels in the variance-preserving setting.** Song & Ermon (2019) anneal over
p_σ = p_data ∗ N(0, σ² I) (variance *exploding*, VE) with σ_1 > … > σ_L geometric.
diffkit's schedules are variance *preserving* (VP): level t is the marginal p_t of
x_t = √ᾱ_t x_0 + σ_t ε, σ_t = √(1 − ᾱ_t), whose score the network estimates. Since
x_t/√ᾱ_t = x_0 + (σ_t/√ᾱ_t) ε, level t is the VE level σ_t/√ᾱ_t = SNR(t)^{−1/2}
rescaled by √ᾱ_t (Song et al. 2021, Sec. 3.4; Kingma et al. 2021). What ``sgld`` does,
exactly:

- it visits the timesteps whose SNR(t)^{−1/2} are nearest a geometric sequence (in
  Song & Ermon's sense) from the noisiest to the least noisy, i.e. evenly spread in
  log-SNR (``spacing: geometric``; the other spacings are Schedule.timesteps');
- at each visited t it runs K Langevin steps that target p_t itself, in the VP
  coordinates x_t that every sampler and callback works in (as Song et al. 2021 do
  for the VP SDE, App. G, Alg. 5), with η_i = ε σ_i²/σ_L², σ the VP σ_t (Song &
  Ermon's rule: the gradient step relative to the noise is the same at every level);
- it starts from N(0, I) ≈ p_{T−1} and carries the state from one level to the next
  unchanged (Alg. 1: x_0^{i+1} ← x_K^i). Rescaling it by √(ᾱ_{i+1}/ᾱ_i) on the way —
  running Alg. 1 verbatim in the VE coordinates x/√ᾱ — removes the lag of the mean
  behind the outward-moving modes but, with the same budget, adds more spread than
  the Langevin steps remove: for the Gaussian of tests/test_langevin.py at the
  defaults, the exact laws give a mean error of 0.086 → 0 but a covariance error of
  3.3% → 11%, so it is not done.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from diffkit import ClipDenoised, Component, DiffkitError, Params, Predict, Schedule, Spacing, StepCallback, hookimpl, initial_state, report
from diffkit import diffusion as D

__all__ = ["SGLD", "SGLDParams", "PredictorCorrector", "PCParams", "noise_levels", "step_sizes", "StepSizeError"]

# Largest step η_1 = ε σ_1²/σ_L² that `sgld` accepts. At the noisiest level p_t ≈ N(0, I),
# where a Langevin step multiplies the state by (1 − η/2): η ≥ 4 diverges, and η near 2
# already overshoots the mode every step.
MAX_ETA = 1.0


class StepSizeError(DiffkitError, ValueError):
    """sgld's ε gives too large a Langevin step for the schedule's noise levels."""


class SGLDParams(Params):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the schedule's noise levels."""

    steps: int | None = Field(
        100,
        ge=1,
        description="Number of noise levels L visited, from the noisiest to the least noisy; null visits"
        " all T timesteps. With 'geometric' spacing, levels that round to the same timestep are merged.",
    )
    steps_per_level: int = Field(
        10, ge=1, le=100_000, description="Langevin steps K at each noise level (Song & Ermon 2019 use 100 with L = 10)."
    )
    epsilon: float = Field(
        2e-5,
        gt=0,
        le=1,
        description="ε of the step size η_i = ε σ_i²/σ_L² at level i, σ_L the least noisy level visited"
        " (Song & Ermon 2019, Alg. 1). The noisiest level's η_1 = ε σ_1²/σ_L² must stay below 1.",
    )
    spacing: Literal["geometric"] | Spacing = Field(
        "geometric",
        description="Which timesteps are the noise levels: 'geometric' picks those whose VE-equivalent noise"
        " level σ_t/√ᾱ_t is nearest a geometric sequence from t = T−1 to t = 0 (Song & Ermon 2019, Sec. 4.2),"
        " i.e. evenly spread in log-SNR; the others take the timesteps of Schedule.timesteps.",
    )
    denoise: bool = Field(
        True,
        description="End with Tweedie's formula x̂_0 = (x + σ_L² ∇log p(x))/√ᾱ_L at the last level"
        " (Efron 2011; Jolicoeur-Martineau et al. 2021); false returns the last Langevin state, a draw of"
        " p_{t_L} that still carries noise of scale σ_L.",
    )
    clip_denoised: ClipDenoised = "auto"


def noise_levels(
    schedule: Schedule, levels: int | None, spacing: str = "geometric", start: int | None = None
) -> list[int]:
    """The descending timesteps annealed Langevin dynamics visits.

    ``geometric``: the timesteps whose VE-equivalent noise level σ_t/√ᾱ_t = SNR(t)^{−1/2}
    lies nearest (in log) to ``levels`` values spaced geometrically from that of
    t = T−1 to that of t = 0, as Song & Ermon 2019 space their σ_i; where two round to
    the same timestep they are merged, so fewer levels may come back (94 of 100 for the
    linear schedule of T = 1000). Other spacings are those of :meth:`Schedule.timesteps`.
    ``start`` begins at that timestep and keeps the levels below it.
    """
    if spacing != "geometric":
        return schedule.timesteps(levels, spacing, start=start)  # type: ignore[arg-type]
    T = schedule.T
    levels = T if levels is None else int(levels)
    if not 1 <= levels <= T:
        raise ValueError(f"the number of noise levels must be between 1 and the schedule's T = {T}, got {levels}")
    # log(σ_t/√ᾱ_t) = −λ_t: a geometric sequence of σ_t/√ᾱ_t is evenly spaced in λ_t = ½ log SNR
    lam = schedule.half_log_snr()
    targets = torch.linspace(lam[-1].item(), lam[0].item(), levels, dtype=torch.float64)
    ts = torch.unique_consecutive(schedule.nearest_log_snr(targets)).tolist()
    if start is not None:
        if not 0 <= start <= T - 1:
            raise ValueError(f"start must be a timestep between 0 and T − 1 = {T - 1}, got {start}")
        ts = [start] + [t for t in ts if t < start]
    return ts


def step_sizes(schedule: Schedule, ts: Sequence[int], epsilon: float) -> list[float]:
    """η_i = ε σ_i²/σ_L² for the levels ``ts`` (Song & Ermon 2019, Alg. 1), σ_L the least noisy."""
    sigma2 = (1.0 - schedule.alphas_cumprod[list(ts)]).tolist()
    floor = min(sigma2)
    return [epsilon * s2 / floor for s2 in sigma2]


class SGLD:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1), in VP form.

    For each level t_i, from the noisiest: K steps of

        x ← x + (η_i/2) ∇log p_{t_i}(x) + √η_i z,   z ~ N(0, I),   η_i = ε σ_i²/σ_L²,

    with ∇log p_t(x) = −ε̂(x, t)/σ_t; then, optionally, one denoising step by Tweedie's
    formula at the last level. Langevin dynamics with step η samples p_t as η → 0 and
    K → ∞ (Roberts & Tweedie 1996; Welling & Teh 2011); η_i ∝ σ_i² keeps the ratio of
    the gradient step to the noise the same at every level (Song & Ermon 2019, Sec. 4.3).
    Visiting the levels from large to small noise lets samples cross between modes
    while the density is still smooth, and so reach the modes with their right
    weights, which Langevin dynamics at a single small noise level does not (Sec. 3.2).

    ``steps`` (from the call or the parameters) is the number of levels L; the network
    is evaluated L·K times (+1 for the denoising step). ``t_start`` with ``x_start``
    starts at that level: ``t_start = 0`` runs plain (not annealed) Langevin dynamics
    at the least noisy level.
    """

    def __init__(self, params: SGLDParams) -> None:
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
        ts = noise_levels(schedule, steps or p.steps, p.spacing, start=t_start)
        etas = step_sizes(schedule, ts, p.epsilon)
        _check_eta(etas[0], p.epsilon, schedule, ts)
        x = initial_state(shape, generator=generator, device=device, dtype=dtype, x_start=x_start)
        n = x.shape[0]
        x = report(callback, ts[0], x)
        t_vec = abar = None
        bar = tqdm(total=len(ts) * p.steps_per_level, desc="sgld", disable=not progress, leave=False)
        for t, eta in zip(ts, etas):
            t_vec = torch.full((n,), t, device=device, dtype=torch.long)
            abar = schedule.alpha_bar(t_vec, x)
            half, root = eta / 2.0, math.sqrt(eta)
            for _ in range(p.steps_per_level):
                score = D.eps_to_score(predict(x, t_vec), abar)
                z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                x = torch.add(x, score, alpha=half).add_(z, alpha=root)
                x = report(callback, t, x)
                bar.update()
        bar.close()
        if p.denoise:  # Tweedie: E[x_0 | x_t] = (x_t + σ_t² ∇log p_t(x_t))/√ᾱ_t
            x = D.eps_to_x0(predict(x, t_vec), x, abar)
        x = report(callback, -1, x)
        return x


def _check_eta(eta: float, epsilon: float, schedule: Schedule, ts: Sequence[int]) -> None:
    if eta > MAX_ETA:
        ratio = eta / epsilon
        raise StepSizeError(
            f"sgld's step at its noisiest level would be η = ε·σ_1²/σ_L² = {eta:.3g} (σ_1²/σ_L² = {ratio:.3g}"
            f" for levels t = {ts[0]} … {ts[-1]} of this schedule), above {MAX_ETA}: Langevin steps that"
            f" large overshoot. Lower epsilon to at most {MAX_ETA / ratio:.3g}."
        )


def _check_sgld(params: SGLDParams, spec: Any) -> list[str]:
    """At validation: the largest step η_1 for the spec's own schedule."""
    from diffkit.plugins import get_registry
    from diffkit.spec import _validating

    registry = _validating.get() or get_registry()
    try:
        schedule = registry.build("schedule", spec.schedule)
        ts = noise_levels(schedule, params.steps, params.spacing)
        etas = step_sizes(schedule, ts, params.epsilon)
        _check_eta(etas[0], params.epsilon, schedule, ts)
    except ValueError as exc:
        return [str(exc)]
    return []


class PCParams(Params):
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1 with Alg. 5's corrector)."""

    steps: int | None = Field(
        None, ge=1, description="Number of predictor steps; null takes all T. Fewer steps respace the chain."
    )
    spacing: Spacing = Field(
        "linspace", description="How the visited timesteps are chosen when steps < T."
    )
    corrector_steps: int = Field(
        1, ge=0, le=1000, description="Langevin corrector steps M after each predictor step; 0 is plain DDPM."
    )
    snr: float = Field(
        0.16,
        gt=0,
        le=10,
        description="Signal-to-noise ratio r that sets the corrector's step ε = 2α (r‖z‖/‖∇log p‖)²"
        " (Song et al. 2021, Alg. 5; 0.16 is their choice).",
    )
    clip_denoised: ClipDenoised = "auto"


class PredictorCorrector:
    """Predictor–corrector sampling (Song et al. 2021, Sec. 4.2, Alg. 1 and 5).

    Each step t → s (s the next visited timestep) is

    - the **predictor**, one ancestral step of p_θ(x_s | x_t) (Ho et al. 2020, Alg. 2):
      x ← c_0 x̂_0 + c_t x + √β̃ z with x̂_0 from ε̂ and (c_0, c_t, β̃) the posterior
      coefficients of q(x_s | x_t, x_0) (Eq. 6–7; respaced when steps < T);
    - then M **corrector** steps of Langevin dynamics that target p_s:
      x ← x + ε g + √(2ε) z with g = ∇log p_s(x) = −ε̂(x, s)/σ_s and
      ε = 2 α_s (r ‖z‖/‖g‖)², α_s = 1 − β_s (Alg. 5). As in the authors' code, ‖z‖ and
      ‖g‖ are per-sample norms averaged over the batch, so one step size serves the
      whole batch (a per-sample ratio blows up wherever g vanishes).

    The last predictor step lands on clean data (ᾱ = 1, no noise: x ← x̂_0), where
    there is no score to correct with. The callback sees the state after the
    predictor and after each corrector step.
    """

    def __init__(self, params: PCParams) -> None:
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
        ts = schedule.timesteps(steps or p.steps, p.spacing, start=t_start)
        nxt = ts[1:] + [-1]
        # Python floats, computed once: (c_0, c_t, β̃) of q(x_s | x_t, x_0) and α_s.
        like = torch.zeros(len(ts), dtype=torch.float64)  # ᾱ read in float64 on the CPU
        abar_from = schedule.alpha_bar(torch.tensor(ts), like)
        abar_to = schedule.alpha_bar(torch.tensor(nxt), like)
        c0, ct, var = (v.tolist() for v in D.posterior_coefficients(abar_from, abar_to))
        alphas = schedule.alphas.tolist()
        x = initial_state(shape, generator=generator, device=device, dtype=dtype, x_start=x_start)
        n = x.shape[0]
        x = report(callback, ts[0], x)
        t_vec = torch.full((n,), ts[0], device=device, dtype=torch.long)
        abar_t = schedule.alpha_bar(t_vec, x)
        for i, (t, s) in enumerate(tqdm(list(zip(ts, nxt)), desc="pc", disable=not progress, leave=False)):
            # predictor: ancestral step t → s
            x0 = D.eps_to_x0(predict(x, t_vec), x, abar_t)
            x = torch.add(x0.mul_(c0[i]), x, alpha=ct[i])
            if s < 0:
                x = report(callback, s, x)
                break
            z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
            x.add_(z, alpha=math.sqrt(var[i]))
            x = report(callback, s, x)
            t_vec = torch.full((n,), s, device=device, dtype=torch.long)
            abar_t = schedule.alpha_bar(t_vec, x)
            # corrector: Langevin steps targeting p_s, step size from the signal-to-noise ratio
            for _ in range(p.corrector_steps):
                g = D.eps_to_score(predict(x, t_vec), abar_t)
                z = torch.randn(x.shape, generator=generator, device=device, dtype=dtype)
                ratio = z.flatten(1).norm(dim=1).mean() / g.flatten(1).norm(dim=1).mean()
                step = (2.0 * alphas[s]) * (p.snr * ratio).square()
                x = x.addcmul(g, step).addcmul_(z, (2.0 * step).sqrt())
                x = report(callback, s, x)
        return x


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component(
            "sgld",
            lambda p, ctx: SGLD(p),
            SGLDParams,
            "Annealed Langevin dynamics over the noise levels, with a final Tweedie denoising step"
            " (Song & Ermon 2019, Alg. 1).",
            check=_check_sgld,
        ),
        Component(
            "pc",
            lambda p, ctx: PredictorCorrector(p),
            PCParams,
            "Predictor–corrector: ancestral predictor and Langevin corrector (Song et al. 2021, Alg. 1, 5).",
        ),
    ]
