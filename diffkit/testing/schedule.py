"""``check_schedule``: the forward process q(x_t | x_0) a schedule defines is a valid one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffkit.interfaces import TIMESTEP_SPACINGS, BuildContext, Schedule
from diffkit.process import GRIDS, Process
from diffkit.registry import Registry
from diffkit.testing._common import Subject, max_abs, resolve

__all__ = ["check_schedule"]

F64 = torch.float64
RTOL = 1e-9  # float64 identities that hold up to rounding


def check_schedule(
    schedule: Schedule | str,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    seed: int = 0,
) -> None:
    """Check that a schedule defines a valid forward process; raise
    :class:`~diffkit.testing.ConformanceError` saying what is wrong if not.

    ``schedule`` is a built :class:`~diffkit.Schedule`, or a registered name (built with
    ``params`` from ``registry``, by default the current one; its Params model is
    checked too). The properties:

    - ᾱ_t (``alphas_cumprod``) is a 1-D float64 tensor of T ≥ 2 values in (0, 1),
      strictly decreasing in t;
    - β_t, α_t, σ_t and SNR(t) agree with ᾱ_t: ∏_{s≤t} (1 − β_s) = ᾱ_t, α_t = 1 − β_t,
      σ_t² = 1 − ᾱ_t, SNR = ᾱ/(1 − ᾱ);
    - the one-step kernels q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I) compose to the
      closed form q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (Ho et al. 2020, Eq. 2 → Eq. 4),
      and ``q_sample`` draws from that closed form for points and images, in float32 and
      float64, keeping the input's shape and dtype;
    - ``posterior`` is q(x_{t−1} | x_t, x_0) (Ho et al. 2020, Eq. 6–7), checked against
      Gaussian conditioning of the two kernels (Bishop 2006, Eq. 2.116–2.117), and
      ``alpha_bar(-1)`` is 1 (clean data);
    - ``timesteps(steps, spacing)`` gives ``steps`` strictly decreasing timesteps in
      [0, T − 1] for every spacing.
    """
    subject = resolve("schedule", schedule, params, registry, BuildContext(data_diameter=10.0))
    sch = subject.obj
    subject.expect(
        isinstance(sch, Process),
        f"a schedule must be a diffkit.Process (a continuous process) or a diffkit.Schedule (a discrete table:"
        f" Schedule(alphas_cumprod) or Schedule.from_betas(betas)), got {type(sch).__name__}",
    )
    if not isinstance(sch, Schedule):
        _check_process(subject, sch, torch.Generator().manual_seed(seed))
        return
    abar = _check_alpha_bar(subject, sch)
    _check_derived(subject, sch, abar)
    _check_composition(subject, sch, abar)
    gen = torch.Generator().manual_seed(seed)
    _check_q_sample(subject, sch, abar, gen)
    _check_posterior(subject, sch, abar, gen)
    _check_timesteps(subject, sch)


def _check_process(subject: Subject, proc: Process, gen: torch.Generator) -> None:
    """A continuous process: α, σ finite and positive on [t_min, t_max] (σ = 0, α = 1 at
    t_clean); λ strictly decreasing; σ̃ ↔ t inverse; α', σ' equal central differences;
    g² ≥ 0; q_sample's moments; every grid strictly decreasing and ending at t_clean."""
    lo, hi = float(proc.t_min), float(proc.t_max)
    subject.expect(lo < hi, f"t_min ({lo}) must lie below t_max ({hi})")
    t = torch.linspace(lo, hi, 257, dtype=F64)
    if lo == float(proc.t_clean):  # σ reaches 0 at t_min (rectified flow): the noisy times lie above it
        t = t[1:]
    a, s = proc.alpha_sigma(t)
    subject.expect(
        bool(torch.isfinite(a).all() & torch.isfinite(s).all() & (a > 0).all() & (s > 0).all()),
        "α(t) and σ(t) must be finite and positive on [t_min, t_max]",
    )
    a0, s0 = proc.alpha_sigma(torch.tensor(float(proc.t_clean), dtype=F64))
    subject.expect(abs(float(a0) - 1) < 1e-12 and float(s0) == 0.0, f"at t_clean = {proc.t_clean} α must be 1 and σ 0")
    lam = proc.log_snr(t)
    subject.expect(bool((lam[1:] < lam[:-1]).all()), "λ(t) = log α²/σ² must be strictly decreasing in t")
    back = proc.t_of_sigma_tilde(s / a)
    err = max_abs(back, t) / max(1.0, hi - lo)
    subject.expect(err < 1e-6, f"t_of_sigma_tilde must invert σ̃(t) = σ/α; off by {err:.3g} (relative to the range)")
    inner = t[1:-1]
    h = 1e-6 * max(1.0, hi - lo)
    da, ds = proc.derivatives(inner)
    (a1, s1), (a2, s2) = proc.alpha_sigma(inner + h), proc.alpha_sigma(inner - h)
    for name, d, fd in (("α'", da, (a1 - a2) / (2 * h)), ("σ'", ds, (s1 - s2) / (2 * h))):
        scale = max(1.0, float(fd.abs().max()))
        subject.expect(max_abs(d, fd) / scale < 1e-4, f"derivatives(): {name} differs from a central difference")
    _, g2 = proc.drift_diffusion(inner)
    subject.expect(bool((g2 >= -1e-9).all()), "the forward SDE's g² = 2σσ' − 2(α'/α)σ² must be non-negative")
    x0 = torch.randn(20_000, 2, generator=gen, dtype=F64) * 0.5 + 1.0
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    tm = torch.full((x0.shape[0],), 0.5 * (lo + hi), dtype=F64)
    am, sm = (float(v) for v in proc.alpha_sigma(tm[:1]))
    xt = proc.q_sample(x0, tm, eps)
    subject.expect(torch.allclose(xt, am * x0 + sm * eps, rtol=1e-9, atol=1e-9), "q_sample must give α x_0 + σ ε")
    for spacing in GRIDS:
        g = proc.grid(7, spacing)
        subject.expect(
            bool((g[1:] < g[:-1]).all()) and float(g[-1]) == float(proc.t_clean) and abs(float(g[0]) - hi) < 1e-9,
            f"grid(7, {spacing!r}) must descend strictly from t_max to t_clean, got {g.tolist()}",
        )


