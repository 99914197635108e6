"""Certification of a sampler with exact oracles: measured order, exact law, invariance.

The exact denoiser of Gaussian data and of a Gaussian mixture
(:mod:`diffkit.oracles`) gives every sampler a known answer under every process, with
no network in the way, so whatever error remains is the sampler's own:

- **order** (deterministic samplers): the error against a tight solution of the
  probability-flow ODE (Song et al. 2021, Eq. 13; the ``ode`` sampler at rtol = atol =
  1e-8 from the same starting noise) falls as N^{−p} as the number of steps N doubles;
  p is fitted by least squares on log e(N) against log N;
- **law** (stochastic samplers): the samples' mean and covariance (Gaussian data) and
  the mixture weights (mixture data) match the exact ones within k standard errors of
  the sampling error, plus a small allowance for the discretisation bias;
- **invariance**: the same exact denoiser written as the output of each objective
  (ε, x_0, v, score, flow, edm: ``objective.target`` of the oracle's x̂_0 and ε̂, then
  back through ``objective.denoised``) gives the same samples to float tolerance.

A sampler is deterministic when two runs from the same starting state with different
generators agree.

::

    from diffkit.testing import certify_sampler
    report = certify_sampler("heun")          # prints a table
    report.order("heun", "edm")               # ≈ 2
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffkit.oracles import GaussianData, GaussianMixture
from diffkit.process import Process
from diffkit.sampling import Denoised, DenoiseFn, is_step_sampler, run

__all__ = [
    "CertificationReport",
    "Row",
    "check_sampler",
    "certify_invariance",
    "certify_law",
    "certify_order",
    "is_deterministic",
    "default_processes",
    "measured_order",
    "reference_solution",
    "MIXTURE",
    "GAUSSIAN",
    "OBJECTIVES",
]

F64 = torch.float64

MIXTURE = GaussianMixture(
    torch.tensor([[-1.5, 0.5], [1.0, -1.0], [0.5, 1.5]], dtype=F64),
    torch.tensor([0.35, 0.3, 0.4], dtype=F64),
    torch.tensor([0.3, 0.3, 0.4], dtype=F64),
)
"""A centred 2-D mixture of three isotropic Gaussians (standard deviation ≈ 1.2 per axis)."""

GAUSSIAN = GaussianData(torch.tensor([0.4, -0.3], dtype=F64), torch.tensor([[1.0, 0.5], [0.5, 0.8]], dtype=F64))
"""A correlated 2-D Gaussian near the origin (eigenvalues of Σ ≈ 1.41 and 0.39)."""

LAW_MIN_STEPS = 200
"""The fewest steps the law is checked at (more where the sampler's own default is more):
at 20–50 steps the ancestral samplers' covariance is off by 0.1–0.6 (their discretisation
bias), at 200 by under 0.06."""

OBJECTIVES = ("epsilon", "x0", "v", "score", "flow", "edm")
"""The parameterisations the invariance check writes the exact denoiser in."""

DEFAULT_PROCESSES: dict[str, dict[str, Any]] = {
    "linear": {"timesteps": 1000},
    "cosine": {"timesteps": 1000},
    "vp": {},
    "sub-vp": {},
    # σ_max well above the data's diameter (≈ 5), Song & Ermon 2020, Technique 1
    "ve": {"sigma_max": 50.0},
    "edm": {"sigma_data": 1.0},
    "rectified-flow": {},
}


def default_processes(names: Sequence[str] | None = None) -> dict[str, Process]:
    """The registered processes certified by default, built for the oracles' data."""
    import diffkit

    chosen = DEFAULT_PROCESSES if names is None else {n: DEFAULT_PROCESSES.get(n, {}) for n in names}
    return {name: diffkit.build("schedule", name, **kw) for name, kw in chosen.items()}  # type: ignore[misc]


