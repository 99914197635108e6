"""Denoiser networks: ``mlp``, a residual MLP for points and flattened images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from diffkit import BuildContext, Component, Params, hookimpl
from diffkit.nn import SinusoidalEmbedding


class MLPParams(Params):
    """A residual MLP with a sinusoidal time embedding added inside every block."""

    hidden: int = Field(128, ge=8, le=65_536, description="Width of the hidden layers.")
    depth: int = Field(3, ge=1, le=64, description="Number of residual blocks.")
    time_dim: int = Field(64, ge=4, le=4096, description="Size of the sinusoidal time embedding.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside each block.")
    num_classes: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Condition on class labels 0..num_classes−1 (index num_classes is the reserved"
        " 'no label' of classifier-free guidance); null trains an unconditional network.",
    )


class _Block(nn.Module):
    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        z = F.silu(self.fc1(self.norm(h)) + self.emb(e))
        return h + self.fc2(self.drop(z))


class MLPDenoiser(nn.Module):
    """ε_θ(x_t, t) for data of any shape, flattened to a vector.

    With ``num_classes`` set, a label embedding is added to the time embedding; index
    ``num_classes`` is the reserved "no label" used by classifier-free guidance.
    """

    def __init__(self, sample_shape: tuple[int, ...], params: MLPParams, num_classes: int | None = None) -> None:
        super().__init__()
        dim = math.prod(sample_shape)
        self.inp = nn.Linear(dim, params.hidden)
        self.time = SinusoidalEmbedding(params.time_dim, params.hidden)
        self.label = nn.Embedding(num_classes + 1, params.hidden) if num_classes else None
        self.num_classes = num_classes
        self.blocks = nn.ModuleList(_Block(params.hidden, params.dropout) for _ in range(params.depth))
        self.out = nn.Sequential(nn.LayerNorm(params.hidden), nn.SiLU(), nn.Linear(params.hidden, dim))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        e = F.silu(self.time(t))
        if self.label is not None:  # a missing or negative label means "no label"
            null = t.new_full(t.shape, self.num_classes)
            e = e + self.label(null if cond is None else torch.where(cond >= 0, cond, null))
        h = self.inp(rearrange(x_t, "b ... -> b (...)"))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h).reshape(x_t.shape)


def mlp(params: MLPParams, ctx: BuildContext) -> MLPDenoiser:
    if not ctx.sample_shape:
        raise ValueError("the mlp denoiser needs the data's sample shape to be known")
    return MLPDenoiser(ctx.sample_shape, params, params.num_classes)


@hookimpl
def diffkit_denoisers() -> list[Component]:
    return [Component("mlp", mlp, MLPParams, "Residual MLP with a sinusoidal time embedding.")]
