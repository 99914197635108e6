"""Exact optimal denoisers for data whose noisy marginals are known in closed form.

A sampler only ever sees ``predict(x_t, t) -> ε̂``. For the two families below the
minimiser of the ε-prediction loss, ε̂*(x_t, t) = E[ε | x_t], is known exactly, so a
sampler can be tested (or benchmarked) with no network in the way: whatever error
remains is the sampler's own.

The identity used throughout is Tweedie's formula. With x_t = √ᾱ x_0 + σ ε,
σ = √(1 − ᾱ) and ε ~ N(0, I) independent of x_0, the marginal of x_t is
p_t = (law of √ᾱ x_0) ∗ N(0, σ² I), and

    ∇ log p_t(x_t) = E[∇_{x_t} log N(x_t; √ᾱ x_0, σ² I) | x_t] = −E[ε | x_t] / σ,

so E[ε | x_t] = −σ ∇ log p_t(x_t)  (Efron 2011; Song et al. 2021, Eq. 7 setting;
:func:`diffkit.diffusion.score_to_eps`).

Data of any shape ``[B, *event_shape]`` is handled by flattening each sample to a
vector of length D = ∏ event_shape (e.g. D = C·H·W for images); all arithmetic is
float64 and results come back in the input's dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from diffkit.interfaces import Schedule
from diffkit.process import Process
from diffkit.sampling import Denoised, DenoiseFn

__all__ = ["GaussianData", "GaussianMixture", "process_coefficients"]

Predict = Callable[[Tensor, Tensor], Tensor]


def _alpha_bar(alpha_bar: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """ᾱ as float64 of shape ``[batch, 1]`` from a float, a 0-d tensor, or one value per
    sample (shape ``[B]`` or already broadcast, e.g. ``[B, 1, 1, 1]``)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64, device=device).reshape(-1)
    if a.numel() == 1:
        a = a.expand(batch)
    elif a.numel() != batch:
        raise ValueError(f"alpha_bar must be a scalar or hold one value per sample ({batch}), got {a.numel()} values")
    if ((a <= 0) | (a > 1)).any():
        raise ValueError("alpha_bar must lie in (0, 1]")
    return a.reshape(batch, 1)


def _abar_ext(schedule: Schedule) -> Tensor:
    """ᾱ as float64 with the clean-data value 1 prepended: row t + 1 holds ᾱ_t, so
    t = -1 (clean data) reads row 0, matching :meth:`Schedule.alpha_bar`."""
    abar = schedule.alphas_cumprod.to(torch.float64).cpu()
    return torch.cat([abar.new_ones(1), abar])