# -- the report ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One measurement: ``check`` is ``order``, ``law`` or ``invariance``; ``value`` the
    measured number (the order p; the largest error in standard errors; the largest
    difference between parameterisations); ``passed`` whether it met ``bound``."""

    sampler: str
    process: str
    check: str
    value: float
    bound: str
    passed: bool
    detail: str = ""


@dataclass
class CertificationReport:
    """The rows of a certification, printed as a table."""

    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def find(self, sampler: str, process: str, check: str) -> Row:
        for r in self.rows:
            if (r.sampler, r.process, r.check) == (sampler, process, check):
                return r
        raise KeyError(f"no {check} row for sampler {sampler!r} on process {process!r}")

    def order(self, sampler: str, process: str) -> float:
        """The measured order of ``sampler`` on ``process``."""
        return self.find(sampler, process, "order").value

    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    def __add__(self, other: CertificationReport) -> CertificationReport:
        return CertificationReport(self.rows + other.rows)

    def __str__(self) -> str:
        head = ("sampler", "process", "check", "value", "bound", "ok", "detail")
        body = [
            (r.sampler, r.process, r.check, f"{r.value:.4g}", r.bound, "yes" if r.passed else "NO", r.detail)
            for r in self.rows
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        return "\n".join(line.rstrip() for line in lines)


# -- the pieces ---------------------------------------------------------------------------------
def _build_sampler(sampler: Any) -> tuple[Any, str]:
    """A step sampler and its name from a registered name, a spec dict or an object."""
    if isinstance(sampler, str) or isinstance(sampler, Mapping):
        import diffkit

        spec = {"type": sampler} if isinstance(sampler, str) else dict(sampler)
        name = str(spec["type"])
        extra = {k: v for k, v in spec.items() if k != "type"}
        if extra:
            name += "(" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
        obj = diffkit.build("sampler", spec)
    else:
        obj = sampler
        name = getattr(obj, "name", type(obj).__name__.lower())
    if not is_step_sampler(obj):
        raise TypeError(
            f"{name} is not a step sampler (plugin API 2: levels() and step()); certification drives samplers"
            " through diffkit.sampling.run"
        )
    return obj, name


def _prior(process: Process, n: int, seed: int) -> Tensor:
    """x_T ~ N(0, prior_std² I) in float64, the common start of every run compared."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g, dtype=F64) * process.prior_std()


def _sample(
    sampler: Any, denoise: DenoiseFn, process: Process, x_start: Tensor, steps: int | None, seed: int
) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return run(sampler, denoise, process, x_start.shape, steps=steps, generator=g, dtype=F64, x_start=x_start)


def reference_solution(denoise: DenoiseFn, process: Process, x_start: Tensor, tol: float = 1e-8) -> Tensor:
    """The probability-flow ODE solved from ``x_start`` at t_max with dopri5 at rtol = atol = ``tol``
    (the registered ``ode`` sampler), then the same jump to x̂_0 at t_min as every grid ends with."""
    import diffkit

    ode = diffkit.build("sampler", {"type": "ode", "rtol": tol, "atol": tol})
    return run(ode, denoise, process, x_start.shape, dtype=F64, x_start=x_start)


_REFERENCES: dict[tuple[int, int, int], tuple[Process, Tensor]] = {}
"""Reference solutions already computed, by process (kept alive here, so its id stays its
own), sample count and seed: a table's piecewise σ̃ costs the adaptive solver ≈ 8000
evaluations."""


def measured_order(steps: Sequence[int], errors: Sequence[float]) -> float:
    """p of e(N) ≈ C N^{−p}: the least-squares slope of −log e against log N."""
    x = torch.tensor([math.log(n) for n in steps], dtype=F64)
    y = torch.tensor([math.log(max(e, 1e-300)) for e in errors], dtype=F64)
    xc = x - x.mean()
    return float(-(xc * (y - y.mean())).sum() / (xc * xc).sum())


def is_deterministic(sampler: Any, denoise: DenoiseFn, process: Process, steps: int = 8) -> bool:
    """Whether two runs from the same state with different generators agree."""
    x = _prior(process, 16, 0)
    a = _sample(sampler, denoise, process, x, steps, 1)
    b = _sample(sampler, denoise, process, x, steps, 2)
    return bool(torch.equal(a, b))


