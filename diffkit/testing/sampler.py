"""``check_sampler``: a sampler driven by the exact denoiser of Gaussian data recovers it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffkit.interfaces import BuildContext, Predict, Schedule
from diffkit.oracles import GaussianData
from diffkit.registry import Registry
from diffkit.sampling import is_step_sampler
from diffkit.testing._common import Subject, max_abs, reference_schedule, resolve

__all__ = ["check_sampler", "POINTS", "IMAGES"]

F64 = torch.float64

# 2-D points: a correlated Gaussian away from the origin (eigenvalues of Σ ≈ 1.40 and 0.10).
POINTS = GaussianData(torch.tensor([1.5, -0.8], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64))
# 1×4×4 images: independent pixels with mean 0.3 and variance 0.5.
IMAGES = GaussianData(torch.full((16,), 0.3, dtype=F64), 0.5 * torch.eye(16, dtype=F64), event_shape=(1, 4, 4))


def check_sampler(
    sampler: Any,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    schedule: Schedule | None = None,
    steps: int | None = None,
    n: int = 4000,
    tolerance: float = 0.1,
    seed: int = 0,
    per_sample: bool = True,
) -> None:
    """Check that a sampler draws from the data distribution when its denoiser is exact;
    raise :class:`~diffkit.testing.ConformanceError` saying what is wrong if not.

    ``sampler`` is a built sampler or a registered name (built with ``params`` from
    ``registry``; its Params model is checked too). It is driven by the exact optimal
    denoiser ε̂ = E[ε | x_t] of Gaussian data (:class:`diffkit.oracles.GaussianData`) on
    ``schedule`` (default: linear, T = 1000) with ``steps`` (default: its own), so every
    error left is the sampler's own. The properties:

    - it calls ``predict(x_t, t)`` with x_t of the asked shape and integer timesteps t
      of shape ``[batch]`` in [0, T − 1], and returns a finite tensor of the asked shape,
      dtype (float32 and float64) and device;
    - ``n`` samples of 2-D points have the data's mean and covariance, within 5
      standard errors plus ``tolerance`` times the data's scale (its discretisation
      budget); images of 1×4×4 pixels have the data's pixel mean and variance;
    - started from the exact marginal of x_t at ``t_start = T // 2`` (``x_start``), it
      recovers the data as well;
    - it is deterministic under a seed: two runs with one seed give the same samples,
      two seeds give different ones, and torch's global random generator is left
      untouched (all randomness comes from ``generator``);
    - ``callback(t, x_t)`` is called with each state, the last time with t = −1 and the
      returned sample, and a tensor it returns replaces the state;
    - a step sampler (plugin API 2) keeps the per-sample noise contract
      (:func:`diffkit.testing.noise.check_sampler_noise`): a sample depends on the seed and
      its index only, not on the batch. ``per_sample=False`` skips this for a sampler that
      documents coupling its batch (``pc`` with ``step_norms: batch``).
    """
    subject = resolve("sampler", sampler, params, registry, BuildContext(sample_shape=(2,)))
    subject.expect(callable(subject.obj), f"a sampler must be callable, got {type(subject.obj).__name__}")
    run = _Runner(subject, schedule or reference_schedule(), steps)
    with torch.inference_mode():
        x = run(POINTS, (n, 2), seed)
        _expect_moments(subject, x, POINTS, tolerance, "2-D points")
        _check_determinism(subject, run, seed)
        x64 = run(POINTS, (64, 2), seed, dtype=F64)
        subject.expect(x64.dtype == F64, f"asked for float64 samples, got {x64.dtype}")
        images = run(IMAGES, (max(n // 4, 256), 1, 4, 4), seed)
        _expect_pixel_moments(subject, images, IMAGES, tolerance, run, seed)
        _check_start(subject, run, max(n // 2, 256), tolerance, seed)
        _check_callback(subject, run, seed)
    if per_sample and is_step_sampler(subject.obj):
        from diffkit.testing.noise import check_sampler_noise

        # an adaptive solver picks its step sizes for the whole batch: it agrees to its tolerances
        p = getattr(subject.obj, "params", None)
        rtol, atol = getattr(p, "rtol", None), getattr(p, "atol", None)
        tol = 1e-9 if rtol is None else 300 * (float(rtol) + float(atol or 0.0))
        check_sampler_noise(subject.obj, {"the reference schedule": run.schedule}, atol=tol)


class _Runner:
    """Calls the sampler with an oracle's exact predict, checking every call of predict."""

    def __init__(self, subject: Subject, schedule: Schedule, steps: int | None) -> None:
        self.subject = subject
        self.schedule = schedule
        self.steps = steps

    def predict(self, oracle: GaussianData, shape: tuple[int, ...]) -> Predict:
        exact = oracle.predict(self.schedule)
        general = oracle.denoiser(self.schedule)
        T = self.schedule.T
        subject = self.subject

        def predict(x_t: Tensor, t: Tensor) -> Tensor:
            subject.expect(
                isinstance(x_t, Tensor) and tuple(x_t.shape) == shape,
                f"predict was called with x_t of shape {tuple(getattr(x_t, 'shape', ()))}, not the asked {shape}",
            )
            subject.expect(
                isinstance(t, Tensor) and tuple(t.shape) == (shape[0],),
                "predict must be called with timesteps of shape [batch], got "
                + (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__),
            )
            lo, hi = float(t.min()), float(t.max())
            subject.expect(0 <= lo and hi <= T - 1, f"predict was called with t in [{lo:g}, {hi:g}], outside [0, T − 1 = {T - 1}]")
            subject.expect(bool(torch.isfinite(x_t).all()), f"the state x_t became non-finite at t = {hi:g}")
            if t.is_floating_point():  # a step sampler between a table's integers (the interpolated process)
                return general(x_t, t).eps
            return exact(x_t, t)

        return predict

    def __call__(
        self,
        oracle: GaussianData,
        shape: tuple[int, ...],
        seed: int,
        *,
        dtype: torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> Tensor:
        subject = self.subject
        out = subject.obj(
            self.predict(oracle, shape),
            self.schedule,
            shape,
            generator=torch.Generator().manual_seed(seed),
            steps=self.steps,
            device="cpu",
            dtype=dtype,
            **kwargs,
        )
        subject.expect(isinstance(out, Tensor), f"a sampler must return a tensor, got {type(out).__name__}")
        subject.expect(
            tuple(out.shape) == shape and out.dtype == dtype and out.device.type == "cpu",
            f"asked for {shape} {dtype} samples on cpu, got {tuple(out.shape)} {out.dtype} on {out.device}",
        )
        subject.expect(bool(torch.isfinite(out).all()), f"the samples of shape {shape} are not all finite")
        return out


def _standard_errors(cov: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Standard errors of the sample mean, √(Σ_ii/n), and of the sample covariance,
    √((Σ_ii Σ_jj + Σ_ij²)/n) (Anderson 2003, Thm. 3.4.4), for n draws of N(μ, Σ)."""
    d = cov.diag()
    return (d / n).sqrt(), ((d[:, None] * d[None, :] + cov.square()) / n).sqrt()


def _expect_moments(subject: Subject, x: Tensor, oracle: GaussianData, tolerance: float, what: str) -> None:
    n = x.shape[0]
    flat = x.reshape(n, -1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    se_mean, se_cov = _standard_errors(oracle.cov, n)
    sd = oracle.cov.diag().sqrt()
    mean_ok = (mean - oracle.mean).abs() <= 5 * se_mean + tolerance * sd
    cov_ok = (cov - oracle.cov).abs() <= 5 * se_cov + tolerance * sd[:, None] * sd[None, :]
    subject.expect(
        bool(mean_ok.all() and cov_ok.all()),
        f"driven by the exact denoiser of Gaussian {what}, its {n} samples do not recover the data:"
        f" mean {_fmt(mean)} (data {_fmt(oracle.mean)}), covariance {_fmt(cov)} (data {_fmt(oracle.cov)});"
        f" allowed: 5 standard errors + {tolerance} × the data's scale. Check the update's coefficients"
        " against the paper, the noise added per step, and the last step to clean data",
    )


IMAGES_FLAT = GaussianData(IMAGES.mean, IMAGES.cov)
"""The data of :data:`IMAGES` as 16-vectors: what tells a rank mistake from discretisation error."""


def _pixel_moments(x: Tensor, oracle: GaussianData, tolerance: float) -> tuple[float, float, bool]:
    """The average pixel mean and variance of samples, and whether both are within 5
    standard errors plus ``tolerance`` times the data's scale of the oracle's."""
    n = x.shape[0]
    flat = x.reshape(n, -1).double()
    mean, var = flat.mean().item(), flat.var(0).mean().item()
    want_mean, want_var = oracle.mean.mean().item(), oracle.cov.diag().mean().item()
    sd = math.sqrt(want_var)
    pixels = flat.shape[1]
    mean_ok = abs(mean - want_mean) <= 5 * sd / math.sqrt(n * pixels) + tolerance * sd
    var_ok = abs(var - want_var) <= 5 * want_var * math.sqrt(2 / (n * pixels)) + tolerance * want_var
    return mean, var, mean_ok and var_ok


def _expect_pixel_moments(
    subject: Subject, x: Tensor, oracle: GaussianData, tolerance: float, run: _Runner, seed: int
) -> None:
    """The average pixel mean and variance of 1×4×4 image samples, against the data's. On a
    failure the same data is drawn as 16-vectors, and the message says which was measured:
    wrong as vectors too is the update's own error (too few steps, or a wrong coefficient);
    right as vectors but wrong as images is a mistake with the tensor's rank."""
    mean, var, ok = _pixel_moments(x, oracle, tolerance)
    if ok:
        return
    want_mean, want_var = oracle.mean.mean().item(), oracle.cov.diag().mean().item()
    flat = run(IMAGES_FLAT, (x.shape[0], 16), seed)
    f_mean, f_var, flat_ok = _pixel_moments(flat, IMAGES_FLAT, tolerance)
    measured = (
        f"driven by the exact denoiser of Gaussian 1×4×4 images, its samples have pixel mean {mean:.4f} and variance"
        f" {var:.4f}; the data's are {want_mean:.4f} and {want_var:.4f} (allowed: 5 standard errors + {tolerance} ×"
        f" the data's scale). The same data drawn as 16-vectors gives mean {f_mean:.4f} and variance {f_var:.4f}"
    )
    steps = "its default steps" if run.steps is None else f"{run.steps} steps"
    if flat_ok:
        raise subject.fail(
            f"{measured}, which is right: the update mishandles tensors of rank 4; broadcast per-sample coefficients"
            " with diffkit.diffusion.expand_like (never [:, None])"
        )
    raise subject.fail(
        f"{measured}, as wrong: the error does not depend on the tensor's rank. It is the update's own error with"
        f" {steps}: too few steps for its order (pass steps=, or a larger tolerance=), or a wrong coefficient; check"
        " the update against the paper"
    )


def _check_determinism(subject: Subject, run: _Runner, seed: int) -> None:
    shape = (256, 2)
    state = torch.get_rng_state()
    a = run(POINTS, shape, seed)
    touched_global = not torch.equal(state, torch.get_rng_state())
    b = run(POINTS, shape, seed)
    subject.expect(
        torch.equal(a, b),
        f"two runs with the same seed differ (by up to {max_abs(a, b):.3g}): draw every random number from the"
        " `generator` argument (torch.randn(..., generator=generator)), never from torch's global generator",
    )
    c = run(POINTS, shape, seed + 1)
    subject.expect(
        not torch.equal(a, c),
        "runs with different seeds gave identical samples: the sampler ignores its `generator`; draw the"
        " starting noise (and any other noise) from it",
    )
    subject.expect(
        not touched_global,
        "the sampler drew from torch's global random generator; take every random number from `generator`",
    )


def _check_start(subject: Subject, run: _Runner, n: int, tolerance: float, seed: int) -> None:
    """From x_start ~ q(x_t) = N(√ᾱ μ, ᾱΣ + (1 − ᾱ) I) at t_start = T // 2 the sampler must
    still end at the data (the reverse process from any marginal; SDEdit's use)."""
    t_start = run.schedule.T // 2
    a = run.schedule.alphas_cumprod[t_start].item()
    mean, cov = POINTS.marginal(a)
    chol = torch.linalg.cholesky(cov)
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed + 7), dtype=F64)
    x_start = (mean + z @ chol.T).float()
    x = run(POINTS, (n, 2), seed, x_start=x_start, t_start=t_start)
    _expect_moments(subject, x, POINTS, tolerance, f"2-D points started at t_start = {t_start} (x_start)")


