"""The shared mathematics of diffusion models, written once for every plugin.

Index convention: a schedule of ``T`` steps is indexed ``t = 0 .. T-1``; index ``t``
is the paper's step ``t + 1`` (Ho et al. 2020 count 1..T). ``alpha_bar`` at the
"previous" step of ``t = 0`` is 1: the clean data.

Every function here works for any tensor rank: per-sample coefficients of shape
``[B]`` are broadcast against data of shape ``[B, ...]`` by :func:`expand_like`, so
the same code serves 2-D points and 4-D images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from typing import Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffkit.interfaces import Schedule

__all__ = [
    "expand_like",
    "gather",
    "q_sample",
    "eps_to_x0",
    "x0_to_eps",
    "eps_to_score",
    "score_to_eps",
    "x0_eps_to_v",
    "v_to_eps",
    "v_to_x0",
    "posterior_coefficients",
    "min_snr_weight",
    "RANGE_MARGIN",
    "FALLBACK_BOUND",
    "data_range",
    "bound_x0",
    "X0Bound",
]

RANGE_MARGIN = 0.1
"""Share of the training data's width added on each side of its per-coordinate range to
make the bound on x̂_0 for point data. A finite training set does not reach the edges of
the distribution it was drawn from, so samples may fairly fall a little outside it; the
bound is there to stop the 1/√ᾱ_t amplification of the network's error at the noisiest
steps (tens of units away), not to trim the data's own tails."""

FALLBACK_BOUND = 5.0
"""|x̂_0| bound, in standardised units, for point data whose run recorded no range (runs
saved before ranges were recorded, or a pipeline that never saw its data): five standard
deviations hold all but a sliver of any standardised data (at most 4 %, by Chebyshev)
and still stop x̂_0 from running off by tens of units."""


def expand_like(v: Tensor, x: Tensor) -> Tensor:
    """Append singleton axes to ``v`` (shape ``[B]`` or scalar) so it broadcasts against ``x``."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def gather(coef: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """``coef[t]`` moved to ``x``'s device and dtype, shaped to broadcast against ``x``."""
    return expand_like(coef.to(device=x.device)[t].to(x.dtype), x)


def _roots(alpha_bar_t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(√ᾱ_t, √(1 − ᾱ_t)) computed in ᾱ's own precision (float64 from a Schedule) and
    only then cast to the data's dtype: 1 − ᾱ_t loses most of its digits in float32
    when ᾱ_t is close to 1."""
    return alpha_bar_t.sqrt().to(like.dtype), (1.0 - alpha_bar_t).sqrt().to(like.dtype)


def q_sample(x0: Tensor, alpha_bar_t: Tensor, noise: Tensor) -> Tensor:
    """Draw from q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)  (Ho et al. 2020, Eq. 4; Bishop 20.6).

    ``alpha_bar_t`` is already broadcast against ``x0`` (see :func:`expand_like`).
    """
    a, s = _roots(alpha_bar_t, x0)
    return a * x0 + s * noise


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t  (Ho et al. 2020, Eq. 4 solved for x_0)."""
    a, s = _roots(alpha_bar_t, x_t)
    return (x_t - s * eps) / a


