"""The reverse process as one loop, and samplers as its steps.

The loop (:func:`run`) owns everything a sampler has in common: the starting state
(a draw of the prior, or ``x_start`` at ``t_start``), the grid of noise levels, the
noise (one generator, drawn in order), callbacks, progress and the memory a multistep
method keeps between steps. A sampler contributes two things, written as its paper
writes them:

- ``levels(process, steps, start)``: the times it visits, descending, ending at the
  clean data (``process.t_clean``), by default ``process.grid(steps, spacing)``;
- ``step(x, ctx)``: one update from ``ctx.t`` to ``ctx.s``, seeing the model only as
  ``ctx.denoise(x, t) -> Denoised(x0, eps)``.

A step never sees the network, the objective, guidance or clipping: the prediction
function the pipeline hands the loop already includes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from diffkit.noise import PRIOR, SampleNoise
from diffkit.process import GRIDS, Grid, Process, mark_alpha_sigma

__all__ = [
    "Denoised",
    "DenoiseFn",
    "StepContext",
    "StepSampler",
    "StepSamplerBase",
    "steps_field",
    "spacing_field",
    "clip_field",
    "resolve_steps",
    "ClipDenoised",
    "is_step_sampler",
    "run",
    "clamp_denoised",
    "bound_denoised",
    "denoise_from_eps",
    "table_time",
    "dynamic_threshold",
    "times_tensor",
]


class Denoised:
    """The model's estimates at (x_t, t): the clean data x̂_0 and the noise ε̂, consistent
    with each other: x_t = α(t)·x̂_0 + σ(t)·ε̂.

    Unpacks as the pair ``x0, eps``. ε̂ may be given as a function computing it on first
    use (``make_eps``): a bound on x̂_0 re-derives ε̂ only for the samplers that read it.
    """

    __slots__ = ("x0", "_eps", "_make_eps", "consistent")

    def __init__(self, x0: Tensor, eps: Tensor | None = None, make_eps: Callable[[], Tensor] | None = None) -> None:
        if eps is None and make_eps is None:
            raise TypeError("Denoised needs eps or make_eps")
        self.x0, self._eps, self._make_eps = x0, eps, make_eps
        self.consistent: tuple[Tensor, float, float] | None = None  # (x_t, α, σ) where ε̂ is defined from x̂_0

    @property
    def eps(self) -> Tensor:
        if self._eps is None:
            assert self._make_eps is not None
            self._eps, self._make_eps = self._make_eps(), None
        return self._eps

    def __iter__(self) -> Iterator[Tensor]:
        yield self.x0
        yield self.eps

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Tensor:
        return (self.x0, self.eps)[i]

    @classmethod
    def from_x0(cls, x0: Tensor, x_t: Tensor, alpha: float, sigma: float) -> Denoised:
        """x̂_0 with the ε̂ consistent with it, ε̂ = (x_t − α x̂_0)/σ (σ > 0), computed on first use."""

        def make() -> Tensor:
            return (x_t - (x0 if alpha == 1.0 else x0 * alpha)) / sigma

        d = cls(x0, make_eps=make)
        d.consistent = (x_t, alpha, sigma)
        return d

    def _replace(self, **fields: Tensor) -> Denoised:
        return Denoised(fields.get("x0", self.x0), fields["eps"] if "eps" in fields else self.eps)

    def __repr__(self) -> str:
        return f"Denoised(x0={self.x0!r}, eps={self.eps!r})"


DenoiseFn = Callable[[Tensor, Tensor], Denoised]
"""``denoise(x_t, t) -> Denoised``, t of shape ``[batch]`` (float64): all a step sees of the model."""

ClipDenoised = float | Literal["auto", "dynamic"] | None


def times_tensor(t: float, n: int, device: torch.device | str, process: Process | None = None) -> Tensor:
    """t for every sample of a batch: a discrete table's integer timestep as int64 (what its
    network was trained on; no check on the device needed later), float64 otherwise
    (float32 on MPS)."""
    if process is not None and process.discrete and float(t).is_integer():
        return torch.full((n,), int(t), device=device, dtype=torch.long)
    dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
    return torch.full((n,), float(t), device=device, dtype=dtype)


def table_time(process: Process, t: Tensor) -> Tensor:
    """t as a 0.1 prediction function expects it: int64 timesteps on a discrete table
    where every t is integral, the float time otherwise."""
    if process.discrete and t.is_floating_point() and bool((t == t.round()).all()):
        return t.long()
    return t


def denoise_from_eps(predict: Callable[[Tensor, Tensor], Tensor], process: Process) -> DenoiseFn:
    """A :data:`DenoiseFn` from an ε̂-prediction ``predict(x_t, t)``: x̂_0 = (x_t − σ ε̂)/α."""

    def denoise(x_t: Tensor, t: Tensor) -> Denoised:
        tt = table_time(process, t)
        eps = predict(x_t, tt)
        a, s = process.coefficients(tt, x_t)
        return Denoised((x_t - s.to(x_t.dtype) * eps) / a.to(x_t.dtype), eps)

    return denoise


def bound_denoised(denoise: DenoiseFn, process: Process, bound: float | Tensor | str | None) -> DenoiseFn:
    """``denoise`` with x̂_0 bounded: ``None`` leaves it, ``"dynamic"`` thresholds it
    (:func:`dynamic_threshold`), a number or per-coordinate tensor clips it (:func:`clamp_denoised`)."""
    if bound is None:
        return denoise
    if isinstance(bound, str):
        if bound != "dynamic":
            raise ValueError(f"unknown x̂_0 bound {bound!r}")

        def thresholded(x: Tensor, t: Tensor) -> Denoised:
            d = denoise(x, t)
            return _consistent(process, x, t, dynamic_threshold(d.x0), d.eps)

        return thresholded
    return clamp_denoised(denoise, process, bound)


def _consistent(process: Process, x: Tensor, t: Tensor, x0: Tensor, eps: Tensor) -> Denoised:
    """(x̂_0, ε̂) with ε̂ = (x_t − α x̂_0)/σ recomputed from a changed x̂_0 (kept where σ = 0)."""
    a, s = process.coefficients(t, x)
    s_safe = torch.where(s > 0, s, torch.ones_like(s))
    return Denoised(x0, torch.where(s > 0, (x - a.to(x.dtype) * x0) / s_safe.to(x.dtype), eps))


def clamp_denoised(denoise: DenoiseFn, process: Process, bound: float | Tensor) -> DenoiseFn:
    """x̂_0 clipped to [−b, b] (b a number or a per-coordinate tensor), and the ε̂ consistent
    with the clipped x̂_0: ε̂ = (x_t − α x̂_0)/σ (Ho et al. 2020's sampler clips x̂_0 to the
    data range; the consistent ε̂ keeps deterministic samplers on the same path)."""

    def clipped(x: Tensor, t: Tensor) -> Denoised:
        d = denoise(x, t)
        b = torch.as_tensor(bound, device=x.device, dtype=x.dtype)
        return _consistent(process, x, t, torch.maximum(torch.minimum(d.x0, b), -b), d.eps)

    return clipped


def dynamic_threshold(x0: Tensor, percentile: float = 0.995, floor: float = 1.0) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample, s = max(floor,
    the ``percentile`` quantile of |x̂_0|), then x̂_0 ← clip(x̂_0, −s, s)/s."""
    flat = x0.abs().flatten(1).float()
    s = torch.quantile(flat, percentile, dim=1).clamp_min(floor).to(x0.dtype)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


