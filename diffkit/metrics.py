"""Distances between sample sets."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point clouds ``[N, D]``.

    SW₂(x, y)² = E_θ W₂²(θᵀx, θᵀy) over directions θ uniform on the sphere; in one
    dimension W₂ between empirical measures of equal size pairs sorted values
    (Rabin et al. 2011; Bonneel et al. 2015). Estimated with ``projections`` random
    directions drawn from ``seed``.
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs point clouds of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = torch.sort(x.cpu() @ theta, dim=0).values
    py = torch.sort(y.cpu() @ theta, dim=0).values
    return (px - py).square().mean().sqrt().item()
