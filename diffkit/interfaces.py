"""The contracts between diffkit's core and its plugins.

The core knows these interfaces and nothing concrete: every schedule, network,
objective, sampler, guidance method and dataset is supplied by a plugin and found
by name in the registry.

=========  ================================================================
Schedule   the forward process q(x_t | x_0): ᾱ_t in float64, computed once
Denoiser   the network, ``forward(x_t, t, cond=None) -> Tensor`` of x_t's shape
Objective  what the network's output means, and the training loss
Sampler    the reverse process, driven by ``predict(x_t, t) -> ε̂``
Guidance   wraps ``predict`` to steer toward a condition
Dataset    training data in model space (images in [-1, 1]), labels if any
=========  ================================================================
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from diffkit import diffusion as D
from diffkit.process import Grid, Process, karras_sigmas, known_alpha_sigma, network_inputs

__all__ = [
    "Schedule",
    "network_output",
    "Denoiser",
    "Objective",
    "Predict",
    "StepCallback",
    "initial_state",
    "report",
    "Sampler",
    "Guidance",
    "CondPredict",
    "LabelledPredict",
    "Dataset",
    "TensorData",
    "BuildContext",
    "TIMESTEP_SPACINGS",
    "Spacing",
    "ClipDenoised",
]

Predict = Callable[[Tensor, Tensor], Tensor]
"""``predict(x_t, t) -> ε̂``: the only view of the model a sampler gets."""

StepCallback = Callable[[int, Tensor], "Tensor | None"]
"""``callback(t, x_t)``: called by a sampler with each state it reaches (t = −1: clean);
a returned tensor replaces the state."""


def initial_state(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    x_start: Tensor | None = None,
) -> Tensor:
    """The state a sampler starts from: ``x_start`` (moved to ``device`` and ``dtype``) when
    given, e.g. a partly noised input, otherwise a draw of the prior N(0, I) of ``shape``."""
    if x_start is None:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    return x_start.to(device=device, dtype=dtype)


def report(callback: StepCallback | None, t: int, x: Tensor) -> Tensor:
    """Show the state x_t a sampler reached to its callback; return the callback's
    replacement if it gave one, otherwise ``x``. Samplers call it with every state they
    reach, t = −1 for the clean result."""
    if callback is None:
        return x
    new = callback(t, x)
    return x if new is None else new

ClipDenoised = Annotated[
    Literal["auto"] | Annotated[float, Field(gt=0, allow_inf_nan=False)] | None,
    Field(
        description="Bound on x̂_0 at every step, applied by the core to the prediction the sampler is driven by:"
        " 'auto' is the data's range ([−1, 1] for images; for points, the standardised training data's range"
        " recorded at training, widened by 10 % each side); a number c clips to [−c, c]; null turns the bound off."
    ),
]
"""A sampler's ``clip_denoised`` option. A sampler exposes its value as the attribute
``clip_denoised``; the pipeline reads it (``"auto"`` where a sampler has none) and bounds
x̂_0 itself (:class:`diffkit.diffusion.X0Bound`): samplers never clip."""

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing", "quadratic", "logsnr")
Spacing = Literal["linspace", "leading", "trailing", "quadratic", "logsnr"]


def _distinct(targets: Tensor, T: int) -> Tensor:
    """Round descending fractional timesteps to strictly decreasing integers in [0, T−1]:
    a repeat moves up one timestep (working from the clean end), and a sequence pushed
    past T−1 is held under it, so len(targets) ≤ T distinct timesteps always come back."""
    ts = targets.round().long().clamp(0, T - 1).tolist()
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return torch.tensor([min(t, T - 1 - i) for i, t in enumerate(ts)], dtype=torch.long)


class Schedule(Process):
    """The discrete forward process, defined by ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0..T-1.

    A plugin computes ᾱ (or β) once; everything else is derived here in float64 so
    that every schedule shares one implementation of q_sample and the posterior.

    As a :class:`~diffkit.process.Process` it has α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t) exactly
    at integer t (t = −1: clean data), and between integers log σ̃ = log(σ/α) is
    interpolated linearly, as k-diffusion's ``DiscreteSchedule`` does, so samplers that
    move in continuous time can drive a network trained on the table.
    """

    t_min = 0.0
    t_clean = -1.0
    discrete = True

    def __init__(self, alphas_cumprod: Tensor) -> None:
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if abar.ndim != 1 or abar.numel() < 2:
            raise ValueError("a schedule needs ᾱ_t as a 1-D tensor of at least 2 steps")
        if not torch.isfinite(abar).all() or (abar <= 0).any() or (abar >= 1).any():
            raise ValueError("every ᾱ_t must lie strictly inside (0, 1)")
        if (abar[1:] >= abar[:-1]).any():
            raise ValueError("ᾱ_t must be strictly decreasing in t")
        self.alphas_cumprod: Tensor = abar
        # ᾱ with the clean-data value 1 prepended: index t + 1 holds ᾱ_t, index 0
        # stands for "before the first step", so t = -1 reads ᾱ = 1.
        self._abar_ext = torch.cat([abar.new_ones(1), abar])
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        """ᾱ_t = ∏_{s≤t} (1 − β_s)  (Ho et al. 2020, notation above Eq. 4)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    # -- derived quantities, all float64 of length T -------------------------------
    @property
    def T(self) -> int:
        """The number of diffusion steps."""
        return self.alphas_cumprod.numel()

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """ᾱ_{t-1}, with ᾱ_{-1} = 1."""
        return self._abar_ext[:-1]

    @property
    def alphas(self) -> Tensor:
        """α_t = ᾱ_t / ᾱ_{t-1}."""
        return self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def betas(self) -> Tensor:
        """β_t = 1 − α_t."""
        return 1.0 - self.alphas

    @property
    def noise_std(self) -> Tensor:
        """√(1 − ᾱ_t), the standard deviation of the noise in x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε: the
        process's σ(t) at integer t. Not EDM's σ (Karras et al. 2022), which is the noise level of
        x_t/α, σ̃_t = √((1 − ᾱ_t)/ᾱ_t): that is :meth:`sigma_tilde`."""
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def sigmas(self) -> Tensor:
        """The old name of :attr:`noise_std` (√(1 − ᾱ_t)), kept as an alias so that code written
        for 0.1 keeps working; it is not EDM's σ (:meth:`sigma_tilde`)."""
        return self.noise_std

    @property
    def snr(self) -> Tensor:
        """SNR(t) = ᾱ_t / (1 − ᾱ_t)  (Kingma et al. 2021)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    @property
    def posterior_variance(self) -> Tensor:
        """β̃_t = (1 − ᾱ_{t-1}) / (1 − ᾱ_t) · β_t  (Ho et al. 2020, Eq. 7)."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    # -- per-sample access ---------------------------------------------------------
    def alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ_t for integer timesteps ``t`` (``-1`` meaning clean data) on ``like``'s
        device, broadcast against ``like``, in float64 (float32 on MPS, which has no
        float64).

        The functions of :mod:`diffkit.diffusion` form their coefficients from it at
        this precision and cast them to the data's dtype; to use ᾱ_t in arithmetic of
        your own, cast it first (``.to(x.dtype)``).
        """
        key = (like.device, like.dtype)
        table = self._cache.get(key)
        if table is None:
            dtype = torch.float32 if like.device.type == "mps" else torch.float64
            table = self._abar_ext.to(device=like.device, dtype=dtype)
            self._cache[key] = table
        return D.expand_like(table[t + 1], like)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0)  (Ho et al. 2020, Eq. 4); at fractional t, the interpolated process's."""
        if torch.as_tensor(t).is_floating_point():
            return Process.q_sample(self, x0, t, noise)
        return D.q_sample(x0, self.alpha_bar(t, x0), noise)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_s | x_t, x_0), s = t − 1 unless given (Ho et al. 2020, Eq. 6–7)."""
        s = t - 1 if s is None else s
        c0, ct, var = D.posterior_coefficients(self.alpha_bar(t, x_t), self.alpha_bar(s, x_t))
        dtype = x_t.dtype
        return c0.to(dtype) * x0 + ct.to(dtype) * x_t, var.to(dtype)

    def time_at(self, fraction: float, spacing: Any = None, *, rho: float = 7.0) -> float:
        """The timestep ``fraction`` of the way up the table: round(fraction·T) − 1, at least 0
        (SDEdit's t₀ for a strength, Meng et al. 2022; every spacing's walk starts at T − 1)."""
        f = float(fraction)
        if not 0 <= f <= 1:
            raise ValueError(f"the fraction must lie in [0, 1], got {fraction}")
        return float(max(0, round(f * self.T) - 1))

    def timesteps(self, steps: int | None = None, spacing: Spacing = "linspace", start: int | None = None) -> list[int]:
        """The descending timesteps a sampler visits when it takes ``steps`` ≤ T steps.

        ``linspace`` spreads them evenly from T−1 to 0, ``leading`` takes every
        (T // steps)-th step from 0 (Ho et al. 2020's code), and ``trailing`` steps back
        from T−1 by T / steps (Lin et al. 2024, Table 2). Two spacings crowd the steps
        towards the clean end, where sharp data needs them: ``quadratic`` visits
        t_i = (T−1)(1 − i/(steps−1))² (Song et al. 2021, DDIM, App. D.2) and ``logsnr``
        the timesteps nearest values of λ = ½ log SNR evenly spaced from λ_{T−1} to λ_0
        (Lu et al. 2022, DPM-Solver, Sec. 3.3). Both start at T−1 and end at 0; where
        their rounding would repeat a timestep near the clean end, the repeat moves one
        timestep up, so exactly ``steps`` distinct timesteps come back. Every sequence
        is strictly decreasing within [0, T−1]; the sampler's last update goes to the
        clean data (ᾱ = 1). ``start`` begins the walk at that timestep instead (for starting from
        a partly noised input, as SDEdit does): it is followed by the visited
        timesteps below it.
        """
        T = self.T
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and the schedule's T = {T}, got {steps}")
        if spacing == "linspace":
            ts = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
        elif spacing == "leading":
            ts = (torch.arange(steps - 1, -1, -1) * (T // steps)).long()
        elif spacing == "trailing":
            ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1
        elif spacing == "quadratic":
            ts = _distinct((T - 1) * torch.linspace(1, 0, steps, dtype=torch.float64).square(), T)
        elif spacing == "logsnr":
            lam = self.half_log_snr()
            ts = _distinct(self.nearest_log_snr(torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)), T)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {TIMESTEP_SPACINGS}")
        out = ts.tolist()
        if start is not None:
            if not 0 <= start <= T - 1:
                raise ValueError(f"start must be a timestep between 0 and T − 1 = {T - 1}, got {start}")
            out = [start] + [t for t in out if t < start]
        return out

    # -- the Process view ------------------------------------------------------------
    @property
    def t_max(self) -> float:  # type: ignore[override]
        return float(self.T - 1)

    def _log_sigma_tilde(self) -> Tensor:
        table = self.__dict__.get("_lst")
        if table is None:
            table = 0.5 * ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).log()
            self.__dict__["_lst"] = table
        return table

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α, σ = √ᾱ_t, √(1 − ᾱ_t) from the table at integer t (−1: 1, 0), log σ̃ linear between
        integers and σ̃ linear on [−1, 0]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.T
        tc = t.clamp(-1.0, T - 1.0)
        lo = tc.floor().clamp(0, T - 2).long()
        lst = self._log_sigma_tilde().to(t.device)
        w = tc.clamp_min(0.0) - lo.double()
        sig = torch.exp(lst[lo] * (1 - w) + lst[lo + 1] * w)
        sig = torch.where(tc < 0, (tc + 1.0) * lst[0].exp(), sig)
        a = torch.rsqrt(1.0 + sig * sig)
        s = sig * a
        exact = tc == tc.round()
        idx = tc.round().long().clamp(-1, T - 1) + 1
        abar = self._abar_ext.to(t.device)[idx]
        a = torch.where(exact, abar.sqrt(), a)
        s = torch.where(exact, (1.0 - abar).sqrt(), s)
        return a, s

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """dα/dt, dσ/dt of the interpolation on the segment [⌈t⌉ − 1, ⌈t⌉] (the one a
        sampler moving toward the clean data crosses next), in closed form."""
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.T
        lst = self._log_sigma_tilde().to(t.device)
        tc = t.clamp(-1.0, T - 1.0)
        hi = tc.ceil().clamp(1, T - 1).long()
        slope = lst[hi] - lst[hi - 1]  # d log σ̃ / dt
        a, s = self.alpha_sigma(tc)
        sig = s / a
        dsig = slope * sig
        dsig = torch.where(tc <= 0, torch.where(tc < 0, lst[0].exp(), dsig), dsig)
        da = -sig * dsig * a**3
        ds = dsig * a + sig * da
        return da, ds

    def conditioning(self, t: Tensor) -> Tensor:
        """The integer timestep itself (int64) when every t is one, as 0.1 networks were
        trained on; the fractional t (float32) otherwise."""
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            return t.long()
        return t.long() if bool((t == t.round()).all()) else t.float()

    def sample_t(self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        """t uniform over the T integer steps (Ho et al. 2020, Alg. 1), int64."""
        return torch.randint(0, self.T, (batch,), device=device, generator=generator)

    def prior_std(self) -> float:
        return 1.0

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        if not t.is_floating_point():  # the exact table, as 0.1 computed it
            abar = self.alpha_bar(t, like)
            return abar.sqrt(), (1.0 - abar).sqrt()
        return super().coefficients(t, like)

    def grid(self, steps: int, spacing: Grid | None = None, *, rho: float = 7.0, start: float | None = None) -> Tensor:
        """The 0.1 timesteps (:meth:`timesteps`) then −1; ``karras`` gives fractional t whose σ̃
        follow Karras et al. 2022, Eq. 5."""
        spacing = spacing or self.default_grid
        if spacing == "karras":
            if start is not None:  # the walk's times below start, as timesteps(start=) keeps them
                first = float(start)
                if not 0 <= first <= self.t_max:
                    raise ValueError(f"start must be a time between 0 and T − 1 = {int(self.t_max)}, got {start}")
                ts = self.grid(steps, spacing, rho=rho)
                return torch.cat([torch.tensor([first], dtype=torch.float64), ts[ts < first]])
            lst = self._log_sigma_tilde()
            s_hi = float(self.sigma_tilde(torch.tensor(self.t_max, dtype=torch.float64)))
            ts = self.t_of_sigma_tilde(karras_sigmas(s_hi, float(lst[0].exp()), int(steps), rho))
            ts[0] = self.t_max
            if steps > 1:
                ts[-1] = 0.0
        else:
            st = None if start is None else int(round(float(start)))
            ts = torch.tensor(self.timesteps(int(steps), spacing, start=st), dtype=torch.float64)
        return torch.cat([ts, torch.tensor([-1.0], dtype=torch.float64)])

    def half_log_snr(self) -> Tensor:
        """λ_t = ½ log SNR(t) in float64, decreasing in t (a zero terminal SNR is held at a finite floor)."""
        return 0.5 * self.snr.double().clamp_min(1e-300).log()

    def nearest_log_snr(self, half_log_snr: Tensor) -> Tensor:
        """The timesteps whose λ_t = ½ log SNR(t) lie nearest the given values (int64)."""
        neg = -self.half_log_snr()  # −λ_t, increasing in t
        target = -half_log_snr.double()
        hi = torch.searchsorted(neg, target).clamp(1, self.T - 1)
        lo = hi - 1
        nearer_lo = (target - neg[lo]).abs() <= (neg[hi] - target).abs()
        return torch.where(nearer_lo, lo, hi) if self.T > 1 else torch.zeros_like(hi)

    def __repr__(self) -> str:
        a = self.alphas_cumprod
        return f"Schedule(T={self.T}, ᾱ_0={a[0].item():.6g}, ᾱ_T-1={a[-1].item():.3g})"


@runtime_checkable
class Denoiser(Protocol):
    """The network: ``denoiser(x_t, t, cond=None)`` returns a tensor of x_t's shape.

    ``t`` holds integer timesteps of shape ``[batch]``; ``cond`` holds integer labels
    of shape ``[batch]`` for conditional networks (or ``None``). Any ``nn.Module``
    with this call signature is a denoiser.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...


def network_output(
    denoiser: nn.Module | Denoiser, process: Process, x_t: Tensor, t: Tensor, cond: Tensor | None = None
) -> Tensor:
    """The network's raw output at (x_t, t): it sees c_in(t)·x_t and the process's
    conditioning value c(t) (Karras et al. 2022, Eq. 7: F_θ(c_in x; c_noise))."""
    c_in, c_noise = network_inputs(process, t, x_t)
    return denoiser(x_t if c_in is None else c_in * x_t, c_noise, cond)


class Objective(ABC):
    """What the network's output means, and the loss that teaches it.

    A subclass says what the network regresses to (:meth:`target`) and how its output
    converts to the model's estimates (:meth:`denoised`: x̂_0 and ε̂, consistent with
    x_t = α x̂_0 + σ ε̂), for any :class:`~diffkit.process.Process`. The score and the
    probability-flow velocity follow from those (:meth:`to_score`, :meth:`to_velocity`);
    the loss is shared. A 0.1 objective that gives only :meth:`to_eps` keeps working.

    Min-SNR-γ weighting (Hang et al. 2023) is an option of every objective that names
    its ``parameterization`` (``"eps"``, ``"x0"`` or ``"v"``): pass ``min_snr_gamma``
    and the base :meth:`weight` returns :func:`diffkit.diffusion.min_snr_weight`.
    """

    parameterization: ClassVar[str | None] = None
    """What :meth:`target` returns: ``"eps"``, ``"x0"``, ``"v"``, or ``None`` for
    something else (then min-SNR weighting is unavailable)."""

    min_snr_gamma: float | None = None
    """γ of min-SNR-γ loss weighting; ``None`` weights every timestep alike."""

    def __init__(self, *, min_snr_gamma: float | None = None) -> None:
        if min_snr_gamma is not None:
            if not min_snr_gamma > 0:
                raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
            if self.parameterization is None:
                raise ValueError(
                    f"{type(self).__name__} does not say what its target is (parameterization), so min-SNR"
                    " weighting cannot be applied to it"
                )
        self.min_snr_gamma = min_snr_gamma

    @abstractmethod
    def target(self, x0: Tensor, eps: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """The regression target of the network for this x_0, ε and t."""

    def to_eps(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """Convert the network's output to the noise estimate ε̂."""
        return self.denoised(output, x_t, t, schedule)[1]

    def denoised(self, output: Tensor, x_t: Tensor, t: Tensor, process: Process) -> tuple[Tensor, Tensor]:
        """(x̂_0, ε̂) from the network's output. By default from :meth:`to_eps`, with
        x̂_0 = (x_t − σ ε̂)/α; objectives whose output is nearer x_0 override it."""
        if type(self).to_eps is Objective.to_eps:
            raise TypeError(
                f"the objective {type(self).__name__} says neither how its output becomes x̂_0 and ε̂"
                " (denoised) nor how it becomes ε̂ (to_eps); define one of them"
            )
        eps = self.to_eps(output, x_t, t, process)
        known = known_alpha_sigma(t)
        if known is not None:  # the sampling loop's time: α, σ as floats, the same arithmetic
            return (x_t - eps * known[1]) / known[0], eps
        a, s = process.coefficients(t, x_t)
        return (x_t - s.to(x_t.dtype) * eps) / a.to(x_t.dtype), eps

    def snr(self, t: Tensor, process: Process, like: Tensor) -> Tensor:
        """SNR(t) = α²/σ² per sample, shape ``[batch]``, float64."""
        if isinstance(process, Schedule) and not torch.as_tensor(t).is_floating_point():
            return process.snr.to(t.device)[t]
        a, s = process.alpha_sigma(torch.as_tensor(t, dtype=torch.float64).cpu())
        return (a * a / (s * s)).to(like.device)

    def weight(self, t: Tensor, schedule: Process, like: Tensor) -> Tensor | None:
        """Per-sample loss weight λ(t) of shape ``[batch]``, or ``None`` for uniform.

        With ``min_snr_gamma`` set, the min-SNR-γ weight of this objective's target
        (Hang et al. 2023), in float64 and cast to ``like``'s dtype.
        """
        if self.min_snr_gamma is None:
            return None
        assert self.parameterization is not None  # checked in __init__
        w = D.min_snr_weight(self.snr(t, schedule, like), self.min_snr_gamma, self.parameterization)
        return w.to(like.dtype).to(like.device)

    def sample_t(self, process: Process, batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """How training draws t: the process's own rule unless the objective has one."""
        return process.sample_t(batch, generator=generator, device=device)

    def loss(
        self,
        denoiser: nn.Module | Denoiser,
        schedule: Process,
        x0: Tensor,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """E_{t, ε} λ(t) ‖F_θ(x_t, t) − target‖²: t drawn as the process says (uniform over a
        table's T steps), ε ~ N(0, I) (Ho et al. 2020, Alg. 1 and Eq. 14, with the target
        set by the objective)."""
        t = self.sample_t(schedule, x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = schedule.q_sample(x0, t, eps)
        output = network_output(denoiser, schedule, x_t, t, cond)
        target = self.target(x0, eps, x_t, t, schedule)
        w = self.weight(t, schedule, x0)
        if w is None:
            return F.mse_loss(output, target)
        per_sample = (output - target).square().flatten(1).mean(dim=1)
        return (w * per_sample).mean()

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """The network's estimate of the clean data x̂_0."""
        return self.denoised(output, x_t, t, schedule)[0]

    def to_score(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """The network's estimate of the score ∇ log p(x_t) = −ε̂/σ (Tweedie)."""
        eps = self.denoised(output, x_t, t, schedule)[1]
        _, s = schedule.coefficients(t, x_t)
        return -eps / s.to(x_t.dtype)

    def to_velocity(self, output: Tensor, x_t: Tensor, t: Tensor, schedule: Process) -> Tensor:
        """The probability-flow ODE's dx/dt = α'(t) x̂_0 + σ'(t) ε̂ (Song et al. 2021, Eq. 13)."""
        x0, eps = self.denoised(output, x_t, t, schedule)
        da, ds = schedule.derivatives(torch.as_tensor(t, dtype=torch.float64).cpu())
        da, ds = D.expand_like(da.to(x_t.device, x_t.dtype), x_t), D.expand_like(ds.to(x_t.device, x_t.dtype), x_t)
        return da * x0 + ds * eps


@runtime_checkable
class Sampler(Protocol):
    """The reverse process. It sees only ``predict(x_t, t) -> ε̂`` and the schedule,
    never the network, the objective or guidance; its randomness comes from
    ``generator``; it returns x_0 of shape ``shape``.

    - ``callback(t, x_t)``, if given, is called with the starting state and after
      every step with the state reached and its timestep (``t = -1``: the final,
      clean x_0). If it returns a tensor, the sampler continues from that tensor
      instead (inpainting and ILVR constrain the state this way).
    - ``x_start`` and ``t_start`` start the reverse process from a given state at a
      given timestep instead of pure noise at T − 1 (SDEdit); the visited timesteps
      are ``schedule.timesteps(steps, spacing, start=t_start)``.
    """

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
    ) -> Tensor: ...


CondPredict = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``predict(x_t, t, cond) -> ε̂`` under labels ``cond`` of shape ``[batch]``: ``None``, or a
negative label, means "no label" (ε̂(x_t, ∅) of a conditional network); an unconditional
network ignores ``cond``. What a :class:`Guidance` wraps."""


class LabelledPredict:
    """``predict(x_t, t) -> ε̂(x_t, t, y)`` for the labels ``y`` of the batch being drawn,
    that also offers ε̂ under any labels (``given``).

    The pipeline hands a sampler one of these when labels are asked for. A plain sampler
    just calls it, which samples the conditional model; a guided sampler hands
    ``given``, ``labels`` and ``guidance_scale`` (``None``: the guidance's own) to its
    :class:`Guidance`, and drives its base sampler with ``finish`` of the wrapped
    prediction. ``finish`` is what the core does to every prediction a sampler is driven
    by (it bounds x̂_0); calling this object applies it already.
    """

    __slots__ = ("given", "labels", "guidance_scale", "finish", "_plain")

    def __init__(
        self,
        given: CondPredict,
        labels: Tensor,
        guidance_scale: float | None = None,
        finish: Callable[[Predict], Predict] | None = None,
    ) -> None:
        self.given = given
        self.labels = labels
        self.guidance_scale = guidance_scale
        self.finish: Callable[[Predict], Predict] = finish or (lambda predict: predict)
        self._plain = self.finish(lambda x_t, t: given(x_t, t, labels))

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self._plain(x_t, t)


@runtime_checkable
class Guidance(Protocol):
    """Steers sampling toward labels by wrapping the model's noise prediction.

    ``wrap(predict, schedule, cond, scale=None)`` returns the ``predict(x_t, t) -> ε̃``
    that a (base) sampler is driven by. ``predict`` is the model's noise prediction
    under any labels (:data:`CondPredict`), ``cond`` the labels of the batch, shape
    ``[batch]`` (−1: no label, which leaves that row unguided), and ``scale`` overrides
    the guidance's own scale. Every guidance keeps two promises:

    - ``scale = 0`` returns ``predict(x_t, t, cond)`` unchanged, so the samples are the
      unguided ones bit for bit;
    - the wrapped predict works inside ``torch.inference_mode()``, and a gradient it
      takes (classifier guidance) is with respect to x_t alone: nothing accumulates in
      any network's weights.

    Attributes the pipeline reads where a guidance has them:

    - ``scale: float``: the scale used when ``wrap`` is given none.
    - ``classifier: nn.Module``: a noise-aware classifier p_φ(y | x_t, t), called
      ``classifier(x_t, t) -> logits [batch, classes]``. The pipeline trains it on
      noised training data after the denoiser (cross-entropy with t uniform, as
      Dhariwal & Nichol 2021, Sec. 4), reports its accuracy as a function of t, saves it
      in the run directory and loads it back. ``classifier_training`` (a mapping) holds
      overrides of the spec's ``train`` settings for that training (``steps``, ``lr``,
      ``batch_size``).
    - ``requires_conditional_denoiser: bool``: it needs ε(x_t, y) and ε(x_t, ∅) from
      one network (classifier-free guidance); sampling with an unconditional one is an
      error.
    """

    def wrap(self, predict: CondPredict, schedule: Schedule, cond: Tensor, *, scale: float | None = None) -> Predict: ...


class Dataset(torch.utils.data.Dataset):
    """Training data in model space, ``dataset[i] -> (x, y)`` with ``y = -1`` where
    there are no labels.

    ``kind`` is ``"points"`` (vectors whose scale is arbitrary: the pipeline
    standardises them and undoes it when sampling) or ``"images"`` (already in
    [-1, 1], shape ``(C, H, W)``).
    """

    kind: Literal["points", "images"] = "points"
    sample_shape: tuple[int, ...] = ()
    num_classes: int | None = None

    def tensors(self) -> tuple[Tensor, Tensor] | None:
        """The whole dataset as ``(x, y)`` tensors if it lives in memory, else ``None``."""
        return None


class TensorData(Dataset):
    """A dataset held in memory as tensors: the fast path for training."""

    def __init__(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        num_classes: int | None = None,
        kind: Literal["points", "images"] = "points",
    ) -> None:
        self.x = x.float()
        self.y = torch.full((x.shape[0],), -1, dtype=torch.long) if y is None else y.long()
        self.num_classes = num_classes
        self.kind = kind
        self.sample_shape = tuple(x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def tensors(self) -> tuple[Tensor, Tensor]:
        return self.x, self.y


@dataclass(frozen=True)
class BuildContext:
    """What a component's factory may need to know about the rest of the pipeline."""

    sample_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    seed: int = 0
    data_kind: str = "points"
    data_diameter: float | None = None
    """The largest distance between two training samples in model space (what ``ve``'s
    σ_max defaults to, Song & Ermon 2020, Technique 1); ``None`` where unknown."""