@dataclass
class StepContext:
    """What one step of a sampler sees: where it is (``t``, step ``i`` of ``n``), where it
    goes (``s``), the model (:meth:`denoise`), fresh noise (:meth:`noise`) and the process.

    ``memory`` persists from step to step within one run (a multistep solver keeps its
    previous x̂_0 there); the sampler object itself keeps no state.
    """

    i: int
    n: int
    t: float
    s: float
    process: Process
    denoise_fn: DenoiseFn
    generator: torch.Generator | None
    memory: dict[str, Any] = field(default_factory=dict)
    known: dict[float, tuple[float, float]] = field(default_factory=dict)
    """α, σ at the grid's times, computed once per run by the loop."""
    source: SampleNoise | None = None
    """The per-sample noise of the run (:mod:`diffkit.noise`); ``generator`` is used without one."""
    times: dict[Any, Tensor] = field(default_factory=dict)
    """The time tensors handed to the model in this run, by (time, batch, device)."""
    draws: int = 0
    """Noise draws made so far in this step: the k-th draw is slot k of the step's position."""

    # -- the model and the noise ------------------------------------------------------
    def denoise(self, x: Tensor, t: float | None = None) -> Denoised:
        """The model's (x̂_0, ε̂) at x, at time ``t`` (default: this step's t)."""
        t = self.t if t is None else t
        key = (t, x.shape[0], x.device)
        tt = self.times.get(key)
        if tt is None:  # one tensor per time and batch in a run, marked with its α, σ
            tt = mark_alpha_sigma(times_tensor(t, x.shape[0], x.device, self.process), self.alpha_sigma(t), t)
            self.times[key] = tt
        return self.denoise_fn(x, tt)

    def noise(self, like: Tensor) -> Tensor:
        """A standard normal draw of ``like``'s shape: per sample, a function of (seed,
        sample, step, draw) (:class:`~diffkit.noise.SampleNoise`) in a pipeline's run; from
        the loop's generator otherwise."""
        k = self.draws
        self.draws = k + 1
        if self.source is not None:
            return self.source.normal(k, self.i + 1, like)
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    # -- the process at a time, as floats ---------------------------------------------
    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """α(t), σ(t) as Python floats (float64)."""
        hit = self.known.get(t)
        if hit is not None:
            return hit
        a, s = self.process.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        return float(a), float(s)

    def ends(self) -> tuple[float, float, float, float]:
        """(α_t, σ_t, α_s, σ_s): the process at both ends of this step."""
        return (*self.alpha_sigma(self.t), *self.alpha_sigma(self.s))

    @property
    def last(self) -> bool:
        """Whether this step lands on the clean data."""
        return self.s == self.process.t_clean

    def sigma_tilde(self, t: float) -> float:
        """σ̃ = σ/α at t (0 at the clean data)."""
        a, s = self.alpha_sigma(t)
        return s / a

    def time_of_sigma_tilde(self, sigma_tilde: float) -> float:
        return float(self.process.t_of_sigma_tilde(torch.tensor(float(sigma_tilde), dtype=torch.float64)))

    def derivatives(self, t: float) -> tuple[float, float]:
        da, ds = self.process.derivatives(torch.tensor(float(t), dtype=torch.float64))
        return float(da), float(ds)

    def drift_diffusion(self, t: float) -> tuple[float, float]:
        """(f, g²) of the forward SDE dx = f x dt + g dw at t."""
        f, g2 = self.process.drift_diffusion(torch.tensor(float(t), dtype=torch.float64))
        return float(f), float(g2)


