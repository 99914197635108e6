"""Samplers driven by the score: ``sgld`` (annealed Langevin dynamics) and ``pc``
(predictor–corrector).

Both are steps of :func:`diffkit.sampling.run` and work with every process and every
objective: a step sees the model as ``ctx.denoise(x, t) -> (x̂_0, ε̂)`` and reads the
score of the marginal p_t of x_t = α(t) x_0 + σ(t) ε from it by Tweedie's formula,
∇ log p_t(x) = −ε̂/σ(t) (Efron 2011; Song et al. 2021, Eq. 7 setting).

**The levels and the coordinates.** Level t is p_t itself, and the Langevin steps move x
in the process's own coordinates x_t, the ones every sampler and callback works in.

- On a ``ve`` process (α = 1, σ(t) = σ_min (σ_max/σ_min)^t) these are Song & Ermon's:
  p_t = p_data ∗ N(0, σ(t)² I), and ``sgld`` with its default geometric levels is their
  Alg. 1 exactly (NCSN; Song & Ermon 2019), σ_i = σ(t_i) geometric from σ_max to σ(t_min).
- On a variance-preserving process (the ``linear``/``cosine`` tables, ``vp``), level t is
  the VE level σ̃ = σ/α = SNR(t)^{−1/2} scaled by α(t), since x_t/α = x_0 + σ̃ ε; the steps
  target p_t in x_t (as Song et al. 2021 do for the VP SDE, App. G, Alg. 5), and the state
  is carried from one level to the next unchanged (Alg. 1: x_0^{i+1} ← x_K^i). Rescaling
  it by α_{i+1}/α_i on the way — running Alg. 1 verbatim in the VE coordinates x/α —
  removes the lag of the mean behind the outward-moving modes but, with the same budget,
  adds more spread than the Langevin steps remove: for the Gaussian of
  tests/test_langevin.py at the defaults on the linear table, the exact laws give a mean
  error of 0.086 → 0 but a covariance error of 3.3% → 11%, so it is not done.

**The step size.** η_i = ε σ_i²/σ_L² (Song & Ermon 2019, Alg. 1, line 3), σ the process's
σ(t_i) and σ_L its least noisy level: where the default geometric levels end (t_min, t = 0
on a table; on a process whose σ reaches 0, rectified flow, where σ̃ = 0.002). It is the
same whatever the number of levels visited or where a run starts, so a step never needs
the rest of the grid.

**Bounded x̂_0.** With ``clip_denoised`` the loop bounds x̂_0 and makes ε̂ consistent with it,
ε̂ = (x − α x̂_0)/σ, so the Langevin steps follow the score implied by the bounded x̂_0,
∇ log p = (α x̂_0 − x)/σ² (Tweedie's formula read backwards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from diffkit import BuildContext, Component, DiffkitError, Params, hookimpl
from diffkit.process import Grid, Process
from diffkit.sampling import StepContext, StepSamplerBase, clip_field, resolve_steps, spacing_field
from diffkit_plugins.samplers import DDPM, DDPMParams

__all__ = [
    "SGLD",
    "SGLDParams",
    "PredictorCorrector",
    "PCParams",
    "noise_levels",
    "least_noisy_sigma",
    "step_sizes",
    "resolve_epsilon",
    "NCSN_STEP_RATIO",
    "StepSizeError",
    "MAX_ETA",
]

Positive = Annotated[float, Field(gt=0)]

# Largest step relative to the variance of the noisiest level that `sgld` accepts. For data
# of unit variance p_t has variance v = α² + σ² (the prior's), and a Langevin step there
# multiplies x − E x by (1 − η/(2v)): η/v ≥ 4 diverges, and η/v near 2 already overshoots
# the mode every step. On a VP table v = 1 and the bound is η_1 ≤ 1.
MAX_ETA = 1.0


class StepSizeError(DiffkitError, ValueError):
    """sgld's ε gives too large a Langevin step for the process's noise levels."""


# -- noise levels ----------------------------------------------------------------------------------
def noise_levels(process: Process, levels: int | None, spacing: str = "geometric", start: float | None = None) -> list:
    """The descending times (noise levels) annealed Langevin dynamics visits.

    ``geometric``: levels evenly spaced in log σ̃ = log(σ/α) = −λ/2 from t_max to the least
    noisy level, as Song & Ermon 2019 space their σ_i (Sec. 4.2; on a ``ve`` process exactly
    their geometric σ_1 > … > σ_L). On a discrete table they are the integer timesteps
    nearest those values, and two that round to the same timestep are merged, so fewer
    levels may come back (94 of 100 for the linear schedule of T = 1000). Other spacings are
    those of :meth:`Process.grid`. ``start`` begins at that time and keeps the levels below
    it. Integers on a table, floats otherwise.
    """
    if spacing != "geometric":
        ts = process.grid(_count(process, levels), spacing, start=start)[:-1]  # type: ignore[arg-type]
        return [int(t) for t in ts.tolist()] if process.discrete and bool((ts == ts.round()).all()) else ts.tolist()
    n = _count(process, levels)
    if process.discrete:
        # log σ̃_t = −λ_t, λ_t = ½ log SNR(t): a geometric sequence of σ̃ is evenly spaced in λ
        lam = process.half_log_snr()  # type: ignore[attr-defined]
        targets = torch.linspace(lam[-1].item(), lam[0].item(), n, dtype=torch.float64)
        ts = torch.unique_consecutive(process.nearest_log_snr(targets)).tolist()  # type: ignore[attr-defined]
        if start is None:
            return ts
        first = int(round(float(start)))
        if not 0 <= first <= int(process.t_max):
            raise ValueError(f"start must be a timestep between 0 and T − 1 = {int(process.t_max)}, got {start}")
        return [first] + [t for t in ts if t < first]
    ts = process.grid(n, "logsnr")[:-1].tolist()
    if start is None:
        return ts
    first = float(start)
    if not process.t_min <= first <= process.t_max:
        raise ValueError(f"start must lie in [t_min, t_max] = [{process.t_min:g}, {process.t_max:g}], got {first:g}")
    return [first] + [t for t in ts if t < first]


def _count(process: Process, levels: int | None) -> int:
    if levels is None:
        if not process.discrete:
            raise ValueError("the number of noise levels must be given on a continuous process")
        return int(process.t_max) + 1
    levels = int(levels)
    if process.discrete and not 1 <= levels <= int(process.t_max) + 1:
        raise ValueError(
            "the number of noise levels must be between 1 and the schedule's T ="
            f" {int(process.t_max) + 1}, got {levels}"
        )
    if levels < 1:
        raise ValueError(f"the number of noise levels must be at least 1, got {levels}")
    return levels


def _sigma(process: Process, t: float) -> tuple[float, float]:
    a, s = process.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
    return float(a), float(s)


def least_noisy_sigma(process: Process) -> float:
    """σ_L: σ at the least noisy level of the geometric levels (t_min; t = 0 on a table)."""
    return _sigma(process, noise_levels(process, 2)[-1])[1]


NCSN_STEP_RATIO = 0.2
"""ε/σ_L² of NCSN: ε = 2e-5 with σ_L = 0.01 (Song & Ermon 2019, Sec. 5), so η_i = 0.2 σ_i²."""


def resolve_epsilon(process: Process, epsilon: float | None) -> float:
    """ε as given, or for ``None`` NCSN's ratio to the least noisy level: ε = 0.2 σ_L²
    (2e-5 on ``ve`` with σ_min = 0.01 and on the linear table, whose σ_0² = β_0 = 1e-4)."""
    return NCSN_STEP_RATIO * least_noisy_sigma(process) ** 2 if epsilon is None else float(epsilon)


def step_sizes(process: Process, ts: Sequence[float], epsilon: float | None) -> list[float]:
    """η_i = ε σ_i²/σ_L² at the levels ``ts`` (Song & Ermon 2019, Alg. 1, line 3), σ_L from
    :func:`least_noisy_sigma`, ε from :func:`resolve_epsilon`."""
    floor = least_noisy_sigma(process) ** 2
    epsilon = resolve_epsilon(process, epsilon)
    return [epsilon * _sigma(process, t)[1] ** 2 / floor for t in ts]


def _check_eta(eta: float, epsilon: float, process: Process, t: float) -> None:
    """η at level t, relative to the variance α² + σ² of p_t for data of unit variance, must stay ≤ MAX_ETA."""
    a, s = _sigma(process, t)
    rel = eta / (a * a + s * s)
    if rel > MAX_ETA:
        ratio = rel / epsilon
        raise StepSizeError(
            f"sgld's step at its noisiest level t = {t:g} would be η = ε·σ_1²/σ_L² = {eta:.3g}, {rel:.3g} times"
            f" the variance α² + σ² of that level (σ_1²/(σ_L²(α_1² + σ_1²)) = {ratio:.3g} on this process), above"
            f" {MAX_ETA}: Langevin steps that large overshoot. Lower epsilon to at most {MAX_ETA / ratio:.3g}."
        )


# -- sgld ------------------------------------------------------------------------------------------------
class SGLDParams(Params):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the process's noise levels."""

    steps: int | None = Field(
        100,
        ge=1,
        description="Number of noise levels L visited, from the noisiest to the least noisy; null takes 100 (at"
        " most a table's T). With 'geometric' spacing on a table, levels that round to the same timestep are merged.",
    )
    steps_per_level: int = Field(
        10,
        ge=1,
        le=100_000,
        description="Langevin steps K at each noise level (Song & Ermon 2019 use 100 with L = 10).",
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        le=1,
        description="ε of the step size η_i = ε σ_i²/σ_L² at level i, σ_L the least noisy level"
        " (Song & Ermon 2019, Alg. 1). The noisiest level's η_1 over its variance α² + σ² must stay below 1."
        " null takes NCSN's ratio ε = 0.2 σ_L² (their 2e-5 at σ_L = 0.01; 2e-5 on the linear table).",
    )
    spacing: Literal["geometric"] | Grid = Field(
        "geometric",
        description="The noise levels: 'geometric' spaces σ/α geometrically from t_max to the least noisy level"
        " (Song & Ermon 2019, Sec. 4.2; on a ve process exactly their σ_i; on a table the nearest timesteps),"
        " i.e. evenly in log-SNR; the others are the grids of the other samplers.",
    )
    denoise: bool = Field(
        True,
        description="End with Tweedie's formula x̂_0 = (x + σ_L² ∇log p(x))/α_L at the last level"
        " (Efron 2011; Song & Ermon 2020, Jolicoeur-Martineau et al. 2021); false returns the last Langevin"
        " state, a draw of p_{t_L} that still carries noise of scale σ_L.",
    )
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = clip_field()