def process_coefficients(process: Process, t: Tensor, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """α(t), σ(t) of ``process`` as float64 ``[batch, 1]`` on ``device``."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
    if tt.numel() == 1 or bool((tt == tt[0]).all()):  # one time for the batch: evaluate once
        a, s = process.alpha_sigma(tt[:1])
        a, s = a.expand(batch), s.expand(batch)
    else:
        a, s = process.alpha_sigma(tt)
    return a.to(device).reshape(batch, 1), s.to(device).reshape(batch, 1)


def _flatten(x: Tensor, dim: int) -> Tensor:
    """``[B, *event] -> [B, D]`` in float64, checking that the event has D elements."""
    if x.ndim < 1 or math.prod(x.shape[1:]) != dim:
        raise ValueError(f"expected data of shape [batch, ...] with {dim} values per sample, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], dim).to(torch.float64)


class GaussianData:
    """x_0 ~ N(μ, Σ) in D dimensions, with its exact denoiser, score and sampler.

    **Marginal.** x_t = √ᾱ x_0 + σ ε is a sum of independent Gaussians, so

        x_t ~ N(√ᾱ μ, C),   C = ᾱ Σ + (1 − ᾱ) I.

    **Denoiser.** ∇ log p_t(x) = −C⁻¹ (x − √ᾱ μ), hence by Tweedie
    E[ε | x_t] = σ C⁻¹ (x_t − √ᾱ μ). (The same follows from Gaussian conditioning:
    Cov(ε, x_t) = σ I, so E[ε | x_t] = σ I · C⁻¹ (x_t − E x_t).)

    **Batches of t.** With Σ = U diag(λ) Uᵀ (symmetric eigendecomposition, done once),
    C = U diag(ᾱλ + 1 − ᾱ) Uᵀ for every ᾱ, so C⁻¹ = U diag(1 / (ᾱλ + 1 − ᾱ)) Uᵀ. Each
    sample's own ᾱ therefore costs only a per-coordinate scaling in the eigenbasis:

        ε̂ = U [ σ / (ᾱλ + 1 − ᾱ) ⊙ Uᵀ (x_t − √ᾱ μ) ],

    exact (no per-t solve) and valid for singular Σ (λ = 0) whenever ᾱ < 1. The
    per-timestep factors σ_t / (ᾱ_t λ + 1 − ᾱ_t) are tabulated once per schedule.

    ``event_shape`` (default ``(D,)``) is the shape :meth:`sample` returns per sample;
    :meth:`predict` and :meth:`score` accept any ``[B, ...]`` with D values per sample.
    """

    def __init__(self, mean: Tensor, cov: Tensor, event_shape: Sequence[int] | None = None) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).detach().cpu()
        cov = torch.as_tensor(cov, dtype=torch.float64).detach().cpu()
        if mean.ndim != 1:
            raise ValueError(f"mean must have shape [D], got {tuple(mean.shape)}")
        D = mean.numel()
        if cov.shape != (D, D):
            raise ValueError(f"cov must have shape [{D}, {D}] to match the mean, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("cov must be symmetric")
        lam, U = torch.linalg.eigh(cov)
        tol = 1e-10 * max(1.0, lam.abs().max().item())
        if (lam < -tol).any():
            raise ValueError(f"cov must be positive semi-definite; smallest eigenvalue {lam.min().item():.3g}")
        self.mean = mean
        self.cov = cov
        self.eigvals = lam.clamp(min=0.0)
        self.eigvecs = U
        self.dim = D
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold {D} values")

    # -- closed forms -------------------------------------------------------------
    def marginal(self, alpha_bar: float) -> tuple[Tensor, Tensor]:
        """Mean √ᾱ μ and covariance ᾱΣ + (1 − ᾱ) I of x_t (float64)."""
        a = float(alpha_bar)
        return math.sqrt(a) * self.mean, a * self.cov + (1.0 - a) * torch.eye(self.dim, dtype=torch.float64)

    def _whiten(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(Uᵀ(x − √ᾱ μ), 1/(ᾱλ + 1 − ᾱ), U) on x's device, all float64, for x ``[B, D]``."""
        U = self.eigvecs.to(x.device)
        lam = self.eigvals.to(x.device)
        y = (x - a.sqrt() * self.mean.to(x.device)) @ U
        return y, 1.0 / (a * lam + (1.0 - a)), U

    def score(self, x: Tensor, alpha_bar: float | Tensor) -> Tensor:
        """∇ log p_t(x) = −C⁻¹ (x − √ᾱ μ) at noise level ``alpha_bar`` (scalar or per
        sample); ᾱ = 1 is the clean data and needs Σ invertible."""
        flat = _flatten(x, self.dim)
        a = _alpha_bar(alpha_bar, flat.shape[0], flat.device)
        y, inv, U = self._whiten(flat, a)
        return (-(y * inv) @ U.T).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, alpha_bar: float | Tensor = 1.0) -> Tensor:
        """log N(x; √ᾱ μ, C) per sample, shape ``[B]`` (float64)."""
        flat = _flatten(x, self.dim)
        a = _alpha_bar(alpha_bar, flat.shape[0], flat.device)
        y, inv, _ = self._whiten(flat, a)
        logdet = -inv.log().sum(dim=1)
        return -0.5 * ((y.square() * inv).sum(dim=1) + logdet + self.dim * math.log(2 * math.pi))

    def denoiser(self, process: Process) -> DenoiseFn:
        """The exact (x̂_0, ε̂) = (E[x_0 | x_t], E[ε | x_t]) under any process x_t = α x_0 + σ ε:
        with r = Uᵀ(x_t − αμ) and d = α²λ + σ² (C = α²Σ + σ²I in the eigenbasis),
        ε̂ = U(σ r/d) and x̂_0 = μ + U(αλ r/d) (Gaussian conditioning)."""

        def denoise(x_t: Tensor, t: Tensor) -> Denoised:
            flat = _flatten(x_t, self.dim)
            a, s = process_coefficients(process, t, flat.shape[0], flat.device)
            U = self.eigvecs.to(flat.device)
            lam = self.eigvals.to(flat.device)
            mu = self.mean.to(flat.device)
            r = (flat - a * mu) @ U
            d = a * a * lam + s * s
            eps = (s * r / d) @ U.T
            x0 = mu + (a * lam * r / d) @ U.T
            return Denoised(x0.reshape(x_t.shape).to(x_t.dtype), eps.reshape(x_t.shape).to(x_t.dtype))

        return denoise

    def predict(self, schedule: Schedule) -> Predict:
        """The exact ε̂(x_t, t) = E[ε | x_t] for ``schedule`` (t of shape ``[B]`` or scalar,
        ``-1`` meaning clean data, where ε̂ = 0)."""
        abar = _abar_ext(schedule)
        lam = self.eigvals
        # per-timestep tables, float64: √ᾱ_t and σ_t / (ᾱ_t λ + 1 − ᾱ_t), shape [T+1, D]
        sqrt_a = abar.sqrt()
        gain = (1.0 - abar).sqrt()[:, None] / (abar[:, None] * lam + (1.0 - abar)[:, None])
        gain[0] = 0.0  # ᾱ = 1: no noise, ε̂ = 0 (avoids 0/0 when λ = 0)
        cache: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

        def predict(x_t: Tensor, t: Tensor) -> Tensor:
            dev = x_t.device
            if dev not in cache:
                cache[dev] = tuple(v.to(dev) for v in (sqrt_a, gain, self.eigvecs, self.mean))
            sa, g, U, mu = cache[dev]
            flat = _flatten(x_t, self.dim)
            idx = torch.as_tensor(t, device=dev).long().reshape(-1).expand(flat.shape[0]) + 1
            y = (flat - sa[idx, None] * mu) @ U
            return ((y * g[idx]) @ U.T).reshape(x_t.shape).to(x_t.dtype)

        return predict

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """n draws μ + U diag(√λ) z, shape ``[n, *event_shape]``."""
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.mean + (z * self.eigvals.sqrt()) @ self.eigvecs.T
        return x.reshape(n, *self.event_shape).to(dtype)