def _objective_denoiser(objective: Any, denoise: DenoiseFn, process: Process) -> DenoiseFn:
    """The exact denoiser written as ``objective``'s output and read back through it:
    output = target(x̂_0, ε̂, x_t, t), then (x̂_0, ε̂) = denoised(output, x_t, t)."""

    def through(x: Tensor, t: Tensor) -> Denoised:
        d = denoise(x, t)
        out = objective.target(d.x0, d.eps, x, t, process)
        x0, eps = objective.denoised(out, x, t, process)
        return Denoised(x0, eps)

    return through


def _build_objective(name: str) -> Any:
    import diffkit

    kw: dict[str, Any] = {"sigma_data": 1.0} if name == "edm" else {}
    return diffkit.build("objective", name, **kw)


# -- the checks ---------------------------------------------------------------------------------
def certify_order(
    sampler: Any,
    name: str,
    pname: str,
    process: Process,
    steps: Sequence[int] = (16, 32, 64, 128),
    n: int = 32,
    seed: int = 0,
) -> Row:
    """The measured order p of a deterministic sampler on the mixture's probability-flow ODE."""
    denoise = MIXTURE.denoiser(process)
    x = _prior(process, n, seed)
    key = (id(process), n, seed)
    hit = _REFERENCES.get(key)
    if hit is not None and hit[0] is process:
        ref = hit[1]
    else:
        ref = reference_solution(denoise, process, x)
        _REFERENCES[key] = (process, ref)
    errors = []
    for k in steps:
        out = _sample(sampler, denoise, process, x, k, seed)
        errors.append(float((out - ref).square().sum(dim=1).mean().sqrt()))
    p = measured_order(steps, errors)
    pairs = [math.log2(e0 / e1) if e1 > 0 else math.inf for e0, e1 in zip(errors, errors[1:])]
    detail = "RMS error " + " ".join(f"{k}:{e:.2e}" for k, e in zip(steps, errors))
    detail += "; pairwise " + " ".join(f"{q:.2f}" for q in pairs)
    finite = all(math.isfinite(e) for e in errors)
    return Row(name, pname, "order", p, "> 0.5", finite and p > 0.5, detail)


def certify_law(
    sampler: Any,
    name: str,
    pname: str,
    process: Process,
    steps: int | None = None,
    n: int = 4000,
    k: float = 4.0,
    bias: float = 0.03,
    seed: int = 0,
) -> Row:
    """Mean, covariance (Gaussian data) and mixture weights (mixture data) of the samples
    against the exact ones. Each error is measured in standard errors of its estimator
    plus an allowance ``bias`` for the discretisation: |ê − e| ≤ k·SE + bias, with
    SE(mean_i) = √(Σ_ii/n), SE(Σ_ij) = √((Σ_ii Σ_jj + Σ_ij²)/n) (Gaussian fourth moments)
    and SE(w_k) = √(w_k(1 − w_k)/n). ``value`` is the largest |ê − e|/(k·SE + bias)."""
    if steps is None:
        # where the discretisation bias falls below the sampling error at n = 4000
        own = getattr(getattr(sampler, "params", None), "steps", None) or getattr(sampler, "default_steps", 0)
        steps = max(int(own), LAW_MIN_STEPS)
        if process.discrete:
            steps = min(steps, int(process.t_max) + 1)
    g = GAUSSIAN
    x = _prior(process, n, seed)
    out = _sample(sampler, g.denoiser(process), process, x, steps, seed + 1)
    mean = out.mean(0)
    cov = torch.cov(out.T)
    var = torch.diagonal(g.cov)
    se_mean = (var / n).sqrt()
    se_cov = ((var[:, None] * var[None, :] + g.cov.square()) / n).sqrt()
    r_mean = ((mean - g.mean).abs() / (k * se_mean + bias)).max()
    r_cov = ((cov - g.cov).abs() / (k * se_cov + bias)).max()
    # mixture weights: each sample assigned to its most probable component of the clean data
    m = MIXTURE
    out_m = _sample(sampler, m.denoiser(process), process, _prior(process, n, seed + 2), steps, seed + 3)
    labels = m.class_posterior(out_m, 1.0).argmax(dim=1)
    freq = torch.bincount(labels, minlength=m.num_components).to(F64) / n
    # the exact probability that a draw lands in each component's Bayes region, by a large exact draw
    ref, _ = m.sample(200_000, torch.Generator().manual_seed(seed + 4), dtype=F64)
    w = torch.bincount(m.class_posterior(ref, 1.0).argmax(dim=1), minlength=m.num_components).to(F64) / ref.shape[0]
    se_w = (w * (1 - w) / n).sqrt()
    r_w = ((freq - w).abs() / (k * se_w + bias)).max()
    value = float(torch.stack([r_mean, r_cov, r_w]).max())
    detail = (
        f"{steps} steps: |Δmean| {float((mean - g.mean).abs().max()):.3f},"
        f" |Δcov| {float((cov - g.cov).abs().max()):.3f},"
        f" |Δw| {float((freq - w).abs().max()):.3f} (n={n})"
    )
    ok = bool(math.isfinite(value) and value <= 1.0)
    return Row(name, pname, "law", value, f"≤ 1 ({k:g} SE + {bias:g})", ok, detail)


