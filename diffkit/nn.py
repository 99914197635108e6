"""Building blocks shared by denoiser networks (core and third-party alike)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["timestep_embedding", "SinusoidalEmbedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (integer or real) timesteps, shape ``[B] -> [B, dim]``
    (Vaswani et al. 2017, Sec. 3.5, as used by Ho et al. 2020, Appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = torch.outer(t.float(), freqs)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class SinusoidalEmbedding(nn.Module):
    """:func:`timestep_embedding` followed by a two-layer MLP with SiLU."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer(
            "freqs", torch.exp(-math.log(10_000.0) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2)),
            persistent=False,
        )
        self.mlp = nn.Sequential(nn.Linear(2 * (dim // 2), out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        args = torch.outer(t.to(self.freqs.dtype), self.freqs)
        return self.mlp(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
