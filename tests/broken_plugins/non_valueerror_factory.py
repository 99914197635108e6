"""A random-Fourier-feature MLP for points only. Its factory refuses images with a
ValueError (a spec error, as it should) but fails on points of many coordinates with an
IndexError (a fault in the plugin)."""
import math

import torch
from pydantic import Field
from torch import nn

from diffkit import Component, Params, hookimpl

DIFFKIT_API_VERSION = 2


class FourierParams(Params):
    features: int = Field(16, ge=2, le=4096, description="Random Fourier features of the input.")
    hidden: int = Field(32, ge=1, le=4096, description="Width of the hidden layer.")


class FourierMLP(nn.Module):
    def __init__(self, dim: int, p: FourierParams) -> None:
        super().__init__()
        self.register_buffer("freq", torch.randn(dim, p.features, generator=torch.Generator().manual_seed(0)))
        self.net = nn.Sequential(nn.Linear(2 * p.features + 1, p.hidden), nn.SiLU(), nn.Linear(p.hidden, dim))

    def forward(self, x, c, cond=None):
        z = 2 * math.pi * x @ self.freq
        h = torch.cat([z.sin(), z.cos(), c.float()[:, None] / 1000], dim=1)
        return self.net(h)


def fourier_mlp(p: FourierParams, ctx):
    if len(ctx.sample_shape) != 1:
        raise ValueError(f"fourier-mlp serves points [D] only, and this data has samples of shape {ctx.sample_shape}")
    scales = [1.0, 0.5, 0.25, 0.125]
    _ = scales[ctx.sample_shape[0]]  # the planted bug: an IndexError for D >= 4
    return FourierMLP(ctx.sample_shape[0], p)


@hookimpl
def diffkit_denoisers():
    return [Component("fourier-mlp", fourier_mlp, FourierParams, "Random Fourier features and an MLP (points).")]