def _check_callback(subject: Subject, run: _Runner, seed: int) -> None:
    shape = (64, 2)
    seen: list[tuple[int, Tensor]] = []

    def record(t: int, x: Tensor) -> None:
        seen.append((int(t), x.clone()))

    out = run(POINTS, shape, seed, callback=record)
    subject.expect(len(seen) >= 2, f"callback must be called with the start and after every step; it was called {len(seen)} time(s)")
    last_t, last_x = seen[-1]
    subject.expect(
        last_t == -1 and torch.equal(last_x, out),
        f"the last call of callback must be callback(-1, x_0) with the returned samples; it was t = {last_t}"
        + ("" if torch.equal(last_x, out) else " with a different state"),
    )
    marker = torch.full(shape, 0.25)

    def replace_last(t: int, x: Tensor) -> Tensor | None:
        return marker if t == -1 else None

    replaced = run(POINTS, shape, seed, callback=replace_last)
    subject.expect(
        torch.equal(replaced, marker),
        "a tensor returned by callback must replace the state; the one returned at t = −1 was not what the sampler"
        " returned",
    )


def _fmt(x: Tensor) -> str:
    return str([round(v, 3) for v in x.reshape(-1).tolist()]) if x.ndim < 2 else str(
        [[round(v, 3) for v in row] for row in x.tolist()]
    )

