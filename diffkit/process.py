"""Noise processes in continuous time: x_t = α(t)·x_0 + σ(t)·ε.

Every diffusion model diffkit knows is one of these. From α and σ alone follow the
log signal-to-noise ratio λ(t) = log α²/σ², the noise level in the data's own scale
σ̃(t) = σ/α (Karras et al. 2022 write σ for it), the forward SDE's drift and
diffusion, and the probability-flow ODE (Song et al. 2021, Eq. 13). A discrete DDPM
table (ᾱ over integer t) is one kind of process: :class:`diffkit.interfaces.Schedule`.

All coefficients are computed in float64 (float32 on MPS, which has none) and cast to
the data's dtype at the last moment; t is always a float64 tensor of shape ``[B]`` or a
scalar.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Process", "GRIDS", "Grid", "karras_sigmas", "karras_ramp", "expand_like"]

GRIDS = ("linspace", "leading", "trailing", "quadratic", "logsnr", "karras")
Grid = Literal["linspace", "leading", "trailing", "quadratic", "logsnr", "karras"]


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Append singleton axes to ``v`` (shape ``[B]`` or scalar) so it broadcasts against ``x``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


ALPHA_SIGMA = "_diffkit_alpha_sigma"


def mark_alpha_sigma(t: Tensor, alpha_sigma: tuple[float, float], time: float | None = None) -> Tensor:
    """``t`` (every entry the same time, ``time``) marked with its α, σ as floats, so that
    the conversions it reaches skip recomputing them (:func:`known_alpha_sigma`). Only the
    tensor object itself carries the mark: anything computed from it does not."""
    setattr(t, ALPHA_SIGMA, alpha_sigma)
    if time is not None:
        setattr(t, TIME, float(time))
    return t


TIME = "_diffkit_time"


def network_inputs(process: Process, t: Tensor, like: Tensor) -> tuple[Tensor | None, Tensor]:
    """(c_in(t) broadcast against ``like`` or ``None``, the conditioning c(t) on ``like``'s
    device): what the network is given besides x_t. For a batch of one time marked by the
    loop (:func:`mark_alpha_sigma`) they are computed once per (time, batch, device, dtype)
    and kept on the process (a grid revisits its times every run); the network must not
    write into them."""
    time = getattr(t, TIME, None)
    key = None
    if time is not None:
        key = (time, t.shape[0], like.device, like.dtype, like.ndim)
        hit = process.__dict__.setdefault("_network_inputs", {}).get(key)
        if hit is not None:
            return hit
    c_in = process.input_scale(t)
    if c_in is not None:
        c_in = c_in.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))
    out = (c_in, process.conditioning(t).to(like.device))
    if key is not None:
        cache = process.__dict__["_network_inputs"]
        if len(cache) >= 4096:
            cache.clear()
        cache[key] = out
    return out


def known_alpha_sigma(t: Tensor) -> tuple[float, float] | None:
    """α(t), σ(t) as floats where ``t`` is a batch of one time marked by the sampling loop, else ``None``."""
    return getattr(t, ALPHA_SIGMA, None)


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


CLEAN_END_SIGMA_TILDE = 0.002
"""Where a logsnr or karras grid ends on a process whose σ reaches 0 at t_min (rectified
flow), which has no finite λ there: EDM's σ_min (Karras et al. 2022, Table 1)."""


