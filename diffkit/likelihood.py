"""The variational bound on the negative log-likelihood, in bits per dimension.

For a diffusion model with reverse process p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I),
the evidence lower bound gives (Ho et al. 2020, Eq. 5; Bishop, *Deep Learning*, Sec. 20.2)

    −log p_θ(x_0) ≤ L_T + Σ_{t>1} L_{t−1} + L_0,

    L_T     = KL(q(x_T | x_0) ‖ N(0, I)),
    L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)),   x_t ~ q(x_t | x_0),
    L_0     = −log p_θ(x_0 | x_1).

Paper steps 1..T are code timesteps 0..T−1 (``docs/concepts.md``): L_T uses ᾱ_{T−1},
L_{t−1} is formed at code t = 1..T−1 and L_0 decodes from code t = 0.

- **L_{t−1}.** With μ_θ the posterior mean at x̂_0 = (x_t − σ_t ε̂)/√ᾱ_t,
  μ̃ − μ_θ = c_0 (x_0 − x̂_0) with c_0 = √ᾱ_{t−1} β_t/(1 − ᾱ_t). With σ_t² = β_t
  (``variance="beta"``, the default) L_{t−1} is the KL of two Gaussians of different
  variance, ½ D (β̃/β − 1 − log(β̃/β)) + ‖μ̃ − μ_θ‖²/(2β); with σ_t² = β̃_t
  (``"posterior"``) it is c_0² ‖x_0 − x̂_0‖²/(2β̃_t) (Ho et al. 2020, Eq. 8 and 12).
  Each term is estimated with one draw of x_t per example and timestep. β_t is the
  default because it is the tighter bound wherever the data is smooth at the scale of
  the noise: for Gaussian data and the exact denoiser it comes within 0.002 nats per
  dimension of the true −log p at T = 1000, where β̃_t stays 0.46 above it
  (tests/test_likelihood.py); β̃_t can be the tighter one for nearly discrete data
  (Ho et al. 2020, Sec. 3.2, on the two extremes).
- **L_0.** The decoder is N(x̂_0(x_{t=0}), β_0 I) (σ_1² = β_1 in the paper's count).
  For continuous data ``decoder="gaussian"`` uses its density; for images quantised
  to ``levels`` grey levels in [−1, 1], ``decoder="discretized"`` integrates it over
  each value's bin, the outermost bins reaching to ±∞ (Ho et al. 2020, Eq. 13).
- **Bits per dimension.** The bound in nats divided by D ln 2. Point data is
  standardised by the pipeline, z = (x − m)/s, so −log p(x) = −log p(z) + Σ_d log s_d:
  :func:`variational_bound` adds that Jacobian term and reports the bound in the data's
  own coordinates. Images are left in model space: their bound is that of the
  discrete pixel values, so no Jacobian is involved.

With ``timesteps=k`` the sum over t is estimated from k timesteps per example, one
drawn uniformly from each of k equal strata of 1..T−1 and weighted by the stratum's
size: an unbiased estimate at k/(T−1) of the cost.

Any model works: the bound only needs ``predict(x_t, t) -> ε̂`` (every objective
converts to it), so ε-, x_0-, v- and score-trained networks are compared on one scale.

**Exact likelihood from the probability-flow ODE** (:func:`ode_log_likelihood`,
:func:`pipeline_ode_likelihood`; docs/likelihood.md). The ODE dx/dt = v(x, t) =
α'(t) x̂_0 + σ'(t) ε̂ (Song et al. 2021, Eq. 13, written with x_t = α x_0 + σ ε) carries
p_{t_min} to p_{t_max} exactly when x̂_0, ε̂ are the true posterior means, and along it
d log p_t(x(t))/dt = −∇·v (instantaneous change of variables, Chen et al. 2018, Thm. 1).
Integrating [x, Δ] from t_min to t_max gives log p_{t_min}(x_0) = log N(x(t_max); 0, s² I)
+ ∫ ∇·v dt, with any process and any objective.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffkit import diffusion as D
from diffkit.errors import DiffkitError
from diffkit.interfaces import Predict, Schedule

if TYPE_CHECKING:  # pragma: no cover
    from diffkit.pipeline import Pipeline
    from diffkit.process import Process
    from diffkit.sampling import DenoiseFn

__all__ = [
    "bound_terms",
    "variational_bound",
    "prior_kl",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "grid_levels",
    "ode_log_likelihood",
    "pipeline_ode_likelihood",
    "EXACT_DIVERGENCE_MAX_DIMS",
]

Variance = Literal["posterior", "beta"]
Decoder = Literal["gaussian", "discretized"]
LN2 = math.log(2.0)


def _per_example(v: Tensor) -> Tensor:
    return v.flatten(1).sum(dim=1)


def prior_kl(x0: Tensor, schedule: Schedule) -> Tensor:
    """L_T = KL(N(√ᾱ x_0, (1−ᾱ) I) ‖ N(0, I)) per example in nats, ᾱ = ᾱ_{T−1}
    (Ho et al. 2020, Eq. 5): ½ Σ_d (ᾱ x_0² + (1−ᾱ) − 1 − log(1−ᾱ))."""
    a = float(schedule.alphas_cumprod[-1])
    x = x0.double()
    return _per_example(0.5 * (a * x.square() - a - math.log1p(-a)))


def gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """log N(x; mean, var I) per example (float64)."""
    var = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    return _per_example(-0.5 * ((x.double() - mean.double()).square() / var + torch.log(2 * math.pi * var)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, var: Tensor | float, levels: int = 256) -> Tensor:
    """log ∏_i ∫_{bin(x_i)} N(y; mean_i, var) dy per example (Ho et al. 2020, Eq. 13).

    ``x`` holds values of a grid of ``levels`` points spanning [−1, 1] (8-bit images:
    256); each value's bin is [x − h, x + h], h = 1/(levels − 1), except that the bins
    of −1 and 1 extend to −∞ and +∞. Computed in float64 from log Φ, as
    log(Φ(b) − Φ(a)) = log Φ(b) + log(1 − e^{log Φ(a) − log Φ(b)}) on the side of the
    mean where the tail is small, so that bins far in a tail keep their precision.
    """
    x, mean = x.double(), mean.double()
    std = torch.as_tensor(var, dtype=torch.float64, device=x.device).sqrt()
    h = 1.0 / (levels - 1)
    upper = torch.where(x > 1.0 - h / 2, math.inf, (x + h - mean) / std)
    lower = torch.where(x < -1.0 + h / 2, -math.inf, (x - h - mean) / std)
    # Φ(u) − Φ(l) = Φ(−l) − Φ(−u): use the form whose arguments are mostly negative
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return _per_example(log_hi + torch.log(-torch.expm1(log_lo - log_hi)))


def grid_levels(x: Tensor, max_levels: int = 256, tol: float = 1e-4) -> int | None:
    """The smallest number of evenly spaced levels spanning [−1, 1] on which every value
    of ``x`` lies (up to ``tol`` of a step), or None if there is none up to ``max_levels``.
    scikit-learn's digits give 17 (grey levels 0..16), 8-bit images 256."""
    x = x.double().flatten()
    if x.numel() == 0 or x.min() < -1 - 1e-6 or x.max() > 1 + 1e-6:
        return None
    values = torch.unique(x)
    for levels in range(2, max_levels + 1):
        k = (values + 1.0) * (levels - 1) / 2.0
        if (k - k.round()).abs().max() <= tol:
            return levels
    return None


