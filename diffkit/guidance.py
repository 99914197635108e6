"""Guidance: the one place where the model's prediction is wrapped before a sampler sees it.

A spec's ``guidance:`` section names a method (a plugin of kind ``guidance``); the
pipeline hands :func:`guide` the model's noise prediction under any condition, and
every sampler is driven by what it returns, without knowing it is guided::

    sampler: {type: dpm-solver, steps: 20}
    guidance: {type: classifier-free, scale: 2.0, rescale: 0.7, interval: [0.3, 5.0]}

**One form for every method.** A method gives two terms at (x_t, t, y): the prediction
it starts from, ε_base, and a direction Δ; the guided prediction is

    ε̃ = ε_base + w(t) · Δ

with ``scale`` w (Dhariwal & Nichol 2021's γ, Ho & Salimans 2022's w). Classifier-free
guidance (Ho & Salimans 2022, Eq. 6) has ε_base = ε(x_t, y), Δ = ε(x_t, y) − ε(x_t, ∅);
classifier guidance (Dhariwal & Nichol 2021, Alg. 2) ε_base = ε(x_t), Δ = −σ_t ∇ log p_φ(y | x_t);
autoguidance (Karras et al. 2024, Eq. 1 with w ← 1 + w) ε_base = ε_1(x_t), Δ = ε_1 − ε_0 of a
weaker guide ε_0; a label-free guidance (Bansal et al. 2023, Eq. 6) Δ = −σ_t ∇_{x_t} r(x̂_0(x_t)).

**Options every method takes** (:class:`GuidanceParams`), each meaning the same under
every sampler and number of steps, because each is written in the noise level and not
in the step index:

- ``interval: [lo, hi]`` (Kynkäänniemi et al. 2024, Eq. 6): guidance acts only where the
  noise level lies in [lo, hi], in σ̃ = σ/α (EDM's σ; ``interval_in: sigma``) or in
  λ = log α²/σ² (``interval_in: lambda``); elsewhere the prediction is ε_base, bit for bit,
  and Δ is not computed.
- ``schedule``: w(t) = w · s(u), u = (λ_max − λ(t))/(λ_max − λ_min) ∈ [0, 1] the position of
  the noise level between the process's least (u = 0) and most (u = 1) noisy time, in λ:
  ``constant`` s = 1; ``linear`` s = 2(1 − u); ``cosine`` s = 1 + cos(π u) (both average 1
  over u, as the schedules of Wang et al. 2024, Sec. 3, written in the noise level).
- ``rescale: φ`` (Lin et al. 2024, Sec. 3.4, Eq. 15–16): ε_r = ε̃ · std(ε_base)/std(ε̃),
  per sample, and ε_final = φ ε_r + (1 − φ) ε̃.

**Components with state** (:class:`StatefulPart`): a method may hold networks of its own
(a noise-aware classifier, a guide model). The pipeline trains them in its training run
after the denoiser (``fit``), saves each as ``<name>.safetensors`` in the run directory
and loads it back; :meth:`GuidanceMethod.parts` lists them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from diffkit.interfaces import CondPredict, Predict
from diffkit.process import Process, expand_like
from diffkit.registry import Params

__all__ = [
    "GuidanceParams",
    "GuidanceMethod",
    "GuidedModel",
    "RewardGuidance",
    "StatefulPart",
    "guide",
    "guidance_weight",
    "in_interval",
    "rescale",
    "upgrade_guided_sampler",
    "parse_interval",
    "check_guidance_scale",
]

Space = Literal["sigma", "lambda"]
ScheduleName = Literal["constant", "linear", "cosine"]


class GuidanceParams(Params):
    """The options every guidance method takes; a method's Params subclass this."""

    scale: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="w of ε̃ = ε_base + w·Δ: 0 is the unguided model, bit for bit (the method's page says what"
        " its w means: classifier guidance's γ, classifier-free guidance's w, autoguidance's w = their w − 1).",
    )
    rescale: float = Field(
        0.0,
        ge=0,
        le=1,
        description="φ of rescaled guidance (Lin et al. 2024, Sec. 3.4): 0 leaves ε̃ as is; 1 rescales it per"
        " sample to the standard deviation of ε_base (the conditional prediction); between, a mix.",
    )
    interval: tuple[float, float] | None = Field(
        None,
        description="[lo, hi]: guide only where the noise level lies in this range (Kynkäänniemi et al. 2024), in"
        " the units of interval_in; null guides at every level. The same for every sampler and step count.",
    )
    interval_in: Space = Field(
        "sigma",
        description="The units of interval: 'sigma' (σ̃ = σ/α, the noise level of EDM) or 'lambda' (log-SNR"
        " λ = log α²/σ²).",
    )
    schedule: ScheduleName = Field(
        "constant",
        description="How the scale varies with the noise level u ∈ [0, 1] (0 least noisy, 1 most, in log-SNR):"
        " 'constant' w; 'linear' 2w(1 − u); 'cosine' w(1 + cos πu). The last two average w.",
    )

    @field_validator("interval")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] <= v[1]:
            raise ValueError(f"interval must be [lo, hi] with lo ≤ hi, got [{v[0]}, {v[1]}]")
        return v