def steps_field(default: int | None) -> Any:
    hint = "the process's own default" if default is None else str(default)
    return Field(
        None,
        ge=1,
        description=f"Number of steps; null takes {hint} (a discrete table's T caps it).",
    )


def spacing_field() -> Any:
    return Field(
        None,
        description=f"The grid of noise levels, one of {', '.join(GRIDS)}; null takes the process's default"
        " (linspace in t; karras for edm).",
    )


def clip_field() -> Any:
    return Field(
        "auto",
        description="What is done to x̂_0 at each step: 'auto' clips it to the data's range (images: [−1, 1];"
        " points: the range recorded from the training data); a number c clips to [−c, c]; 'dynamic' is dynamic"
        " thresholding (Saharia et al. 2022); null leaves it alone.",
    )


@runtime_checkable
class StepSampler(Protocol):
    """A sampler as a step of :func:`run` (plugin API 2).

    ``params`` is its validated ``Params`` (with ``steps``, ``spacing`` and ``clip_denoised``);
    ``default_steps`` the steps taken when neither the call nor the spec says.
    """

    api: ClassVar[int]
    params: Any
    default_steps: ClassVar[int]

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor: ...

    def step(self, x: Tensor, ctx: StepContext) -> Tensor: ...


class StepSamplerBase(ABC):
    """Shared defaults for step samplers: the grid is ``process.grid(steps, params.spacing)``."""

    api: ClassVar[int] = 2
    default_steps: ClassVar[int] = 50
    name: ClassVar[str] = "sampler"

    def __init__(self, params: Any) -> None:
        self.params = params

    @property
    def clip_denoised(self) -> Any:
        """What is done to x̂_0 at each step (the ``clip_denoised`` of the params; ``"auto"`` without one)."""
        return getattr(self.params, "clip_denoised", "auto")

    def levels(self, process: Process, steps: int, start: float | None = None) -> Tensor:
        """``process.grid(steps, params.spacing)``; with no spacing given, a discrete table's
        'trailing' (it starts at T − 1 and spends every step on noise it can remove, Lin
        et al. 2024) and a continuous process's own default."""
        spacing = getattr(self.params, "spacing", None) or ("trailing" if process.discrete else None)
        return process.grid(steps, spacing, start=start)

    @abstractmethod
    def step(self, x: Tensor, ctx: StepContext) -> Tensor:
        """One update of the state from ``ctx.t`` to ``ctx.s``."""

    def __call__(
        self,
        predict: Callable[[Tensor, Tensor], Tensor],
        schedule: Process,
        shape: Sequence[int],
        *,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
        callback: Callable[[Any, Tensor], Tensor | None] | None = None,
        x_start: Tensor | None = None,
        t_start: float | None = None,
    ) -> Tensor:
        """The 0.1 calling convention, ``sampler(predict, schedule, shape, ...)`` with
        ``predict(x_t, t) -> ε̂``: runs this sampler's steps in :func:`run`. A numeric
        ``clip_denoised`` or ``"dynamic"`` applies; ``"auto"`` needs the data's range, which
        only a pipeline knows, and leaves x̂_0 alone here."""
        clip = getattr(self.params, "clip_denoised", None)
        bound = None if clip in (None, "auto") else clip
        denoise = bound_denoised(denoise_from_eps(predict, schedule), schedule, bound)
        return run(
            self,
            denoise,
            schedule,
            shape,
            steps=steps,
            generator=generator,
            device=device,
            dtype=dtype,
            progress=progress,
            callback=callback,
            x_start=x_start,
            t_start=t_start,
        )