def _strata(T: int, timesteps: int | None) -> list[tuple[int, int]]:
    """Half-open ranges [lo, hi) covering 1..T−1: singletons, or ``timesteps`` equal strata."""
    if T < 2:
        raise ValueError("the bound needs a schedule of at least 2 steps")
    if timesteps is None or timesteps >= T - 1:
        return [(t, t + 1) for t in range(1, T)]
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    edges = torch.linspace(1, T, timesteps + 1, dtype=torch.float64).round().long().tolist()
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@torch.inference_mode()
def bound_terms(
    predict: Predict,
    schedule: Schedule,
    x0: Tensor,
    *,
    decoder: Decoder = "gaussian",
    levels: int = 256,
    variance: Variance = "beta",
    timesteps: int | None = None,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The terms of the variational bound per example, in nats, for ``x0`` in model space.

    Returns float64 tensors of shape ``[N]`` (on the CPU): ``L_T``, ``L_sum`` (Σ_{t>1}
    L_{t−1}) and ``L_0``, whose sum bounds −log p_θ(x_0) from above (Ho et al. 2020,
    Eq. 5). The network runs in ``x0``'s dtype and device; the bound's arithmetic is
    float64. ``timesteps`` and the estimators are described in the module docstring.
    """
    if decoder not in ("gaussian", "discretized"):
        raise ValueError(f"decoder must be 'gaussian' or 'discretized', got {decoder!r}")
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    if decoder == "discretized" and levels < 2:
        raise ValueError(f"levels must be at least 2, got {levels}")
    N = x0.shape[0]
    batch_size = batch_size or N
    strata = _strata(schedule.T, timesteps)
    beta0 = float(schedule.betas[0])
    out: dict[str, list[Tensor]] = {"L_T": [], "L_sum": [], "L_0": []}
    bar = tqdm(total=math.ceil(N / batch_size) * (len(strata) + 1), desc="bound", disable=not progress, leave=False)
    for start in range(0, N, batch_size):
        xb = x0[start : start + batch_size]
        B, dev = xb.shape[0], xb.device
        x64 = xb.double()
        total = torch.zeros(B, dtype=torch.float64, device=dev)
        for lo, hi in strata:
            t = torch.randint(lo, hi, (B,), generator=generator, device=dev) if hi - lo > 1 else torch.full((B,), lo, device=dev)
            eps = torch.randn(xb.shape, generator=generator, device=dev, dtype=xb.dtype)
            x_t = schedule.q_sample(xb, t, eps)
            a_t, a_s = schedule.alpha_bar(t, x64), schedule.alpha_bar(t - 1, x64)
            x0_hat = D.eps_to_x0(predict(x_t, t).double(), x_t.double(), a_t)
            c0, _, post_var = D.posterior_coefficients(a_t, a_s)
            sq = _per_example(c0.square() * (x64 - x0_hat).square())
            if variance == "posterior":
                kl = sq / (2.0 * post_var.flatten())
            else:  # KL(N(μ̃, β̃) ‖ N(μ_θ, β)), per dimension then summed
                beta = (1.0 - a_t / a_s).flatten()
                r = post_var.flatten() / beta
                kl = 0.5 * x64[0].numel() * (r - 1.0 - r.log()) + sq / (2.0 * beta)
            total += (hi - lo) * kl
            bar.update()
        out["L_sum"].append(total.cpu())
        # L_0: decode x_0 from code t = 0 with N(x̂_0, β_0 I)
        t = torch.zeros(B, dtype=torch.long, device=dev)
        eps = torch.randn(xb.shape, generator=generator, device=dev, dtype=xb.dtype)
        x_t = schedule.q_sample(xb, t, eps)
        mean = D.eps_to_x0(predict(x_t, t).double(), x_t.double(), schedule.alpha_bar(t, x64))
        if decoder == "gaussian":
            ll = gaussian_log_likelihood(x64, mean, beta0)
        else:
            ll = discretized_gaussian_log_likelihood(x64, mean, beta0, levels)
        out["L_0"].append((-ll).cpu())
        out["L_T"].append(prior_kl(x64, schedule).cpu())
        bar.update()
    bar.close()
    return {k: torch.cat(v) for k, v in out.items()}


def variational_bound(
    pipe: Pipeline,
    x0: Tensor,
    *,
    timesteps: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
    levels: int | None = None,
    variance: Variance = "beta",
    progress: bool = False,
) -> dict[str, Any]:
    """The variational bound of ``pipe`` on held-out data ``x0``, in bits per dimension.

    ``x0`` is in the data's own coordinates, as the dataset yields them (points
    unstandardised; images in [−1, 1]). Point data gets the Gaussian decoder and the
    Jacobian of the pipeline's standardisation, so the bound is that of the density of
    the points as given; images get the discretised decoder on ``levels`` grey levels
    (default: the coarsest grid holding every value of ``x0`` — 17 for scikit-learn's
    digits, 256 for 8-bit images — or 256 if there is none).

    Returns a dict: ``bpd`` (the bound, averaged over examples) and ``bpd_se`` (its
    standard error over examples), ``terms`` (``L_T``, ``L_sum``, ``L_0`` and, for
    points, ``jacobian``, each in bits/dim; they add up to ``bpd``), ``nats`` (the bound
    per example in nats), and what it was computed with: ``n``, ``dims``, ``T``,
    ``timesteps`` (per example), ``decoder``, ``levels``, ``variance``, ``seed``.
    """
    if x0.ndim < 2 or tuple(x0.shape[1:]) != tuple(pipe.context.sample_shape):
        raise DiffkitError(
            f"the data for the bound must have shape [N, {', '.join(map(str, pipe.context.sample_shape))}]"
            f" like the pipeline's samples, got {tuple(x0.shape)}"
        )
    if x0.shape[0] < 1:
        raise DiffkitError("the bound needs at least one example")
    if not pipe.schedule.discrete:
        raise DiffkitError(
            f"the variational bound is computed on a discrete table of timesteps, and this run's process is"
            f" continuous ({pipe.schedule!r}); use the exact likelihood of the probability-flow ODE instead"
            " (diffkit evaluate RUN --method ode; diffkit.likelihood.pipeline_ode_likelihood)"
        )
    points = pipe.context.data_kind == "points"
    device = pipe.device
    x = x0.to(device=device, dtype=torch.float32)
    jacobian = 0.0  # Σ_d log s_d, nats per example
    if points:
        if pipe.data_mean is None or pipe.data_std is None:
            raise DiffkitError("the pipeline has not been fitted (no standardisation of its point data); train it first")
        mean, std = pipe.data_mean.to(device), pipe.data_std.to(device)
        x = (x - mean) / std
        jacobian = float(std.double().log().sum())
        decoder: Decoder = "gaussian"
        used_levels: int | None = None
    else:
        decoder = "discretized"
        used_levels = levels or grid_levels(x0) or 256
    g = torch.Generator(device=device).manual_seed(seed)
    pipe.denoiser.eval()
    terms = bound_terms(
        pipe.predictor(),
        pipe.schedule,
        x,
        decoder=decoder,
        levels=used_levels or 256,
        variance=variance,
        timesteps=timesteps,
        batch_size=batch_size,
        generator=g,
        progress=progress,
    )
    dims = math.prod(pipe.context.sample_shape)
    nats = terms["L_T"] + terms["L_sum"] + terms["L_0"] + jacobian
    scale = 1.0 / (dims * LN2)
    n = nats.numel()
    out_terms = {k: float(v.mean()) * scale for k, v in terms.items()}
    if points:
        out_terms["jacobian"] = jacobian * scale
    return {
        "bpd": float(nats.mean()) * scale,
        "bpd_se": (float(nats.std()) / math.sqrt(n) if n > 1 else float("nan")) * scale,
        "terms": out_terms,
        "nats": nats,
        "n": n,
        "dims": dims,
        "T": pipe.schedule.T,
        "timesteps": len(_strata(pipe.schedule.T, timesteps)),
        "decoder": decoder,
        "levels": used_levels,
        "variance": variance,
        "seed": seed,
        "coordinates": "data (standardisation's Jacobian included)" if points else "model space, discrete pixel values",
    }


# -- exact likelihood from the probability-flow ODE --------------------------------------------
EXACT_DIVERGENCE_MAX_DIMS = 64
"""Up to this many dimensions per example the divergence is computed exactly (one
backward pass per dimension); above it Hutchinson's estimator is the default."""