def _check_alpha_bar(subject: Subject, sch: Schedule) -> Tensor:
    abar = sch.alphas_cumprod
    subject.expect(
        isinstance(abar, Tensor) and abar.ndim == 1 and abar.dtype == F64,
        "ᾱ (alphas_cumprod) must be a 1-D float64 tensor, got "
        + (f"{abar.dtype} of shape {tuple(abar.shape)}" if isinstance(abar, Tensor) else type(abar).__name__),
    )
    T = abar.numel()
    subject.expect(T >= 2, f"a schedule needs at least 2 steps, got T = {T}")
    subject.expect(sch.T == T, f"T is {sch.T} but ᾱ has {T} values")
    outside = (~(torch.isfinite(abar) & (abar > 0) & (abar < 1))).nonzero()
    if outside.numel():
        t = int(outside[0])
        raise subject.fail(f"ᾱ_t must lie strictly inside (0, 1), but ᾱ_{t} = {abar[t].item():.6g}")
    rising = (abar[1:] >= abar[:-1]).nonzero()
    if rising.numel():
        t = int(rising[0])
        raise subject.fail(
            f"ᾱ_t must be strictly decreasing in t (each step adds noise), but ᾱ_{t + 1} = {abar[t + 1].item():.10g}"
            f" ≥ ᾱ_{t} = {abar[t].item():.10g}"
        )
    return abar


def _close(a: Tensor, b: Tensor, rtol: float = RTOL, atol: float = 0.0) -> bool:
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))