def is_step_sampler(sampler: object) -> bool:
    """Whether ``sampler`` is written against the loop (API 2) rather than as a whole loop (0.1)."""
    return getattr(sampler, "api", 1) == 2 and callable(getattr(sampler, "step", None))


def resolve_steps(sampler: Any, process: Process, steps: int | None) -> int:
    """Steps from the call, else the spec's, else the sampler's default; a discrete table's T caps the default."""
    if steps is None:
        steps = getattr(sampler.params, "steps", None)
    if steps is None:
        steps = sampler.default_steps
        if process.discrete:
            steps = min(steps, int(process.t_max) + 1)
    steps = int(steps)
    if process.discrete and not 1 <= steps <= int(process.t_max) + 1:
        raise ValueError(f"steps must be between 1 and the schedule's T = {int(process.t_max) + 1}, got {steps}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return steps


def _report_time(t: float) -> float | int:
    return int(t) if float(t).is_integer() else float(t)


def run(
    sampler: Any,
    denoise: DenoiseFn,
    process: Process,
    shape: Sequence[int],
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable[[Any, Tensor], Tensor | None] | None = None,
    x_start: Tensor | None = None,
    t_start: float | None = None,
    levels: Tensor | None = None,
    noise: SampleNoise | None = None,
) -> Tensor:
    """Draw samples of ``shape`` with ``sampler``'s steps over its grid.

    The state starts as ``x_start`` at ``t_start`` (SDEdit), or as a draw of the prior
    N(0, prior_std² I) at the grid's first time. ``callback(t, x)`` sees the starting
    state and every state reached (t = ``process.t_clean`` for the clean result; integers
    on a discrete table) and may return a replacement (inpainting constrains the state
    this way). ``levels`` overrides the grid.

    Randomness: with ``noise`` (a :class:`~diffkit.noise.SampleNoise` for the batch's samples)
    every draw is per sample: the prior is slot 0 at position 0, step j's k-th draw slot k
    at position j + 1, so a sample does not depend on the batch it is drawn in. Without it,
    draws come from ``generator`` in order (0.1's noise, which depends on the batch).
    """
    n_steps = resolve_steps(sampler, process, steps)
    ts = sampler.levels(process, n_steps, t_start) if levels is None else levels
    ts = torch.as_tensor(ts, dtype=torch.float64).reshape(-1)
    if noise is not None and noise.positions is None:
        noise.positions = len(ts)  # how far ahead its streams draw (no value depends on it)
    if x_start is None:
        if noise is not None:
            x = noise.normal(PRIOR, 0, tuple(shape), dtype=dtype, device=device)
        else:
            x = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
        std = process.prior_std()
        if std != 1.0:
            x = x * std
    else:
        x = x_start.to(device=device, dtype=dtype)
    times = ts.tolist()
    if callback is not None:
        new = callback(_report_time(times[0]), x)
        x = x if new is None else new
    memory: dict[str, Any] = {}
    time_tensors: dict[Any, Tensor] = {}
    a_all, s_all = process.alpha_sigma(ts)
    known = dict(zip(times, zip(a_all.tolist(), s_all.tolist())))
    name = getattr(sampler, "name", type(sampler).__name__.lower())
    n = len(times) - 1
    for i in tqdm(range(n), desc=name, leave=False) if progress else range(n):
        ctx = StepContext(i, n, times[i], times[i + 1], process, denoise, generator, memory, known, noise, time_tensors)
        x = sampler.step(x, ctx)
        if callback is not None:
            new = callback(_report_time(times[i + 1]), x)
            x = x if new is None else new
    return x

