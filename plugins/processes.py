"""Noise processes in continuous time: ``vp``, ``sub-vp``, ``ve``, ``edm`` and ``rectified-flow``.

Each says α(t) and σ(t) of x_t = α(t)·x_0 + σ(t)·ε, what the network is conditioned on,
how training draws t, and its samplers' default grid; everything else (λ, σ̃, the SDE,
the probability-flow ODE) is derived in :class:`diffkit.process.Process`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from diffkit import BuildContext, Component, Params, hookimpl
from diffkit.process import Process, log_normal_sigma


def _f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _below(lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    """Refuse a range whose lower end is not below its upper end, naming both fields."""
    if lo >= hi:
        raise ValueError(f"{lo_name} ({lo}) must be below {hi_name} ({hi})")


# -- variance preserving ------------------------------------------------------------------
class VPParams(Params):
    """The variance-preserving SDE dx = −½β(t)x dt + √β(t) dw, β linear in t ∈ [0, 1]."""

    beta_min: float = Field(0.1, ge=1e-3, le=100, description="β(0), the noise rate at the clean end (Song et al. 2021: 0.1).")
    beta_max: float = Field(20.0, ge=1e-3, le=1000, description="β(1), the noise rate at the noisy end (Song et al. 2021: 20).")
    t_min: float = Field(1e-3, ge=1e-6, lt=0.5, description="The smallest t sampled and trained on (ε of Song et al. 2021).")

    @model_validator(mode="after")
    def _ordered(self) -> VPParams:
        _below("beta_min", self.beta_min, "beta_max", self.beta_max)
        return self


class VP(Process):
    """α(t) = exp(−¼t²(β_max − β_min) − ½tβ_min), σ = √(1 − α²) (Song et al. 2021, Eq. 33).

    The network sees 999·t, the integer-timestep range of a T = 1000 table."""

    conditioning_scale = 999.0

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> None:
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        la = self.log_alpha(t)
        return la.exp(), (-torch.expm1(2.0 * la)).clamp_min(0).sqrt()

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α' = α·(−½tΔ − ½β_min) and σ' = −αα'/σ (Δ = β_max − β_min)."""
        t = _f64(t)
        a, s = self.alpha_sigma(t)
        da = a * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)
        return da, -a * da / s

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        """Solve ¼Δt² + ½β_min·t = ½ log(1 + σ̃²) for t (Δ = β_max − β_min)."""
        s = _f64(sigma_tilde)
        c = 0.5 * torch.log1p(s * s)
        d = self.beta_max - self.beta_min
        t = (-0.5 * self.beta_min + torch.sqrt(0.25 * self.beta_min**2 + d * c)) / (0.5 * d)
        return torch.where(s <= 0, torch.zeros_like(t), t.clamp(self.t_min, self.t_max))