def _check_derived(subject: Subject, sch: Schedule, abar: Tensor) -> None:
    betas, alphas = sch.betas, sch.alphas
    subject.expect(
        isinstance(betas, Tensor) and betas.shape == abar.shape,
        f"β (betas) must be a tensor of ᾱ's shape {tuple(abar.shape)}",
    )
    bad = (~((betas > 0) & (betas <= 1))).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise subject.fail(f"β_t must lie in (0, 1], but β_{t} = {betas[t].item():.6g}")
    subject.expect(
        _close(torch.cumprod(1.0 - betas.double(), 0), abar),
        "β is inconsistent with ᾱ: ∏_{s≤t} (1 − β_s) differs from ᾱ_t by up to"
        f" {max_abs(torch.cumprod(1.0 - betas.double(), 0), abar):.3g}",
    )
    subject.expect(_close(alphas, 1.0 - betas.double()), "α_t must equal 1 − β_t")
    subject.expect(_close(sch.noise_std.square(), 1.0 - abar), "noise_std² (σ_t²) must equal 1 − ᾱ_t")
    subject.expect(torch.equal(sch.sigmas, sch.noise_std), "sigmas must stay the alias of noise_std")
    subject.expect(_close(sch.snr, abar / (1.0 - abar)), "SNR(t) must equal ᾱ_t / (1 − ᾱ_t)")


def _check_composition(subject: Subject, sch: Schedule, abar: Tensor) -> None:
    """Compose the one-step kernels from x_0: the mean coefficient m_t = √α_t m_{t−1} and
    the variance v_t = α_t v_{t−1} + β_t (m_{−1} = 1, v_{−1} = 0), which must be √ᾱ_t and
    1 − ᾱ_t (Ho et al. 2020, Eq. 2 composed into Eq. 4)."""
    m, v = 1.0, 0.0
    betas = sch.betas.double().tolist()
    for t, beta in enumerate(betas):
        m, v = math.sqrt(1.0 - beta) * m, (1.0 - beta) * v + beta
        a = abar[t].item()
        if not (math.isclose(m, math.sqrt(a), rel_tol=1e-8) and math.isclose(v, 1.0 - a, rel_tol=1e-8, abs_tol=1e-14)):
            raise subject.fail(
                f"the one-step kernels q(x_t | x_(t−1)) = N(√(1−β_t) x_(t−1), β_t I) do not compose to"
                f" q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I): at t = {t} they give mean coefficient {m:.10g}"
                f" and variance {v:.10g}, the closed form {math.sqrt(a):.10g} and {1.0 - a:.10g}"
            )


def _check_q_sample(subject: Subject, sch: Schedule, abar: Tensor, gen: torch.Generator) -> None:
    T = sch.T
    for shape in ((6, 2), (4, 1, 3, 3)):
        for dtype in (torch.float32, F64):
            x0 = torch.randn(shape, generator=gen, dtype=dtype)
            noise = torch.randn(shape, generator=gen, dtype=dtype)
            t = torch.randint(0, T, (shape[0],), generator=gen)
            t[0], t[-1] = 0, T - 1
            out = sch.q_sample(x0, t, noise)
            subject.expect(
                isinstance(out, Tensor) and out.shape == x0.shape and out.dtype == dtype,
                f"q_sample on x_0 of shape {shape} and dtype {dtype} must return that shape and dtype, got "
                + (f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__),
            )
            a = abar[t].reshape(-1, *[1] * (len(shape) - 1))
            expected = a.sqrt() * x0.double() + (1.0 - a).sqrt() * noise.double()
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            err = max_abs(out, expected)
            subject.expect(
                err <= tol * (1 + expected.abs().max().item()),
                f"q_sample(x_0, t, ε) must be √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho et al. 2020, Eq. 4); it differs by {err:.3g}"
                f" for {dtype} data of shape {shape}",
            )
    x = torch.randn(3, 2, generator=gen, dtype=F64)
    one = sch.alpha_bar(torch.full((3,), -1), x)
    subject.expect(_close(one, torch.ones_like(one)), "alpha_bar(t = −1) must be 1, the clean data")