def certify_invariance(
    sampler: Any,
    name: str,
    pname: str,
    process: Process,
    objectives: Sequence[str] = OBJECTIVES,
    steps: int | None = 8,
    n: int = 32,
    tol: float = 1e-6,
    seed: int = 0,
) -> Row:
    """The largest difference, relative to the samples' scale, between the samples drawn
    with the exact denoiser written as each objective's output and with the oracle itself
    (same start, same generator seed, float64)."""
    denoise = MIXTURE.denoiser(process)
    x = _prior(process, n, seed)
    base = _sample(sampler, denoise, process, x, steps, seed + 1)
    scale = max(float(base.abs().max()), 1.0)
    worst, worst_name, errors = 0.0, "", []
    for obj_name in objectives:
        try:
            through = _objective_denoiser(_build_objective(obj_name), denoise, process)
            out = _sample(sampler, through, process, x, steps, seed + 1)
            diff = float((out - base).abs().max()) / scale
            if not math.isfinite(diff):
                diff = math.inf
        except Exception as exc:  # an objective that cannot be read on this process fails the row
            errors.append(f"{obj_name}: {type(exc).__name__}: {exc}")
            diff = math.inf
        if diff >= worst:
            worst, worst_name = diff, obj_name
    detail = f"worst {worst_name}" + ("; " + "; ".join(errors) if errors else "")
    return Row(name, pname, "invariance", worst, f"≤ {tol:g}", worst <= tol, detail)


def check_sampler(
    sampler_or_name: Any,
    processes: Sequence[str] | Mapping[str, Process] | None = None,
    *,
    report: bool = True,
    order_steps: Sequence[int] = (16, 32, 64, 128),
    law_steps: int | None = None,
    law_samples: int = 4000,
    invariance: bool = True,
    objectives: Sequence[str] = OBJECTIVES,
) -> CertificationReport:
    """Certify a step sampler (a registered name, a spec dict such as ``{"type": "heun",
    "s_churn": 40}``, or a sampler object) on ``processes`` (names, a name → process
    mapping, or ``None`` for :data:`DEFAULT_PROCESSES`): its measured order if it is
    deterministic, its law against the exact one if not, and its invariance under the
    parameterisation. Returns the :class:`CertificationReport`; ``report=True`` prints it."""
    obj, name = _build_sampler(sampler_or_name)
    if processes is None or not isinstance(processes, Mapping):
        procs = default_processes(processes)
    else:
        procs = dict(processes)
    rows: list[Row] = []
    for pname, process in procs.items():
        if is_deterministic(obj, MIXTURE.denoiser(process), process):
            rows.append(certify_order(obj, name, pname, process, order_steps))
        else:
            rows.append(certify_law(obj, name, pname, process, law_steps, law_samples))
        if invariance:
            rows.append(certify_invariance(obj, name, pname, process, objectives))
    result = CertificationReport(rows)
    if report:
        print(result)
    return result