@dataclass(frozen=True)
class GuidedModel:
    """What a guidance method sees of the model.

    ``predict(x_t, t, cond) -> ε̂`` under any labels (−1 or ``None``: no label; an
    unconditional network ignores them); ``process`` the forward process; ``with_network(net)``
    the same prediction from another network of the same kind (a guide model), where the
    pipeline can give one (``None`` for a bare prediction function)."""

    predict: CondPredict
    process: Process
    with_network: Callable[[nn.Module], CondPredict] | None = None
    to_data: Callable[[Tensor], Tensor] | None = None
    """Model space → the data's own coordinates (the pipeline's standardisation undone)."""


@runtime_checkable
class StatefulPart(Protocol):
    """A network of a component that the pipeline trains, saves and loads.

    - ``name``: its file in the run directory is ``<name>.safetensors``, its record in
      ``meta.json`` ``parts.<name>``;
    - ``module``: the network (its ``state_dict`` is what is saved);
    - ``steps_trained``: 0 until trained or loaded;
    - ``fit(pipeline, dataset, config, device, out, progress)``: train it (after the
      denoiser); returns a report (its ``str`` is printed) and is deterministic given the
      pipeline's seed, so a resumed run ends with the same weights;
    - ``info()`` / ``load_info(info)``: the JSON record saved beside the weights.
    """

    name: str
    module: nn.Module
    steps_trained: int

    def fit(self, pipeline: Any, dataset: Any, config: Any, device: torch.device, out: Any, progress: bool) -> Any: ...

    def info(self) -> dict[str, Any]: ...

    def load_info(self, info: Mapping[str, Any]) -> None: ...


