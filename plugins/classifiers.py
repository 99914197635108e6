"""Noise-aware classifiers p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, Sec. 4).

Each is called ``classifier(x_t, t) -> logits [batch, classes]``, as the pipeline
expects of a guidance's ``classifier``: an MLP for points and flattened data, and for
images the downsampling half of the U-Net (the same residual blocks, conditioned on t
through AdaGN) followed by global average pooling, as Dhariwal & Nichol's classifier is.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffkit.nn import SinusoidalEmbedding
from diffkit_plugins.unet import Downsample, ResBlock

__all__ = ["MLPClassifier", "EncoderClassifier", "noisy_classifier"]


class _Block(nn.Module):
    """LayerNorm → Linear (+ time embedding) → SiLU → Linear, with a residual connection."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb(e)))


class MLPClassifier(nn.Module):
    """Logits of p_φ(y | x_t, t) for data of any shape, flattened to a vector: a residual
    MLP with the sinusoidal time embedding added inside every block."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.inp = nn.Linear(math.prod(sample_shape), width)
        self.time = SinusoidalEmbedding(64, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        e = F.silu(self.time(t))
        h = self.inp(rearrange(x_t, "b ... -> b (...)"))
        for block in self.blocks:
            h = block(h, e)
        return self.out(h)


class EncoderClassifier(nn.Module):
    """Logits of p_φ(y | x_t, t) for images ``[B, C, H, W]``: the U-Net's downsampling path
    (residual blocks with AdaGN time conditioning, width × 2^min(level, 2) channels, halving the
    resolution between levels), then GroupNorm, SiLU, global average pooling and a linear
    layer (Dhariwal & Nichol 2021, Sec. 4, with mean pooling in place of attention pooling)."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int) -> None:
        super().__init__()
        channels = sample_shape[0]
        emb_dim = 4 * width
        groups = max(g for g in range(1, min(32, width) + 1) if width % g == 0)
        self.num_classes = num_classes
        self.time = SinusoidalEmbedding(width, emb_dim)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        self.down = nn.ModuleList()
        ch = width
        for level in range(depth):
            out = width * 2 ** min(level, 2)
            self.blocks.append(ResBlock(ch, out, emb_dim, 0.0, groups))
            ch = out
            self.down.append(Downsample(ch) if level < depth - 1 else nn.Identity())
        self.head = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU())
        self.out = nn.Linear(ch, num_classes)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        e = self.time(t)
        h = self.inp(x_t)
        for block, down in zip(self.blocks, self.down):
            h = down(block(h, e))
        return self.out(self.head(h).mean(dim=(-2, -1)))


def noisy_classifier(
    sample_shape: tuple[int, ...], num_classes: int, width: int, depth: int, data_kind: str = "points"
) -> nn.Module:
    """The classifier that suits the data: the convolutional encoder for images
    ``(C, H, W)``, the MLP for everything else."""
    if data_kind == "images" and len(sample_shape) == 3:
        return EncoderClassifier(tuple(sample_shape), num_classes, width, depth)
    return MLPClassifier(tuple(sample_shape), num_classes, width, depth)