class SGLD(StepSamplerBase):
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1). At each level t_i, from the
    noisiest, K steps of

        x ← x + (η_i/2) ∇log p_{t_i}(x) + √η_i z,   z ~ N(0, I),   η_i = ε σ_i²/σ_L²,

    with ∇log p_t(x) = −ε̂(x, t)/σ(t); after the last level, optionally, x̂_0 by Tweedie's
    formula. Langevin dynamics with step η samples p_t as η → 0 and K → ∞ (Roberts &
    Tweedie 1996; Welling & Teh 2011); η_i ∝ σ_i² keeps the ratio of the gradient step to
    the noise the same at every level (Sec. 4.3). Visiting the levels from large to small
    noise lets samples cross between modes while the density is still smooth, and so
    reach the modes with their right weights, which Langevin dynamics at a single small
    noise level does not (Sec. 3.2).

    One step of the loop is one level: ``steps`` is L, and the network is evaluated L·K
    times (+1 for the denoising step). The callback sees the state entering each level
    (reported at that level's t) and the result. ``t_start`` with ``x_start`` starts at
    that level; ``t_start = t_min`` (0 on a table) runs plain, not annealed, Langevin
    dynamics at the least noisy level.
    """

    name = "sgld"
    default_steps = 100

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor:
        ts = noise_levels(process, steps, self.params.spacing, start=start)
        return torch.tensor([float(t) for t in ts] + [process.t_clean], dtype=torch.float64)

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        p = self.params
        if "sigma_L" not in ctx.memory:
            ctx.memory["sigma_L"] = least_noisy_sigma(ctx.process)
            ctx.memory["epsilon"] = resolve_epsilon(ctx.process, p.epsilon)
        sigma_L, epsilon = ctx.memory["sigma_L"], ctx.memory["epsilon"]
        _, sigma_i = ctx.alpha_sigma(ctx.t)
        eta = epsilon * sigma_i**2 / sigma_L**2  # Alg. 1, line 3
        _check_eta(eta, epsilon, ctx.process, ctx.t)
        for _ in range(p.steps_per_level):
            score = -ctx.denoise(x).eps / sigma_i  # s_θ(x, σ_i) = −ε̂/σ_i
            z = ctx.noise(x)
            x = x + (eta / 2) * score + math.sqrt(eta) * z  # Alg. 1, line 6
        if ctx.last and p.denoise:  # Tweedie: E[x_0 | x_t] = (x_t + σ² ∇log p_t(x_t))/α
            return ctx.denoise(x).x0
        return x


def _check_sgld(params: SGLDParams, spec: Any) -> list[str]:
    """At validation: the largest step η_1 for the spec's own process (ve's sigma_max: null
    takes the stand-in diameter validation builds with; sampling checks the real one)."""
    from diffkit.plugins import get_registry
    from diffkit.spec import VALIDATION_DIAMETER, _validating

    registry = _validating.get() or get_registry()
    try:
        process = registry.build("schedule", spec.schedule, BuildContext(data_diameter=VALIDATION_DIAMETER))
        ts = noise_levels(process, resolve_steps(SGLD(params), process, None), params.spacing)
    except (ValueError, DiffkitError):
        return []  # the schedule's and the steps' own problems are reported where they are checked
    try:
        epsilon = resolve_epsilon(process, params.epsilon)
        _check_eta(step_sizes(process, ts[:1], epsilon)[0], epsilon, process, ts[0])
    except StepSizeError as exc:
        return [str(exc)]
    return []


# -- predictor–corrector ---------------------------------------------------------------------------------
class PCParams(Params):
    """Predictor–corrector sampling (Song et al. 2021, Alg. 2 and 3, with Alg. 4 and 5's corrector)."""

    steps: int | None = Field(
        None,
        ge=1,
        description="Number of predictor steps; null takes all T of a table (1000 on a continuous process).",
    )
    spacing: Grid | None = spacing_field()
    predictor: Literal["ancestral", "reverse-diffusion"] = Field(
        "ancestral",
        description="'ancestral' samples the posterior q(x_s | x_t, x̂_0) (Ho et al. 2020, Alg. 2; Song et al."
        " 2021, App. F); 'reverse-diffusion' is the discretised reverse SDE of Song et al. 2021, Eq. 46–47 (the"
        " predictor of their Alg. 2 and 3).",
    )
    corrector_steps: int = Field(
        1, ge=0, le=1000, description="Langevin corrector steps M after each predictor step; 0 is the predictor alone."
    )
    snr: float = Field(
        0.075,
        gt=0,
        le=10,
        description="Signal-to-noise ratio r that sets the corrector's step ε = 2α (r‖z‖/‖∇log p‖)²"
        " (Song et al. 2021, Alg. 4 and 5, who tune r per data set; 0.16 is their CIFAR-10 value). The"
        " default 0.075: on low-dimensional data 0.16 gives steps of about an eighth of the local variance"
        " and degrades the samples (benchmarks/README.md, two moons).",
    )
    step_norms: Literal["batch", "sample"] = Field(
        "batch",
        description="Whose norms ‖z‖, ‖∇log p‖ set the corrector's step: 'batch' their means over the batch, as"
        " Song et al.'s code takes them (one step for the whole batch, so a sample depends on the batch it is drawn"
        " in); 'sample' each sample's own (a seed then fixes the sample whatever the batch, but on low-dimensional"
        " data, where a sample's ‖∇log p‖ can nearly vanish, its law is measurably off: docs/spec.md).",
    )
    clip_denoised: Positive | Literal["auto", "dynamic"] | None = clip_field()


_ANCESTRAL = DDPM(DDPMParams(variance="posterior"))


class PredictorCorrector(StepSamplerBase):
    """Predictor–corrector sampling (Song et al. 2021, Sec. 4.2; Alg. 2 for VE, 3 for VP).

    Each step t → s is

    - the **predictor**: ``ancestral``, one step of q(x_s | x_t, x̂_0) as ``ddpm`` takes it
      (Ho et al. 2020, Alg. 2; for α = 1 Song et al. 2021, Eq. 47); or ``reverse-diffusion``,
      x_s = (2 − α_{t|s}) x_t + σ²_{t|s} ∇log p_t(x_t) + σ_{t|s} z with α_{t|s} = α_t/α_s and
      σ²_{t|s} = σ_t² − α²_{t|s} σ_s² (Eq. 46–47: on ``ve`` Alg. 2's
      x + (σ_t² − σ_s²) s_θ + √(σ_t² − σ_s²) z, on a VP table Alg. 3's
      (2 − √(1 − β)) x + β s_θ + √β z);
    - then M **corrector** steps of Langevin dynamics that target p_s:
      x ← x + ε g + √(2ε) z with g = ∇log p_s(x) = −ε̂(x, s)/σ_s and ε = 2 α_i (r ‖z‖/‖g‖)²
      (Alg. 4 for VE with α_i = 1, Alg. 5 for VP with α_i = 1 − β_s). α_i is the one-step
      ratio α(s)²/α(s⁻)²: on a table its own step s − 1 → s, as the authors' code reads
      ``sde.alphas[s]``; on a continuous process the step just taken, α_{t|s}². As in their
      code (``step_norms: batch``, the default), ‖z‖ and ‖g‖ are per-sample norms averaged
      over the batch, one step size for the whole batch: the one sampler whose samples depend
      on the batch they are drawn in. ``step_norms: sample`` takes each sample's own, the
      ratio capped at 4σ_s (its value ‖z‖/‖g‖ ≈ σ_s for g ≈ −(x − α x̂_0)/σ_s²) where g
      vanishes; on 2-D data its law is measurably worse (certification at r = 0.16: |Δcov| ≈ 1).

    The last step lands on the clean data with x̂_0 (no noise, no corrector: the denoising
    step of Song et al. 2021, App. G). The callback sees the state after each step.
    """

    name = "pc"
    default_steps = 1000

    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        p = self.params
        if p.predictor == "ancestral":
            x = _ANCESTRAL.step(x, ctx)
        else:
            x = self._reverse_diffusion(x, ctx)
        if ctx.last:
            return x
        return self._correct(x, ctx)

    def _reverse_diffusion(self, x: Tensor, ctx: StepContext) -> Tensor:
        """Song et al. 2021, Eq. 46–47 for the transition x_t = α_{t|s} x_s + σ_{t|s} z."""
        d = ctx.denoise(x)
        if ctx.last:
            return d.x0
        a_t, s_t, a_s, s_s = ctx.ends()
        alpha_ts = a_t / a_s
        var_ts = max(s_t * s_t - alpha_ts * alpha_ts * s_s * s_s, 0.0)
        score = -d.eps / s_t
        return (2.0 - alpha_ts) * x + var_ts * score + math.sqrt(var_ts) * ctx.noise(x)

    def _correct(self, x: Tensor, ctx: StepContext) -> Tensor:
        """Alg. 4/5 of Song et al. 2021: M Langevin steps at s, step size from the signal-to-noise ratio r."""
        p = self.params
        a_s, s_s = ctx.alpha_sigma(ctx.s)
        a_prev = ctx.alpha_sigma(ctx.s - 1.0)[0] if ctx.process.discrete else ctx.alpha_sigma(ctx.t)[0]
        alpha_i = (a_s / a_prev) ** 2
        for _ in range(p.corrector_steps):
            g = -ctx.denoise(x, ctx.s).eps / s_s
            z = ctx.noise(x)
            z_norm, g_norm = z.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1)
            if p.step_norms == "batch":
                ratio = z_norm.mean() / g_norm.mean()
            else:
                ratio = torch.minimum(z_norm / g_norm, torch.full_like(z_norm, 4.0 * s_s))
                ratio = ratio.reshape((-1,) + (1,) * (x.ndim - 1))
            eps = (2.0 * alpha_i) * (p.snr * ratio).square()
            x = x + eps * g + (2.0 * eps).sqrt() * z
        return x


def _factory(cls: type[StepSamplerBase]):
    def build(params: Params, ctx: BuildContext) -> StepSamplerBase:
        return cls(params)

    return build


@hookimpl
def diffkit_samplers() -> list[Component]:
    return [
        Component(
            "sgld",
            _factory(SGLD),
            SGLDParams,
            "Annealed Langevin dynamics over the noise levels, with a final Tweedie denoising step"
            " (Song & Ermon 2019, Alg. 1).",
            check=_check_sgld,
        ),
        Component(
            "pc",
            _factory(PredictorCorrector),
            PCParams,
            "Predictor–corrector: ancestral or reverse-diffusion predictor and Langevin corrector"
            " (Song et al. 2021, Alg. 2–5).",
        ),
    ]
