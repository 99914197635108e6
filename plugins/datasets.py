"""Two-dimensional datasets: ``moons``, ``swiss-roll`` and ``gaussians`` (labelled)."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from diffkit import BuildContext, Component, Params, Seed, TensorData, hookimpl


class _PointsParams(Params):
    n: int = Field(20_000, ge=1, le=10_000_000, description="Number of points drawn.")
    seed: Seed | None = Field(None, description="Seed of the draw; null uses the spec's seed.")


class MoonsParams(_PointsParams):
    """Two interleaving half circles."""

    noise: float = Field(0.05, ge=0, le=10, description="Standard deviation of Gaussian noise added to each point.")


class SwissRollParams(_PointsParams):
    """A 2-D spiral: (t cos t, t sin t)/5 for t uniform in [1.5π, 4.5π]."""

    noise: float = Field(0.05, ge=0, le=10, description="Standard deviation of Gaussian noise added to each point.")


class GaussiansParams(_PointsParams):
    """Equal-weight isotropic Gaussians on a circle; the label is the component index."""

    components: int = Field(8, ge=1, le=1000, description="Number of Gaussians.")
    radius: float = Field(2.0, gt=0, description="Radius of the circle the means lie on.")
    std: float = Field(0.1, gt=0, description="Standard deviation of each Gaussian.")


def _generator(params: _PointsParams, ctx: BuildContext) -> torch.Generator:
    return torch.Generator().manual_seed(ctx.seed if params.seed is None else params.seed)


def moons(params: MoonsParams, ctx: BuildContext) -> TensorData:
    g = _generator(params, ctx)
    upper = torch.rand(params.n, generator=g) < 0.5
    theta = math.pi * torch.rand(params.n, generator=g)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], dim=1) + params.noise * torch.randn(params.n, 2, generator=g)
    return TensorData(pts, upper.long(), num_classes=None)


def swiss_roll(params: SwissRollParams, ctx: BuildContext) -> TensorData:
    g = _generator(params, ctx)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(params.n, generator=g))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 5
    return TensorData(pts + params.noise * torch.randn(params.n, 2, generator=g))


def gaussians(params: GaussiansParams, ctx: BuildContext) -> TensorData:
    g = _generator(params, ctx)
    k = torch.randint(0, params.components, (params.n,), generator=g)
    angle = 2 * math.pi * k.double() / params.components
    means = params.radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    pts = means + params.std * torch.randn(params.n, 2, generator=g, dtype=torch.float64)
    return TensorData(pts.float(), k, num_classes=params.components)


def _two_d(params: Params) -> tuple[int, ...]:
    return (2,)


@hookimpl
def diffkit_datasets() -> list[Component]:
    return [
        Component("moons", moons, MoonsParams, "Two interleaving half circles.", data_shape=_two_d),
        Component("swiss-roll", swiss_roll, SwissRollParams, "A 2-D Swiss roll (spiral).", data_shape=_two_d),
        Component("gaussians", gaussians, GaussiansParams, "Labelled Gaussians on a circle.", data_shape=_two_d),
    ]