def _check_posterior(subject: Subject, sch: Schedule, abar: Tensor, gen: torch.Generator) -> None:
    """q(x_{t−1} | x_t, x_0) ∝ N(x_t; √α_t x_{t−1}, β_t I) · N(x_{t−1}; √ᾱ_{t−1} x_0, (1 − ᾱ_{t−1}) I);
    Gaussian conditioning (Bishop 2006, Eq. 2.116–2.117) gives precision
    λ = α_t/β_t + 1/(1 − ᾱ_{t−1}) and mean (√α_t x_t/β_t + √ᾱ_{t−1} x_0/(1 − ᾱ_{t−1}))/λ.
    At t = 0, ᾱ_{−1} = 1 and the posterior is the point mass at x_0."""
    T = sch.T
    n = 16
    t = torch.randint(1, T, (n,), generator=gen)
    t[0], t[-1] = 1, T - 1
    x0 = torch.randn(n, 2, generator=gen, dtype=F64)
    xt = torch.randn(n, 2, generator=gen, dtype=F64)
    mean, var = sch.posterior(x0, xt, t)
    betas = sch.betas.double()
    a_t, b_t, a_prev = (1.0 - betas[t])[:, None], betas[t][:, None], abar[t - 1][:, None]
    precision = a_t / b_t + 1.0 / (1.0 - a_prev)
    want_mean = (a_t.sqrt() * xt / b_t + a_prev.sqrt() * x0 / (1.0 - a_prev)) / precision
    want_var = (1.0 / precision).expand_as(xt)
    err_mean, err_var = max_abs(mean, want_mean), max_abs(torch.as_tensor(var).expand_as(xt), want_var)
    subject.expect(
        err_mean <= 1e-8 * (1 + want_mean.abs().max().item()) and err_var <= 1e-8 * want_var.max().item(),
        "posterior(x_0, x_t, t) must be the mean and variance of q(x_(t−1) | x_t, x_0) (Ho et al. 2020, Eq. 6–7);"
        f" it differs from Gaussian conditioning of the two kernels by {err_mean:.3g} (mean) and {err_var:.3g}"
        " (variance)",
    )
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    want_pv = 1.0 / ((1.0 - betas) / betas + 1.0 / (1.0 - prev))  # 1/λ for every t; 1/∞ = 0 at t = 0
    subject.expect(
        _close(sch.posterior_variance, want_pv, rtol=1e-8),
        "posterior_variance must be β̃_t = (1 − ᾱ_(t−1))/(1 − ᾱ_t) β_t, 0 at t = 0 (Ho et al. 2020, Eq. 7)",
    )
    zero = torch.zeros(n, dtype=torch.long)
    mean0, var0 = sch.posterior(x0, xt, zero)
    subject.expect(
        max_abs(mean0, x0) <= 1e-8 and torch.as_tensor(var0).abs().max().item() <= 1e-12,
        "at t = 0 the posterior q(x_(−1) | x_0, x_0) is the point mass at x_0 (mean x_0, variance 0)",
    )


def _check_timesteps(subject: Subject, sch: Schedule) -> None:
    T = sch.T
    for steps in sorted({1, 2, max(1, T // 3), T}):
        for spacing in TIMESTEP_SPACINGS:
            ts = list(sch.timesteps(steps, spacing))  # type: ignore[arg-type]
            ok = (
                len(ts) == steps
                and all(0 <= t <= T - 1 for t in ts)
                and all(a > b for a, b in zip(ts, ts[1:]))
            )
            subject.expect(
                ok,
                f"timesteps({steps}, {spacing!r}) must give {steps} strictly decreasing timesteps in [0, {T - 1}],"
                f" got {ts[:8]}{' …' if len(ts) > 8 else ''} ({len(ts)} values)",
            )