class GaussianMixture:
    """x_0 ~ Σ_k w_k N(μ_k, s_k² I): isotropic components, with exact denoiser, score,
    log-density, noisy classifier and sampler.

    **Marginal.** Given the component k, x_t | k ~ N(√ᾱ μ_k, v_k I) with
    v_k = ᾱ s_k² + 1 − ᾱ, so p_t(x) = Σ_k w_k N(x; √ᾱ μ_k, v_k I).

    **Noisy classifier.** Bayes' rule on the components gives the responsibilities

        r_k(x) = p(k | x_t = x) = softmax_k( log w_k − D/2 log(2π v_k) − ‖x − √ᾱ μ_k‖² / (2 v_k) ),

    computed with log-sum-exp; this is the exact p(y | x_t) a classifier-guidance
    model should learn when the labels are the components.

    **Score and denoiser.** ∇ log p_t = Σ_k r_k ∇ log N(x; √ᾱ μ_k, v_k I)
    = −Σ_k r_k (x − √ᾱ μ_k) / v_k, and by Tweedie

        E[ε | x_t] = −σ ∇ log p_t(x_t) = σ Σ_k r_k (x_t − √ᾱ μ_k) / v_k.

    With a label y the same formula with r = one-hot(y) is E[ε | x_t, y].

    ``stds`` may contain zeros (point masses); then ᾱ must stay below 1 in
    :meth:`score`, :meth:`log_prob` and :meth:`class_posterior`.
    """

    def __init__(
        self, means: Tensor, stds: Tensor, weights: Tensor | None = None, event_shape: Sequence[int] | None = None
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64).detach().cpu()
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(means.shape)}")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).detach().cpu().reshape(-1)
        if stds.numel() == 1:
            stds = stds.expand(K).clone()
        if stds.shape != (K,) or (stds < 0).any() or not torch.isfinite(stds).all():
            raise ValueError(f"stds must be K = {K} non-negative values, got {tuple(stds.shape)}")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be K = {K} non-negative values with a positive sum")
        self.means = means
        self.stds = stds
        self.weights = weights / weights.sum()
        self.num_components = K
        self.dim = D
        self.event_shape = tuple(event_shape) if event_shape is not None else (D,)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold {D} values")

    # -- closed forms on flattened float64 data -----------------------------------
    def _terms(self, flat: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-joint log w_k + log N(x; √ᾱ μ_k, v_k I) ``[B, K]``, the
        residuals x − √ᾱ μ_k ``[B, K, D]`` and the variances v_k ``[B, K]``."""
        dev = flat.device
        mu = self.means.to(dev)
        var = a * self.stds.to(dev).square() + (1.0 - a)  # [B, K]
        if (var <= 0).any():
            raise ValueError("a component with std 0 has no density at alpha_bar = 1")
        resid = flat[:, None, :] - a.sqrt()[:, :, None] * mu  # [B, K, D]
        log_joint = (
            self.weights.to(dev).log()
            - 0.5 * self.dim * (2 * math.pi * var).log()
            - 0.5 * resid.square().sum(dim=-1) / var
        )
        return log_joint, resid, var

    def log_prob(self, x: Tensor, alpha_bar: float | Tensor = 1.0) -> Tensor:
        """log p_t(x) per sample, shape ``[B]`` (float64); ᾱ = 1 is the clean data."""
        flat = _flatten(x, self.dim)
        log_joint, _, _ = self._terms(flat, _alpha_bar(alpha_bar, flat.shape[0], flat.device))
        return torch.logsumexp(log_joint, dim=1)

    def class_posterior(self, x_t: Tensor, alpha_bar: float | Tensor) -> Tensor:
        """p(k | x_t) for every component, shape ``[B, K]``, in x_t's dtype."""
        flat = _flatten(x_t, self.dim)
        log_joint, _, _ = self._terms(flat, _alpha_bar(alpha_bar, flat.shape[0], flat.device))
        return torch.softmax(log_joint, dim=1).to(x_t.dtype)

    def score(self, x: Tensor, alpha_bar: float | Tensor) -> Tensor:
        """∇ log p_t(x) = −Σ_k r_k (x − √ᾱ μ_k) / v_k, in x's shape and dtype."""
        flat = _flatten(x, self.dim)
        log_joint, resid, var = self._terms(flat, _alpha_bar(alpha_bar, flat.shape[0], flat.device))
        r = torch.softmax(log_joint, dim=1)
        return (-(r / var)[:, :, None] * resid).sum(dim=1).reshape(x.shape).to(x.dtype)

    def denoiser(self, process: Process, y: Tensor | None = None) -> DenoiseFn:
        """The exact (x̂_0, ε̂) under any process x_t = α x_0 + σ ε: with v_k = α²s_k² + σ² and
        r_k = p(k | x_t) (one-hot(y) given labels), ε̂ = Σ_k r_k σ (x_t − αμ_k)/v_k and
        x̂_0 = Σ_k r_k (μ_k + α s_k² (x_t − αμ_k)/v_k)."""

        def denoise(x_t: Tensor, t: Tensor) -> Denoised:
            flat = _flatten(x_t, self.dim)
            B, dev = flat.shape[0], flat.device
            a, s = process_coefficients(process, t, B, dev)
            mu, sd2 = self.means.to(dev), self.stds.to(dev).square()
            var = a * a * sd2 + s * s  # [B, K]
            resid = flat[:, None, :] - a[:, :, None] * mu  # [B, K, D]
            if y is None:
                log_joint = (
                    self.weights.to(dev).log()
                    - 0.5 * self.dim * (2 * math.pi * var).log()
                    - 0.5 * resid.square().sum(dim=-1) / var
                )
                r = torch.softmax(log_joint, dim=1)
            else:
                labels = torch.as_tensor(y, device=dev).long().reshape(-1).expand(B)
                r = torch.nn.functional.one_hot(labels, self.num_components).to(torch.float64)
            eps = ((r * s / var)[:, :, None] * resid).sum(dim=1)
            x0 = (r[:, :, None] * (mu + (a * sd2 / var)[:, :, None] * resid)).sum(dim=1)
            return Denoised(x0.reshape(x_t.shape).to(x_t.dtype), eps.reshape(x_t.shape).to(x_t.dtype))

        return denoise

    def predict(self, schedule: Schedule, y: Tensor | None = None) -> Predict:
        """The exact ε̂(x_t, t) = E[ε | x_t] for ``schedule``; with labels ``y`` (shape
        ``[B]``, one per sample of the batches it will see) E[ε | x_t, y] instead."""
        abar_ext = _abar_ext(schedule)

        def predict(x_t: Tensor, t: Tensor) -> Tensor:
            flat = _flatten(x_t, self.dim)
            B = flat.shape[0]
            idx = torch.as_tensor(t).long().cpu().reshape(-1).expand(B) + 1
            a = abar_ext[idx].to(flat.device).reshape(B, 1)
            sigma = (1.0 - a).sqrt()
            a = torch.where(a >= 1, 0.5, a)  # t = -1 rows have σ = 0, so ε̂ = 0 whatever ᾱ stands in
            log_joint, resid, var = self._terms(flat, a)
            if y is None:
                r = torch.softmax(log_joint, dim=1)
            else:
                labels = torch.as_tensor(y, device=flat.device).long().reshape(-1).expand(B)
                r = torch.nn.functional.one_hot(labels, self.num_components).to(torch.float64)
            eps = sigma * ((r / var)[:, :, None] * resid).sum(dim=1)
            return eps.reshape(x_t.shape).to(x_t.dtype)

        return predict

    def sample(
        self, n: int, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """n draws and their component labels: ``(x [n, *event_shape], labels [n])``."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + self.stds[labels, None] * z
        return x.reshape(n, *self.event_shape).to(dtype), labels