class GuidanceMethod(ABC):
    """A guidance method: :meth:`terms` gives ε_base and Δ; :func:`guide` does the rest.

    Class attributes say what it needs: ``needs_labels`` (it steers toward asked labels;
    without labels the pipeline samples unguided), ``requires_conditional_denoiser``
    (ε(x, y) and ε(x, ∅) from one network)."""

    needs_labels: bool = True
    requires_conditional_denoiser: bool = False

    def __init__(self, params: GuidanceParams) -> None:
        self.params = params

    @property
    def scale(self) -> float:
        return self.params.scale

    def parts(self) -> list[StatefulPart]:
        """The networks of this method that the pipeline trains, saves and loads."""
        return []

    def plain(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """ε_base alone: the prediction at scale 0 and outside the interval."""
        return model.predict(x_t, t, cond)

    @abstractmethod
    def terms(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """(ε_base, Δ) at (x_t, t) under labels ``cond``; ε̃ = ε_base + w Δ."""

    def check_ready(self, scale: float) -> str | None:
        """Why this method cannot guide at ``scale`` now (an untrained part), or ``None``."""
        for part in self.parts():
            if scale != 0 and part.steps_trained == 0:
                return (
                    f"{type(self).__name__} needs its {part.name} trained, and this model has none: train with this"
                    f" guidance in the spec so that fit() trains it (diffkit train saves it as {part.name}.safetensors)"
                )
        return None

    def with_options(self, **options: Any) -> GuidanceMethod:
        """A shallow copy with some options (scale, rescale, interval, …) replaced; ``None`` keeps one."""
        given = {k: v for k, v in options.items() if v is not None}
        if not given:
            return self
        from pydantic import ValidationError

        from diffkit.errors import DiffkitError

        try:
            params = self.params.model_validate({**self.params.model_dump(), **given})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise DiffkitError(f"the guidance option {where} ({given.get(where, '')!r}): {first['msg']}") from None
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.params = params
        return out

    def wrap(self, predict: CondPredict, schedule: Process, cond: Tensor | None, *, scale: float | None = None) -> Predict:
        """``predict(x_t, t) -> ε̃`` from a bare ``predict(x_t, t, cond)`` (the form of
        0.1's ``Guidance.wrap``; :func:`guide` with :class:`GuidedModel` is the full one)."""
        return guide(self, GuidedModel(predict, schedule), cond, scale=scale)


class RewardGuidance(GuidanceMethod):
    """Guidance without labels by a differentiable function of the denoised estimate
    (forward universal guidance, Bansal et al. 2023, Eq. 6):

        ε̃ = ε̂(x_t) − w σ_t ∇_{x_t} r(x̂_0(x_t)),  x̂_0 = (x_t − σ_t ε̂(x_t))/α_t,

    where r = −ℓ is any differentiable score of a sample in the data's coordinates
    ``[batch, ...] -> [batch]`` (a log-likelihood of a region, a constraint, a reward). The
    gradient runs back through the network; nothing accumulates in its weights. A plugin
    provides one by registering a guidance component whose factory returns
    ``RewardGuidance(params, reward)``, with params a :class:`GuidanceParams` (subclass)."""

    needs_labels = False

    def __init__(self, params: GuidanceParams, reward: Callable[[Tensor], Tensor]) -> None:
        super().__init__(params)
        self.reward = reward

    def terms(self, model: GuidedModel, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        eps = model.predict(x_t, t, cond)
        a, s = model.process.coefficients(t, x_t)
        with torch.inference_mode(False), torch.enable_grad():
            x = x_t.detach().clone().requires_grad_(True)
            tt = t.clone()
            c = None if cond is None else cond.clone()
            x0 = (x - s.to(x.dtype).clone() * model.predict(x, tt, c)) / a.to(x.dtype).clone()
            data = model.to_data(x0) if model.to_data is not None else x0
            (grad,) = torch.autograd.grad(self.reward(data).sum(), x)
        return eps, -(grad.detach().to(x_t.dtype) * s.to(x_t.dtype))


# -- the options, in the noise level -------------------------------------------------------------
def _log_snr(process: Process, t: Tensor) -> Tensor:
    return process.log_snr(torch.as_tensor(t).double().cpu())


def _lambda_range(process: Process) -> tuple[float, float]:
    """(λ_min, λ_max): the log-SNR at the process's most and least noisy times."""
    lam = process.log_snr(torch.tensor([float(process.t_max), float(process.t_min)], dtype=torch.float64))
    lo, hi = float(lam[0]), float(lam[1])
    if not math.isfinite(hi):  # σ = 0 at t_min: take a time just after it
        hi = float(process.log_snr(torch.tensor([process.t_min + 1e-3 * (process.t_max - process.t_min)])))
    return lo, hi


def guidance_weight(params: GuidanceParams, process: Process, t: Tensor, scale: float) -> Tensor:
    """w(t) per row of ``t`` (float64, on the CPU), from ``scale`` and ``params.schedule``."""
    t = torch.as_tensor(t)
    if params.schedule == "constant":
        return torch.full(t.shape, float(scale), dtype=torch.float64)
    lo, hi = _lambda_range(process)
    u = ((hi - _log_snr(process, t)) / (hi - lo)).clamp(0.0, 1.0)
    s = 2.0 * (1.0 - u) if params.schedule == "linear" else 1.0 + torch.cos(math.pi * u)
    return float(scale) * s


def in_interval(params: GuidanceParams, process: Process, t: Tensor) -> Tensor | None:
    """Rows of ``t`` whose noise level lies in ``params.interval`` (bool, CPU); ``None``: all."""
    if params.interval is None:
        return None
    lo, hi = params.interval
    t = torch.as_tensor(t).double().cpu()
    level = process.sigma_tilde(t) if params.interval_in == "sigma" else process.log_snr(t)
    return (level >= lo) & (level <= hi)


def rescale(guided: Tensor, base: Tensor, phi: float) -> Tensor:
    """Rescaled guidance (Lin et al. 2024, Eq. 15–16): per sample,
    x_rescaled = x_cfg · std(x_pos)/std(x_cfg), then φ x_rescaled + (1 − φ) x_cfg."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_base = base.double().std(dim=dims, keepdim=True)
    std_guided = guided.double().std(dim=dims, keepdim=True)
    ratio = torch.where(std_guided > 0, std_base / std_guided.clamp_min(1e-30), torch.ones_like(std_guided))
    rescaled = guided.double() * ratio
    return (phi * rescaled + (1.0 - phi) * guided.double()).to(guided.dtype)


def guide(
    method: GuidanceMethod,
    model: GuidedModel,
    cond: Tensor | None,
    *,
    scale: float | None = None,
    interval: tuple[float, float] | None = None,
    rescale_phi: float | None = None,
) -> Predict:
    """``predict(x_t, t) -> ε̃``: the model's prediction guided by ``method`` toward
    ``cond`` (labels ``[batch]``; ``None`` for a label-free method). ``scale``, ``interval``
    and ``rescale_phi`` override the method's own options.

    Scale 0 returns ``model.predict(x_t, t, cond)`` itself; rows outside the interval get
    it too, bit for bit, and where every row is outside, Δ is not computed at all.

    A guidance of plugin API 1 (an object with only ``wrap(predict, schedule, cond, *, scale)``)
    is called through its ``wrap``; it takes no interval or rescale."""
    if not isinstance(method, GuidanceMethod):
        if interval is not None or rescale_phi is not None:
            from diffkit.errors import DiffkitError

            raise DiffkitError(
                f"the guidance {type(method).__name__} is written for plugin API 1 (a wrap method), which takes no"
                " interval or rescale; sample without them, or write it as a diffkit.guidance.GuidanceMethod"
            )
        return method.wrap(model.predict, model.process, cond, scale=scale)
    m = method.with_options(scale=scale, interval=interval, rescale=rescale_phi)
    params, process = m.params, model.process
    if params.scale == 0:
        return lambda x_t, t: m.plain(model, x_t, t, cond)

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        t_rows = t if t.ndim else t.expand(x_t.shape[0])
        inside = in_interval(params, process, t_rows)
        if inside is not None and not bool(inside.any()):
            return m.plain(model, x_t, t, cond)
        base, delta = m.terms(model, x_t, t, cond)
        w = guidance_weight(params, process, t_rows, params.scale)
        eps = base + expand_like(w.to(device=x_t.device, dtype=x_t.dtype), delta) * delta
        eps = rescale(eps, base, params.rescale)
        if inside is not None and not bool(inside.all()):
            plain = m.plain(model, x_t, t, cond)
            eps = torch.where(expand_like(inside.to(x_t.device), eps), eps, plain)
        return eps

    return guided


def check_guidance_scale(scale: float | None) -> None:
    """Refuse a guidance scale that is not a finite number ≥ 0 (``None``: the spec's)."""
    from diffkit.errors import DiffkitError

    if scale is not None and not (math.isfinite(scale) and scale >= 0):
        raise DiffkitError(
            f"the guidance scale must be a finite number of at least 0, got {scale}; 0 samples without guidance"
        )


def parse_interval(text: str) -> tuple[float, float]:
    """``"LO,HI"`` as two finite numbers with LO ≤ HI; ValueError saying what is wrong."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"the guidance interval takes two numbers LO,HI (e.g. 0.3,5), got '{text}'") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"the guidance interval must be two finite numbers with LO ≤ HI, got '{text}'")
    return lo, hi


# -- the 0.1 form: sampler: {type: guided, base: …, guidance: …} ----------------------------------
GUIDED_NOTICE = (
    "the spec's 'sampler: {{type: guided, ...}}' is read as 'sampler: {base}' with a top-level"
    " 'guidance: {{type: {method}, ...}}'; write it that way (see docs/guidance.md)"
)


def upgrade_guided_sampler(data: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A spec whose sampler is 0.1's ``guided`` sampler, rewritten with its base as the
    sampler and its guidance as the top-level ``guidance`` section, and a one-line notice;
    any other spec unchanged (and ``None``)."""
    sampler = data.get("sampler")
    if not (isinstance(sampler, Mapping) and sampler.get("type") == "guided") or "guidance" in data:
        return dict(data), None
    base = sampler.get("base", {"type": "ddpm"})
    base = {"type": base} if isinstance(base, str) else base
    guidance = sampler.get("guidance")
    rest = {k: v for k, v in sampler.items() if k not in ("type", "base", "guidance")}
    out = dict(data)
    # keys the guided sampler never had stay on the sampler, where validation names them
    out["sampler"] = {**base, **rest} if isinstance(base, Mapping) else base
    out["guidance"] = {} if guidance is None else guidance  # none given: validation asks for its type
    name = base.get("type") if isinstance(base, Mapping) else base
    method = guidance if isinstance(guidance, str) else guidance.get("type") if isinstance(guidance, Mapping) else "?"
    return out, GUIDED_NOTICE.format(base=f"{{type: {name}, ...}}", method=method)