def karras_sigmas(sigma_max: float, sigma_min: float, steps: int, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0..N−1
    (Karras et al. 2022, Eq. 5), float64, descending."""
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return karras_ramp(sigma_max, sigma_min, torch.linspace(0, 1, steps, dtype=torch.float64), rho)


def karras_ramp(sigma_max: float, sigma_min: float, ramp: Tensor, rho: float = 7.0) -> Tensor:
    """σ = (σ_max^{1/ρ} + r·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ at each r of ``ramp`` in [0, 1]
    (Karras et al. 2022, Eq. 5 with r = i/(N−1))."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class Process(ABC):
    """The forward process x_t = α(t)·x_0 + σ(t)·ε, ε ~ N(0, I), for t in [t_min, t_max].

    A subclass gives :meth:`alpha_sigma`; it may also say what the network is
    conditioned on (:meth:`conditioning`), how its input is scaled (:meth:`input_scale`),
    how training draws t (:meth:`sample_t`) and which grid samplers use by default.

    ``t_clean`` is the time of the clean data (α = 1, σ = 0): the end of every sampler's
    grid. It is 0 where the formulas reach σ = 0 there (VP, EDM, rectified flow), and −1
    where they never do (the discrete tables, VE), which then define α, σ = 1, 0 there.
    """

    t_min: float = 0.0
    t_max: float = 1.0
    t_clean: float = 0.0
    discrete: bool = False
    conditioning_scale: float = 1.0
    default_grid: Grid = "linspace"

    # -- what a subclass provides ----------------------------------------------------
    @abstractmethod
    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α(t) and σ(t) for float64 t (any shape)."""

    # -- derived quantities ------------------------------------------------------------
    def log_snr(self, t: Tensor) -> Tensor:
        """λ(t) = log α(t)²/σ(t)² (Kingma et al. 2021), strictly decreasing in t."""
        a, s = self.alpha_sigma(_f64(t))
        return 2.0 * (a.log() - s.log())

    def sigma_tilde(self, t: Tensor) -> Tensor:
        """σ̃(t) = σ(t)/α(t): the noise level of x_t/α(t), Karras et al. 2022's σ."""
        a, s = self.alpha_sigma(_f64(t))
        return s / a

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """The t in [t_min, t_max] whose σ̃(t) is ``sigma_tilde`` (clamped into the range;
        σ̃ = 0 gives ``t_clean``). Bisection by default; processes with a closed-form
        inverse override it."""
        target = _f64(sigma_tilde)
        lo = torch.full_like(target, self.t_min)
        hi = torch.full_like(target, self.t_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            below = self.sigma_tilde(mid) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        t = 0.5 * (lo + hi)
        return torch.where(target <= 0, torch.full_like(t, self.t_clean), t)

    def t_of_log_snr(self, lam: Tensor) -> Tensor:
        """The t whose λ(t) is ``lam`` (λ = 2 log(1/σ̃))."""
        return self.t_of_sigma_tilde(torch.exp(-0.5 * _f64(lam)))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """dα/dt and dσ/dt at float64 t (autograd of :meth:`alpha_sigma` unless overridden)."""
        with torch.enable_grad(), torch.inference_mode(False):
            tt = _f64(t).detach().clone().requires_grad_(True)
            a, s = self.alpha_sigma(tt)
            da = torch.autograd.grad(a.sum(), tt, allow_unused=True, retain_graph=True)[0] if a.requires_grad else None
            ds = torch.autograd.grad(s.sum(), tt, allow_unused=True)[0] if s.requires_grad else None
        zero = torch.zeros_like(tt).detach()
        return (zero if da is None else da.detach()), (zero if ds is None else ds.detach())

    def drift_diffusion(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The forward SDE dx = f(t)·x dt + g(t) dw whose marginals are this process:
        f = α'/α and g² = 2σσ' − 2fσ² (Kingma et al. 2021, App. A; Karras et al. 2022, Eq. 4
        with s = α). Returns (f, g²)."""
        t = _f64(t)
        a, s = self.alpha_sigma(t)
        da, ds = self.derivatives(t)
        f = da / a
        return f, 2.0 * s * ds - 2.0 * f * s * s

    def conditioning(self, t: Tensor) -> Tensor:
        """What the network is given as its time input: ``conditioning_scale``·t by default."""
        return (self.conditioning_scale * _f64(t)).float()

    def input_scale(self, t: Tensor) -> Tensor | None:
        """c_in(t), the factor applied to x_t before the network sees it; ``None`` for 1."""
        return None

    def sample_t(self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """How training draws t: uniform on [t_min, t_max] unless a process says otherwise."""
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return self.t_min + (self.t_max - self.t_min) * u

    def prior_std(self) -> float:
        """The standard deviation of the prior x_{t_max} ~ N(0, s² I) a sampler starts from:
        s² = α² + σ² at t_max, the variance of x_t for data of unit variance."""
        a, s = self.alpha_sigma(_f64(self.t_max))
        return float(torch.sqrt(a * a + s * s))

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α(t), σ(t)) broadcast against ``like``, in float64 (float32 on MPS), on its device."""
        dtype = torch.float32 if like.device.type == "mps" else torch.float64
        a, s = self.alpha_sigma(_f64(t).cpu())
        return expand_like(a.to(like.device, dtype), like), expand_like(s.to(like.device, dtype), like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α(t) x_0 + σ(t) ε (Ho et al. 2020, Eq. 4; Song et al. 2021, Eq. 29)."""
        a, s = self.coefficients(t, x0)
        return a.to(x0.dtype) * x0 + s.to(x0.dtype) * noise

    def transition(self, x_s: Tensor, s: float, t: float, noise: Tensor) -> Tensor:
        """A draw of the forward kernel q(x_t | x_s) for t above s: x_t = (α_t/α_s)·x_s +
        √(σ_t² − (α_t/α_s)² σ_s²)·ε (Kingma et al. 2021, Eq. 33), on a VP table
        N(√(ᾱ_t/ᾱ_s) x_s, (1 − ᾱ_t/ᾱ_s) I) (Ho et al. 2020, Eq. 2 composed; RePaint's
        resampling, Lugmayr et al. 2022, Alg. 1 line 10)."""
        a, sig = self.alpha_sigma(_f64(torch.tensor([float(s), float(t)])))
        ratio = float(a[1] / a[0])
        std = float((sig[1] ** 2 - ratio**2 * sig[0] ** 2).clamp_min(0.0).sqrt())
        return ratio * x_s + std * noise

    def grid(self, steps: int, spacing: Grid | None = None, *, rho: float = 7.0, start: float | None = None) -> Tensor:
        """The times a sampler visits in ``steps`` steps: ``steps`` noisy times descending
        from t_max to t_min, then ``t_clean`` (float64, length steps + 1). ``start`` begins
        the walk at that time and keeps the grid's times below it, as a discrete table's
        :meth:`~diffkit.interfaces.Schedule.timesteps` does (SDEdit starts there, and
        RePaint's resampling returns to times the walk visited).

        ``linspace`` is uniform in t; ``quadratic`` crowds the clean end, t_i ∝ (1 − i/N)²
        (Song et al. 2021, DDIM, App. D.2); ``logsnr`` is uniform in λ (Lu et al. 2022,
        DPM-Solver, Sec. 3.3); ``karras`` is uniform in σ̃^{1/ρ} (Karras et al. 2022, Eq. 5);
        ``leading`` and ``trailing`` are discrete tables' spacings and fall back to
        ``linspace`` here.
        """
        steps = int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        spacing = spacing or self.default_grid
        if start is not None:
            first = float(start)
            if not self.t_min <= first <= self.t_max:
                raise ValueError(f"start must lie in [t_min, t_max] = [{self.t_min:g}, {self.t_max:g}], got {first:g}")
            ts = self.grid(steps, spacing, rho=rho)
            return torch.cat([torch.tensor([first], dtype=torch.float64), ts[ts < first]])
        hi, lo, reaches_clean = self._grid_ends(spacing)
        if spacing in ("linspace", "leading", "trailing", "quadratic"):
            ramp = torch.linspace(1, 0, steps + 1 if reaches_clean else steps, dtype=torch.float64)
            if spacing == "quadratic":
                ramp = ramp.square()
            ts = lo + (hi - lo) * ramp
            if reaches_clean:
                return ts
        elif spacing == "logsnr":
            lam = torch.linspace(float(self.log_snr(_f64(hi))), float(self.log_snr(_f64(lo))), steps, dtype=torch.float64)
            ts = self.t_of_log_snr(lam)
        elif spacing == "karras":
            s_hi, s_lo = float(self.sigma_tilde(_f64(hi))), float(self.sigma_tilde(_f64(lo)))
            ts = self.t_of_sigma_tilde(karras_sigmas(s_hi, s_lo, steps, rho))
        else:
            raise ValueError(f"unknown grid spacing {spacing!r}; choose one of {GRIDS}")
        if steps > 1:
            ts[0], ts[-1] = hi, lo  # exact ends, whatever an inverse's rounding did
        else:
            ts[0] = hi
        return torch.cat([ts, torch.tensor([self.t_clean], dtype=torch.float64)])

    def _grid_ends(self, spacing: str) -> tuple[float, float, bool]:
        """(t_max, the least noisy time of a grid with this spacing, whether that is ``t_clean``)."""
        lo = self.t_min
        reaches_clean = lo == self.t_clean  # σ(t_min) = 0: the last step lands there itself
        if reaches_clean and spacing in ("logsnr", "karras"):
            lo = float(self.t_of_sigma_tilde(_f64(CLEAN_END_SIGMA_TILDE)))
            reaches_clean = False
        return self.t_max, lo, reaches_clean

    def time_at(self, fraction: float, spacing: Grid | None = None, *, rho: float = 7.0) -> float:
        """The time ``fraction`` of the way from the least noisy time of a grid (0) to t_max
        (1), measured as that grid is spaced (the process's default grid unless given):
        uniform in t for ``linspace``, in λ for ``logsnr``, in σ̃^{1/ρ} for ``karras``.
        What SDEdit's strength means on a continuous process (Meng et al. 2022 noise to
        t₀ = strength·T); a grid of N steps visits ``time_at(1 − i/N)`` for ``linspace``."""
        f = float(fraction)
        if not 0 <= f <= 1:
            raise ValueError(f"the fraction must lie in [0, 1], got {fraction}")
        spacing = spacing or self.default_grid
        hi, lo, _ = self._grid_ends(spacing)
        if spacing == "logsnr":
            l_hi, l_lo = float(self.log_snr(_f64(hi))), float(self.log_snr(_f64(lo)))
            t = float(self.t_of_log_snr(_f64(l_lo + f * (l_hi - l_lo))))
        elif spacing == "karras":
            s_hi, s_lo = float(self.sigma_tilde(_f64(hi))), float(self.sigma_tilde(_f64(lo)))
            t = float(self.t_of_sigma_tilde(karras_ramp(s_hi, s_lo, _f64(1.0 - f), rho)))
        elif spacing in ("linspace", "leading", "trailing", "quadratic"):
            t = lo + (hi - lo) * (f * f if spacing == "quadratic" else f)
        else:
            raise ValueError(f"unknown grid spacing {spacing!r}; choose one of {GRIDS}")
        return min(max(t, lo), hi)

    def describe(self) -> str:
        a0, s0 = self.alpha_sigma(_f64(self.t_min))
        a1, s1 = self.alpha_sigma(_f64(self.t_max))
        return (
            f"{type(self).__name__}(t ∈ [{self.t_min:g}, {self.t_max:g}], σ̃ from {float(s0 / a0):.3g}"
            f" to {float(s1 / a1):.3g})"
        )

    def __repr__(self) -> str:
        return self.describe()


def check_times(t: Sequence[float] | Tensor) -> Tensor:
    """A grid as a float64 tensor, checked to be strictly decreasing."""
    ts = _f64(t).reshape(-1)
    if ts.numel() >= 2 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"a grid must be strictly decreasing in t, got {ts.tolist()}")
    return ts


def log_normal_sigma(batch: int, p_mean: float, p_std: float, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1, training noise distribution)."""
    n = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
    return torch.exp(p_mean + p_std * n)