class SubVP(VP):
    """α as ``vp``, σ(t) = 1 − α(t)²: the sub-VP SDE, whose variance stays below the VP one
    (Song et al. 2021, Eq. 34)."""

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        la = self.log_alpha(t)
        return la.exp(), -torch.expm1(2.0 * la)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α' as ``vp``'s, σ' = −2αα'."""
        t = _f64(t)
        a = self.log_alpha(t).exp()
        da = a * (-0.5 * t * (self.beta_max - self.beta_min) - 0.5 * self.beta_min)
        return da, -2.0 * a * da

    t_of_sigma_tilde = Process.t_of_sigma_tilde


# -- variance exploding --------------------------------------------------------------------
class VEParams(Params):
    """σ(t) = σ_min (σ_max/σ_min)^t, α = 1: the noise levels of NCSN (Song & Ermon 2019, 2020)."""

    sigma_min: float = Field(0.01, ge=1e-5, le=1e3, description="The smallest noise level (Song & Ermon 2020: 0.01).")
    sigma_max: float | None = Field(
        None,
        ge=1e-4,
        le=1e5,
        description="The largest noise level; null takes the largest distance between two training points"
        " (Song & Ermon 2020, Technique 1), so the prior covers the data.",
    )
    t_min: float = Field(1e-5, ge=0, lt=0.5, description="The smallest t sampled and trained on.")

    @model_validator(mode="after")
    def _ordered(self) -> VEParams:
        if self.sigma_max is not None:
            _below("sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        return self


class VE(Process):
    """α = 1, σ(t) = σ_min (σ_max/σ_min)^t for t ∈ [t_min, 1]; clean data at t = −1
    (Song et al. 2021, Eq. 31). The network sees 999·t and x_t/√(1 + σ²)."""

    t_clean = -1.0
    conditioning_scale = 999.0

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5) -> None:
        _below("sigma_min", sigma_min, "sigma_max", sigma_max)
        self.sigma_min, self.sigma_max, self.t_min = sigma_min, sigma_max, t_min

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        s = self.sigma_min * (self.sigma_max / self.sigma_min) ** t.clamp_min(0)
        return torch.ones_like(t), torch.where(t < 0, torch.zeros_like(s), s)

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        s = _f64(sigma_tilde)
        t = torch.log(s.clamp_min(1e-300) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)
        return torch.where(s <= 0, torch.full_like(t, self.t_clean), t.clamp(self.t_min, self.t_max))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """α' = 0, σ' = σ·ln(σ_max/σ_min)."""
        t = _f64(t)
        _, s = self.alpha_sigma(t)
        return torch.zeros_like(t), s * math.log(self.sigma_max / self.sigma_min)

    def input_scale(self, t: Tensor) -> Tensor:
        _, s = self.alpha_sigma(t)
        return torch.rsqrt(1.0 + s * s)


# -- EDM --------------------------------------------------------------------------------------
class EDMParams(Params):
    """σ(t) = t, α = 1 with the network's input preconditioning of Karras et al. 2022 (Table 1)."""

    sigma_min: float = Field(0.002, ge=1e-5, le=1e3, description="The smallest noise level sampled (Karras et al. 2022: 0.002).")
    sigma_max: float | None = Field(
        None,
        ge=1e-4,
        le=1e5,
        description="The largest noise level, where sampling starts. null takes Karras et al.'s 80 for images"
        " in [−1, 1] and, for point data, the largest distance between two training points in model space"
        " (Song & Ermon 2020, Technique 1, as ve's sigma_max: null); 80 where the data is not known.",
    )
    sigma_data: float | None = Field(
        None,
        ge=1e-3,
        le=1e3,
        description="The data's standard deviation σ_data; null takes 0.5 for images in [−1, 1] (Karras et"
        " al. 2022) and 1 for points, which the pipeline standardises.",
    )
    rho: float = Field(7.0, ge=1, le=100, description="ρ of the default karras grid (Karras et al. 2022, Eq. 5).")
    p_mean: float = Field(-1.2, ge=-10, le=10, description="Mean of ln σ when training draws σ (Table 1: −1.2).")
    p_std: float = Field(1.2, gt=0, le=10, description="Standard deviation of ln σ when training draws σ (Table 1: 1.2).")

    @model_validator(mode="after")
    def _ordered(self) -> EDMParams:
        if self.sigma_max is not None:
            _below("sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        return self


class EDM(Process):
    """x_t = x_0 + t·ε, t = σ ∈ [σ_min, σ_max] (Karras et al. 2022, Sec. 2 with s = 1, σ(t) = t).

    The network sees c_in·x_t with c_in = 1/√(σ² + σ_data²) and c_noise = ¼ ln σ (Table 1),
    the latter times 1000 so that a sinusoidal embedding built for timesteps 0–1000
    resolves it. Training draws ln σ ~ N(P_mean, P_std²); samplers default to the karras grid."""

    default_grid = "karras"

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
    ) -> None:
        self.t_min, self.t_max = sigma_min, sigma_max
        self.sigma_data, self.rho, self.p_mean, self.p_std = sigma_data, rho, p_mean, p_std

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        return torch.ones_like(t), t.clamp_min(0)

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        s = _f64(sigma_tilde)
        return torch.where(s <= 0, torch.zeros_like(s), s.clamp(self.t_min, self.t_max))

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        return torch.zeros_like(t), torch.ones_like(t)

    def conditioning(self, t: Tensor) -> Tensor:
        return (250.0 * _f64(t).clamp_min(1e-20).log()).float()

    def input_scale(self, t: Tensor) -> Tensor:
        s = _f64(t)
        return torch.rsqrt(s * s + self.sigma_data**2)

    def sample_t(self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        return log_normal_sigma(batch, self.p_mean, self.p_std, generator=generator, device=device)

    def prior_std(self) -> float:
        """√(σ_max² + σ_data²): the standard deviation of p(x; σ_max) for data of variance
        σ_data² (the c_in of Karras et al. 2022, Table 1), which Alg. 1, line 1 rounds to σ_max
        as σ_max = 80 ≫ σ_data. Where σ_max is the data's diameter (point data) the rounding
        would start the flow on too narrow a prior and bias every sampler the same way, however
        many steps it takes: with the exact denoiser of a mixture along two moons, Heun at 18
        steps lands 1.37× exact draws' distance with σ_max, 1.18× with this."""
        return math.sqrt(self.t_max**2 + self.sigma_data**2)

    def grid(self, steps, spacing=None, *, rho=None, start=None):  # type: ignore[override]
        return super().grid(steps, spacing, rho=self.rho if rho is None else rho, start=start)


# -- rectified flow ----------------------------------------------------------------------------
class RectifiedFlowParams(Params):
    """The straight path x_t = (1 − t)·x_0 + t·ε (Liu et al. 2022; Lipman et al. 2023)."""

    t_max: float = Field(
        0.999,
        gt=0.5,
        le=0.99999,
        description="Where sampling starts; below 1 so that σ/α stays finite for samplers that work in σ/α.",
    )
    t_sampling: Literal["logit-normal", "uniform"] = Field(
        "logit-normal",
        description="How training draws t: 'logit-normal', logit(t) ~ N(logit_mean, logit_std²) (Esser et al."
        " 2024, Eq. 19) with a uniform share (uniform_fraction), or 'uniform' on [0, t_max] (Liu et al. 2022).",
    )
    logit_mean: float = Field(0.0, ge=-5, le=5, description="Mean of logit(t) when t_sampling is logit-normal.")
    logit_std: float = Field(1.0, gt=0, le=5, description="Standard deviation of logit(t) when t_sampling is logit-normal.")
    uniform_fraction: float = Field(
        0.2,
        ge=0,
        le=1,
        description="With t_sampling logit-normal, the share of t drawn uniformly instead, so that the ends of the"
        " path, which logit-normal t almost never draws, stay trained.",
    )

    saved_defaults: ClassVar[dict[str, Any]] = {"t_sampling": "uniform"}  # runs saved before t_sampling existed trained on uniform t


class RectifiedFlow(Process):
    """α(t) = 1 − t, σ(t) = t on [0, t_max] (Liu et al. 2022, Eq. 1; Lipman et al. 2023, Eq. 20
    with σ_min = 0). The network sees 999·t.

    Training draws t by default from a mixture: with probability 1 − f logit-normally,
    π(t) = φ((logit t − m)/s) / (s·t(1 − t)) (Esser et al. 2024, Eq. 19, m = 0, s = 1), more
    of the middle of the path, where the velocity is hardest to predict (their argument);
    with probability f = 0.2 uniformly, so that the ends stay trained. Logit-normal t alone
    leaves the clean end almost untrained (at t = 0.02 the network's x̂_0 error was 16× that of
    uniform t on the moons) and Heun's steps, which lean on it, lose; measured in
    benchmarks/README.md ("Rectified flow: how training draws t")."""

    conditioning_scale = 999.0

    def __init__(
        self,
        t_max: float = 0.999,
        t_sampling: str = "logit-normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        uniform_fraction: float = 0.2,
    ) -> None:
        if t_sampling not in ("logit-normal", "uniform"):
            raise ValueError(f"t_sampling must be 'logit-normal' or 'uniform', got {t_sampling!r}")
        self.t_max = t_max
        self.t_sampling, self.logit_mean, self.logit_std = t_sampling, float(logit_mean), float(logit_std)
        self.uniform_fraction = float(uniform_fraction)

    def sample_t(self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
        if self.t_sampling == "uniform":
            return super().sample_t(batch, generator=generator, device=device)
        z = torch.randn(batch, generator=generator, device=device, dtype=torch.float64)
        t = torch.sigmoid(self.logit_mean + self.logit_std * z).clamp(max=self.t_max)
        if self.uniform_fraction == 0:
            return t
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        pick = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) < self.uniform_fraction
        return torch.where(pick, u * self.t_max, t)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        return 1.0 - t, t

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = _f64(t)
        return -torch.ones_like(t), torch.ones_like(t)

    def t_of_sigma_tilde(self, sigma_tilde: Tensor) -> Tensor:
        s = _f64(sigma_tilde)
        return (s / (1.0 + s)).clamp(0.0, self.t_max)


# -- factories ----------------------------------------------------------------------------------
def vp(params: VPParams, ctx: BuildContext) -> VP:
    return VP(params.beta_min, params.beta_max, params.t_min)


def sub_vp(params: VPParams, ctx: BuildContext) -> SubVP:
    return SubVP(params.beta_min, params.beta_max, params.t_min)


def diameter_sigma_max(ctx: BuildContext, sigma_min: float) -> float | None:
    """Song & Ermon 2020, Technique 1: σ_max as large as the largest distance between two
    training points (at least 2σ_min), so the prior covers the data; ``None`` where unknown."""
    return None if ctx.data_diameter is None else max(float(ctx.data_diameter), 2.0 * sigma_min)


def ve(params: VEParams, ctx: BuildContext) -> VE:
    sigma_max = params.sigma_max if params.sigma_max is not None else diameter_sigma_max(ctx, params.sigma_min)
    if sigma_max is None:
        raise ValueError(
            "sigma_max: null takes the largest distance between training points, which is not known"
            " here; give sigma_max a number"
        )
    return VE(params.sigma_min, sigma_max, params.t_min)


EDM_SIGMA_MAX = 80.0
"""Karras et al. 2022's σ_max (Table 1), chosen for CIFAR-10 in [−1, 1]."""


def edm_sigma_max(params: EDMParams, ctx: BuildContext) -> float:
    """σ_max as given; for ``null`` on point data the data's diameter, else 80.

    Where sampling starts only (training draws ln σ ~ N(P_mean, P_std²) whatever it is).
    For point data, standardised to unit variance per coordinate, 80 is twenty times the
    diameter of two moons: Heun's 18-step karras grid then spends 11 of its steps above
    σ = 1, where the data is one blur, and its first steps ask the network about noise
    levels training almost never drew. σ_max = the largest distance between two training
    points keeps the prior N(0, σ_max² I) covering the data (Song & Ermon 2020, Technique
    1) and, measured on examples/moons-edm.yaml (benchmarks/README.md), brings Heun at 18
    steps from 1.73× to 1.20× the noise floor in sliced W2 at 5,000 samples."""
    if params.sigma_max is not None:
        return params.sigma_max
    diameter = diameter_sigma_max(ctx, params.sigma_min) if ctx.data_kind == "points" else None
    return EDM_SIGMA_MAX if diameter is None else diameter


def edm(params: EDMParams, ctx: BuildContext) -> EDM:
    sigma_data = params.sigma_data
    if sigma_data is None:
        sigma_data = 0.5 if ctx.data_kind == "images" else 1.0
    return EDM(params.sigma_min, edm_sigma_max(params, ctx), sigma_data, params.rho, params.p_mean, params.p_std)


def rectified_flow(params: RectifiedFlowParams, ctx: BuildContext) -> RectifiedFlow:
    return RectifiedFlow(params.t_max, params.t_sampling, params.logit_mean, params.logit_std, params.uniform_fraction)


@hookimpl
def diffkit_schedules() -> list[Component]:
    return [
        Component("vp", vp, VPParams, "Continuous variance-preserving SDE (Song et al. 2021)."),
        Component("sub-vp", sub_vp, VPParams, "Continuous sub-VP SDE (Song et al. 2021)."),
        Component("ve", ve, VEParams, "Variance exploding, geometric σ (NCSN; Song & Ermon 2019)."),
        Component("edm", edm, EDMParams, "σ(t) = t with EDM preconditioning (Karras et al. 2022)."),
        Component("rectified-flow", rectified_flow, RectifiedFlowParams, "x_t = (1 − t)x_0 + tε (Liu et al. 2022)."),
    ]