def _divergence_exact(v: Tensor, x: Tensor) -> Tensor:
    """∇·v = Σ_i ∂v_i/∂x_i per example, one backward pass per dimension (v, x: ``[B, D]``)."""
    div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(x.shape[1]):
        (g,) = torch.autograd.grad(v[:, i].sum(), x, retain_graph=True)
        div = div + g[:, i].double()
    return div


def _divergence_hutchinson(v: Tensor, x: Tensor, z: Tensor) -> Tensor:
    """∇·v ≈ (1/K) Σ_k z_kᵀ (∂v/∂x) z_k with Rademacher z_k ``[K, B, D]``, unbiased since
    E[z zᵀ] = I (Hutchinson 1989; Grathwohl et al. 2019, FFJORD, Eq. 7). Each term is one
    vector–Jacobian product."""
    est = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(z.shape[0]):
        (zj,) = torch.autograd.grad(v, x, z[k].to(v.dtype), retain_graph=True)
        est = est + (zj.double() * z[k]).sum(dim=1)
    return est / z.shape[0]


def ode_log_likelihood(
    denoise: DenoiseFn,
    process: Process,
    x0: Tensor,
    *,
    exact_divergence: bool | None = None,
    hutchinson_samples: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    generator: torch.Generator | None = None,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """log p(x_0) per example, in nats (float64, shape ``[N]``), of the model whose
    probability-flow ODE is driven by ``denoise(x_t, t) -> (x̂_0, ε̂)`` on ``process``.

    Solves the augmented ODE (Chen et al. 2018, Thm. 1; Song et al. 2021, App. D.2)

        dx/dt = v(x, t) = α'(t) x̂_0(x, t) + σ'(t) ε̂(x, t),      d(Δ)/dt = ∇·v(x, t),

    from x(t_min) = x_0, Δ(t_min) = 0 to t_max with torchdiffeq (``method``, ``rtol``,
    ``atol``; the state is float64, the model runs in ``x0``'s dtype), and returns

        log p(x_0) = log N(x(t_max); 0, s² I) + Δ(t_max),   s = ``process.prior_std()``.

    **What it computes, precisely.** The state starts at t_eps = ``process.t_min`` with
    x(t_min) = x_0 itself, as Song et al. 2021 (App. D.2) do, so this is the density of
    the model's marginal at t_min, p_{t_min}(x_0) — the data convolved with N(0, σ(t_min)²)
    and scaled by α(t_min) — evaluated at the clean point, not p_0(x_0). For data smooth at
    the scale σ̃(t_min) = σ/α (1e-2 on vp and the linear table's t = 0, 2e-3 on edm) the
    difference is O(σ̃²) per dimension; for discrete data (images) p_0 has no density,
    which is why images are dequantised (:func:`pipeline_ode_likelihood`). It also
    replaces the model's p_{t_max} by the prior N(0, s² I): exact as α(t_max) → 0 on vp,
    a relative variance error of Var(x_0)/σ_max² on ve and edm.

    **Divergence.** ``exact_divergence`` (default: exact when D ≤
    :data:`EXACT_DIVERGENCE_MAX_DIMS`) takes ∂v_i/∂x_i by autograd, one backward pass per
    dimension; otherwise Hutchinson's estimator with ``hutchinson_samples`` Rademacher
    vectors per example, drawn once from ``generator`` and held fixed over the solve so the
    ODE stays deterministic (Grathwohl et al. 2019, Sec. 3.1): an unbiased estimate of
    log p_{t_min}(x_0).

    With ``return_stats`` also returns ``{"nfe": network evaluations, "prior":
    log N(x(t_max); 0, s² I), "delta": Δ(t_max), "x_T": x(t_max)}`` (per example; x_T
    flattened to ``[N, D]``), so a caller that knows p_{t_max} can replace the prior.
    """
    try:
        from torchdiffeq import odeint
    except ImportError as exc:  # pragma: no cover - torchdiffeq is a dependency of the ode sampler too
        raise DiffkitError("the exact likelihood needs torchdiffeq: pip install torchdiffeq") from exc
    if hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be at least 1, got {hutchinson_samples}")
    if x0.ndim < 2:
        raise ValueError(f"x0 must have shape [N, ...], got {tuple(x0.shape)}")
    B, event = x0.shape[0], tuple(x0.shape[1:])
    dims = math.prod(event)
    exact = dims <= EXACT_DIVERGENCE_MAX_DIMS if exact_divergence is None else bool(exact_divergence)
    dev, model_dtype = x0.device, x0.dtype
    t0, t1 = float(process.t_min), float(process.t_max)
    z: Tensor | None = None
    if not exact:  # Rademacher probes, ±1 with probability ½ each
        bits = torch.randint(0, 2, (hutchinson_samples, B, dims), generator=generator, device=dev)
        z = bits.to(torch.float64) * 2.0 - 1.0
    nfe = 0

    def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        # dopri5 never evaluates outside [t0, t1]; clamping guards the table's knots anyway
        tf = min(max(float(t), t0), t1)
        tt = torch.full((B,), tf, dtype=torch.float64, device=dev)
        da, ds = process.derivatives(torch.tensor(tf, dtype=torch.float64))
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            d = denoise(x.to(model_dtype).reshape(B, *event), tt)
            # v = α' x̂_0 + σ' ε̂ (Song et al. 2021, Eq. 13 in terms of α and σ)
            v = float(da) * d.x0.reshape(B, dims).double() + float(ds) * d.eps.reshape(B, dims).double()
            div = _divergence_exact(v, x) if exact else _divergence_hutchinson(v, x, z)  # type: ignore[arg-type]
        return v.detach(), div.detach()

    with torch.inference_mode(False):
        x_start = x0.detach().clone().reshape(B, dims).to(torch.float64)
        delta0 = torch.zeros(B, dtype=torch.float64, device=dev)
        times = torch.tensor([t0, t1], dtype=torch.float64, device=dev)
        xs, deltas = odeint(augmented, (x_start, delta0), times, method=method, rtol=rtol, atol=atol)
    x_T, delta = xs[-1], deltas[-1]
    s = process.prior_std()
    # log N(x_T; 0, s² I) (the prior a sampler starts from)
    prior = -0.5 * (x_T.square().sum(dim=1) / (s * s) + dims * math.log(2 * math.pi * s * s))
    logp = prior + delta
    if return_stats:
        return logp, {"nfe": nfe, "prior": prior, "delta": delta, "x_T": x_T}
    return logp


def pipeline_ode_likelihood(
    pipe: Pipeline,
    x0: Tensor,
    *,
    batch_size: int = 512,
    seed: int = 0,
    levels: int | None = None,
    exact_divergence: bool | None = None,
    hutchinson_samples: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> dict[str, Any]:
    """The negative log-likelihood of ``pipe`` on ``x0`` from the probability-flow ODE
    (:func:`ode_log_likelihood`), averaged over examples.

    ``x0`` is in the data's own coordinates, as for :func:`variational_bound`.

    - **Points**: nats per example in the data's coordinates. The pipeline standardises
      z = (x − m)/s, so −log p(x) = −log p(z) + Σ_d log s_d (change of variables).
    - **Images** in [−1, 1] on ``levels`` grey levels (default: detected, else 256):
      bits per dimension of the discrete values with uniform dequantisation. With the bin
      width h = 2/(levels − 1) (1/127.5 for 8-bit images), y = x + h(u − ½), u ~ U[0, 1)^D,
      and by Jensen −log P(x) ≤ E_u[−log p(y)] − D log h (Theis et al. 2016; Ho et al. 2020,
      Sec. 4.2), estimated with one draw of u per example.

    Returns a dict: ``nll`` (nats per example for points, bits/dim for images) and
    ``nll_se`` (its standard error over examples), ``unit``, ``bpd`` (bits/dim in either
    case), ``nats`` (−log p per example, in nats, in the coordinates above), ``nfe``
    (network evaluations per batch, mean), and what it was computed with.
    """
    if x0.ndim < 2 or tuple(x0.shape[1:]) != tuple(pipe.context.sample_shape):
        raise DiffkitError(
            f"the data for the likelihood must have shape [N, {', '.join(map(str, pipe.context.sample_shape))}]"
            f" like the pipeline's samples, got {tuple(x0.shape)}"
        )
    if x0.shape[0] < 1:
        raise DiffkitError("the likelihood needs at least one example")
    points = pipe.context.data_kind == "points"
    device = pipe.device
    dtype = next(pipe.denoiser.parameters(), torch.empty(0)).dtype
    x = x0.to(device=device, dtype=torch.float64)
    dims = math.prod(pipe.context.sample_shape)
    g = torch.Generator(device=device).manual_seed(seed)
    correction = 0.0  # nats per example added to −log p(model-space y)
    used_levels: int | None = None
    if points:
        if pipe.data_mean is None or pipe.data_std is None:
            raise DiffkitError("the pipeline has not been fitted (no standardisation of its point data); train it first")
        std = pipe.data_std.to(device).double()
        x = (x - pipe.data_mean.to(device).double()) / std
        correction = float(std.log().sum())  # Σ_d log s_d
    else:
        used_levels = levels or grid_levels(x0) or 256
        h = 2.0 / (used_levels - 1)
        u = torch.rand(x.shape, generator=g, device=device, dtype=torch.float64)
        x = x + h * (u - 0.5)
        correction = -dims * math.log(h)
    pipe.denoiser.eval()
    denoise = pipe.denoise_fn()
    nats, nfes = [], []
    bar = tqdm(total=x.shape[0], desc="ode likelihood", disable=not progress, leave=False)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(dtype)
        logp, stats = ode_log_likelihood(
            denoise,
            pipe.schedule,
            xb,
            exact_divergence=exact_divergence,
            hutchinson_samples=hutchinson_samples,
            rtol=rtol,
            atol=atol,
            generator=g,
            return_stats=True,
        )
        nats.append((-logp + correction).cpu())
        nfes.append(stats["nfe"])
        bar.update(xb.shape[0])
    bar.close()
    per = torch.cat(nats)
    n = per.numel()
    se = float(per.std()) / math.sqrt(n) if n > 1 else float("nan")
    to_bits = 1.0 / (dims * LN2)
    mean = float(per.mean())
    return {
        "nll": mean if points else mean * to_bits,
        "nll_se": se if points else se * to_bits,
        "unit": "nats" if points else "bits/dim",
        "bpd": mean * to_bits,
        "nats": per,
        "n": n,
        "dims": dims,
        "nfe": sum(nfes) / len(nfes),
        "divergence": (
            "exact" if (dims <= EXACT_DIVERGENCE_MAX_DIMS if exact_divergence is None else exact_divergence)
            else f"hutchinson ({hutchinson_samples} Rademacher probe{'s' if hutchinson_samples > 1 else ''})"
        ),
        "rtol": rtol,
        "atol": atol,
        "t_min": float(pipe.schedule.t_min),
        "t_max": float(pipe.schedule.t_max),
        "levels": used_levels,
        "seed": seed,
        "coordinates": (
            "data (standardisation's Jacobian included)"
            if points
            else f"discrete pixel values, uniformly dequantised on {used_levels} levels"
        ),
    }