def x0_to_eps(x0: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """ε̂ = (x_t − √ᾱ_t x̂_0) / √(1−ᾱ_t)  (Ho et al. 2020, Eq. 4 solved for ε)."""
    a, s = _roots(alpha_bar_t, x_t)
    return (x_t - a * x0) / s


def eps_to_score(eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """∇ log p(x_t) = −ε̂ / σ_t with σ_t = √(1−ᾱ_t)  (Tweedie's formula; Song et al. 2021)."""
    return -eps / _roots(alpha_bar_t, eps)[1]


def score_to_eps(score: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """ε̂ = −σ_t · ∇ log p(x_t), the inverse of :func:`eps_to_score`."""
    return -score * _roots(alpha_bar_t, score)[1]


def x0_eps_to_v(x0: Tensor, eps: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """v = √ᾱ_t ε − √(1−ᾱ_t) x_0  (Salimans & Ho 2022, Sec. 4)."""
    a, s = _roots(alpha_bar_t, x0)
    return a * eps - s * x0


def v_to_eps(v: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """ε̂ = √ᾱ_t v + √(1−ᾱ_t) x_t  (Salimans & Ho 2022, Appendix D)."""
    a, s = _roots(alpha_bar_t, x_t)
    return a * v + s * x_t


def v_to_x0(v: Tensor, x_t: Tensor, alpha_bar_t: Tensor) -> Tensor:
    """x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v  (Salimans & Ho 2022, Appendix D)."""
    a, s = _roots(alpha_bar_t, x_t)
    return a * x_t - s * v


def posterior_coefficients(
    alpha_bar_t: Tensor, alpha_bar_s: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients of q(x_s | x_t, x_0) for any s < t (Ho et al. 2020, Eq. 6–7).

    With α_{t|s} = ᾱ_t / ᾱ_s and β_{t|s} = 1 − α_{t|s} (the one-step kernel from s
    to t), the posterior is N(c_0 x_0 + c_t x_t, β̃ I) where

        c_0 = √ᾱ_s β_{t|s} / (1 − ᾱ_t),
        c_t = √α_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t),
        β̃  = (1 − ᾱ_s) / (1 − ᾱ_t) · β_{t|s}.

    With s = t − 1 these are Eq. 7 exactly; with s further back they are the
    posterior of a respaced chain (Nichol & Dhariwal 2021, Sec. 4). Returns
    ``(c_0, c_t, β̃)``.
    """
    alpha_ts = alpha_bar_t / alpha_bar_s
    beta_ts = 1.0 - alpha_ts
    c0 = alpha_bar_s.sqrt() * beta_ts / (1.0 - alpha_bar_t)
    ct = alpha_ts.sqrt() * (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t)
    var = (1.0 - alpha_bar_s) / (1.0 - alpha_bar_t) * beta_ts
    return c0, ct, var


def min_snr_weight(snr: Tensor, gamma: float, target: str) -> Tensor:
    """Min-SNR-γ loss weight for a network regressing to ``target`` (Hang et al. 2023, Eq. 8–10).

    Clamping the x_0-space weight SNR(t) at γ stops the nearly clean timesteps from
    dominating training. The same weight on x_0 expressed on the other targets
    (‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖², ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖²) gives

        ε:   min(SNR, γ) / SNR,     x_0:  min(SNR, γ),     v:  min(SNR, γ) / (SNR + 1).
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    clamped = snr.clamp(max=gamma)
    if target == "eps":
        return clamped / snr
    if target == "x0":
        return clamped
    if target == "v":
        return clamped / (snr + 1.0)
    raise ValueError(f"min-SNR weighting knows the targets 'eps', 'x0' and 'v', not {target!r}")


def data_range(x: Tensor, margin: float = RANGE_MARGIN) -> Tensor:
    """``[low, high]`` (shape ``[2, *x.shape[1:]]``) of the examples ``x`` ``[N, ...]`` per
    coordinate, each side widened by ``margin`` times the width: the bound on x̂_0 that
    sampling point data uses by default (see :data:`RANGE_MARGIN`)."""
    low, high = x.amin(0), x.amax(0)
    pad = (high - low) * margin
    return torch.stack([low - pad, high + pad])


def bound_x0(eps: Tensor, x_t: Tensor, alpha_bar_t: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """ε̂ whose x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t lies in [low, high], and where it was moved.

    x̂_0 is clipped and ε̂ re-derived from it (Ho et al. 2020's clipping of x̂_0 before
    the posterior mean, Eq. 7; Saharia et al. 2022's static thresholding), so every
    sampler that reads ε̂, x̂_0 or the score sees the bounded prediction. Where x̂_0 was
    in range ε̂ is returned bit for bit. ``low`` and ``high`` broadcast against one sample
    (a scalar for images, one value per coordinate for points). Returns ``(ε̂, moved)``,
    ``moved`` a boolean mask of x̂_0's shape (NaN is never "moved": it stays NaN).
    """
    x0 = eps_to_x0(eps, x_t, alpha_bar_t)
    low, high = low.to(x0), high.to(x0)
    moved = (x0 < low) | (x0 > high)
    bounded = x0_to_eps(torch.clamp(x0, low, high), x_t, alpha_bar_t)
    return torch.where(moved, bounded, eps), moved


class X0Bound:
    """Holds the x̂_0 of every prediction a sampler is driven by in ``[low, high]``
    (:func:`bound_x0`), or thresholds it dynamically where ``low`` and ``high`` are
    ``None`` (Saharia et al. 2022, Sec. 2.3), and counts the values it moved.

    ``bound(predict)`` wraps a 0.1 ``predict(x_t, t) -> ε̂``; ``bound.denoised(denoise)``
    wraps a step sampler's ``denoise(x_t, t) -> Denoised(x̂_0, ε̂)``. Either way ε̂ is
    re-derived from the bounded x̂_0, ε̂ = (x_t − α x̂_0)/σ, and left bit for bit where
    x̂_0 was in range. The counts stay on the device while sampling (no per-step
    synchronisation) and :attr:`share` reads them once.
    """

    def __init__(self, schedule: Any, low: Tensor | None, high: Tensor | None) -> None:
        self.schedule = schedule
        self.low, self.high = low, high
        self.counts: list[Tensor] = []
        self.tally: Tensor | None = None
        self._pending: list[Tensor] = []
        self._converted: dict[Any, tuple[Tensor, Tensor]] = {}
        self.seen = 0

    def _limits(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``low``, ``high`` in ``like``'s dtype and device, converted once."""
        key = (like.dtype, like.device)
        hit = self._converted.get(key)
        if hit is None:
            assert self.low is not None and self.high is not None
            hit = self._converted[key] = (self.low.to(like), self.high.to(like))
        return hit

    _PENDING_MAX = 64
    """Small masks held before they are added up in one go (see :meth:`_count`)."""
    _SMALL = 1 << 14
    """Masks of at most this many values are held; larger ones are added at once."""

    def _count(self, moved: Tensor) -> None:
        # An elementwise running count per position (cheaper per step than a reduction),
        # summed when read. Adding a bool mask into it costs a conversion per call, which
        # for a small batch is most of the bound's cost: small masks are held and added
        # up 64 at a time (a stack and one sum).
        self.seen += moved.numel()
        pending = self._pending
        if moved.numel() > self._SMALL:
            self._fold()
            with torch.inference_mode():  # the tally is an inference tensor, whoever reads it
                self._tally_like(moved).add_(moved)
            return
        if pending and (pending[0].shape != moved.shape or pending[0].device != moved.device):
            self._fold()
        pending.append(moved)
        if len(pending) >= self._PENDING_MAX:
            self._fold()

    def _tally_like(self, moved: Tensor) -> Tensor:
        if self.tally is None or self.tally.shape != moved.shape or self.tally.device != moved.device:
            if self.tally is not None:
                self.counts.append(self.tally.sum())
            self.tally = torch.zeros(moved.shape, dtype=torch.int32, device=moved.device)
        return self.tally

    def _fold(self) -> None:
        pending = self._pending
        if pending:
            with torch.inference_mode():  # the tally is an inference tensor, whoever reads it
                total = pending[0].to(torch.int32) if len(pending) == 1 else torch.stack(pending).sum(0, dtype=torch.int32)
                self._tally_like(pending[0]).add_(total)
            pending.clear()

    def _clip(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        if self.low is None or self.high is None:
            from diffkit.sampling import dynamic_threshold

            bounded = dynamic_threshold(x0)
            return bounded, bounded != x0
        low, high = self.low.to(x0), self.high.to(x0)
        return torch.clamp(x0, low, high), (x0 < low) | (x0 > high)

    def __call__(self, predict: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        def bounded(x_t: Tensor, t: Tensor) -> Tensor:
            eps = predict(x_t, t)
            if self.low is not None and not torch.as_tensor(t).is_floating_point() and hasattr(self.schedule, "alpha_bar"):
                eps, moved = bound_x0(eps, x_t, self.schedule.alpha_bar(t, x_t), self.low, self.high)
            else:
                a, s = (c.to(x_t.dtype) for c in self.schedule.coefficients(t, x_t))
                x0, moved = self._clip((x_t - s * eps) / a)
                eps = torch.where(moved, (x_t - a * x0) / s, eps)
            self._count(moved)
            return eps

        return bounded

    def denoised(self, denoise: Callable[[Tensor, Tensor], Any]) -> Callable[[Tensor, Tensor], Any]:
        from diffkit.process import known_alpha_sigma
        from diffkit.sampling import Denoised

        def fast(x_t: Tensor, t: Tensor, d: Any, a: float, s: float) -> Any:
            # α, σ known as floats (the loop's time): clip, count, and re-derive ε̂ only if a step reads it
            x0 = d.x0
            if self.low is None or self.high is None:
                clipped, moved = self._clip(x0)
            else:
                low, high = self._limits(x0)
                clipped = torch.clamp(x0, low, high)
                moved = clipped != x0
            self._count(moved)
            if s <= 0:
                return Denoised(clipped, d.eps)
            if getattr(d, "consistent", None) is not None and d.consistent[0] is x_t:
                return Denoised.from_x0(clipped, x_t, a, s)  # ε̂ is defined from x̂_0: the same formula, clipped
            eps0 = d.eps  # consistent with x0: moving x̂_0 by δ moves ε̂ by −δ·α/σ (0 where in range)
            return Denoised(clipped, make_eps=lambda: torch.add(eps0, x0 - clipped, alpha=a / s))

        def bounded(x_t: Tensor, t: Tensor) -> Any:
            d = denoise(x_t, t)
            known = known_alpha_sigma(t)
            if known is not None:
                return fast(x_t, t, d, *known)
            x0, moved = self._clip(d.x0)
            a, s = (c.to(x_t.dtype) for c in self.schedule.coefficients(t, x_t))
            s_safe = torch.where(s > 0, s, torch.ones_like(s))
            eps = torch.where(moved & (s > 0), (x_t - a * x0) / s_safe, d.eps)
            self._count(moved)
            return type(d)(torch.where(moved, x0, d.x0), eps)

        return bounded

    @property
    def share(self) -> float:
        """Share of the x̂_0 values predicted so far that the bound moved (0 before any)."""
        if self.seen == 0:
            return 0.0
        self._fold()
        moved = sum(int(c.item()) for c in self.counts)
        if self.tally is not None:
            moved += int(self.tally.sum().item())
        return moved / self.seen
