"""Denoiser networks: ``unet``, a compact convolutional U-Net for images
(Ho et al. 2020, App. B, with the refinements of Nichol & Dhariwal 2021)."""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, ValidationInfo, field_validator
from torch import Tensor, nn

from diffkit import BuildContext, Component, Params, hookimpl
from diffkit.errors import ComponentLookupError
from diffkit.nn import SinusoidalEmbedding

_Positive = Annotated[int, Field(ge=1, le=64)]
_Pixels = Annotated[int, Field(ge=1, le=65_536)]


class UNetParams(Params):
    """A U-Net: residual blocks whose GroupNorm is scaled and shifted by the time (and
    label) embedding, downsampling and upsampling paths joined by skip connections, and
    multi-head self-attention at chosen resolutions."""

    channels: int = Field(16, ge=4, le=4096, description="Channels of the first level; level i has channels × channel_mult[i].")
    channel_mult: tuple[_Positive, ...] = Field(
        (1, 2),
        min_length=1,
        max_length=8,
        description="Channel multiplier of each level; every level after the first halves the resolution,"
        " so H and W must be divisible by 2^(levels − 1).",
    )
    num_res_blocks: int = Field(1, ge=1, le=16, description="Residual blocks per level on the way down (one more on the way up).")
    attention_resolutions: tuple[_Pixels, ...] | None = Field(
        None,
        max_length=16,
        description="Feature-map heights, in pixels, at which self-attention follows each residual block"
        " (e.g. [14] for 28×28 images); null means the lowest resolution only, [] means no attention.",
    )
    num_heads: int = Field(4, ge=1, le=256, description="Attention heads; must divide channels.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout inside each residual block.")
    num_classes: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Condition on class labels 0..num_classes−1 (index num_classes is the reserved"
        " 'no label' of classifier-free guidance); null trains an unconditional network.",
    )
    norm_groups: int | None = Field(
        None, ge=1, le=4096, description="GroupNorm groups; must divide channels. null takes the largest divisor of channels up to 32."
    )

    @field_validator("num_heads")
    @classmethod
    def _heads_divide(cls, v: int, info: ValidationInfo) -> int:
        ch = info.data.get("channels")
        if ch is not None and ch % v:
            raise ValueError(f"num_heads ({v}) must divide channels ({ch}) so that every head has the same width")
        return v

    @field_validator("norm_groups")
    @classmethod
    def _groups_divide(cls, v: int | None, info: ValidationInfo) -> int | None:
        ch = info.data.get("channels")
        if v is not None and ch is not None and ch % v:
            raise ValueError(f"norm_groups ({v}) must divide channels ({ch}); e.g. {_default_groups(ch)}, or null to choose automatically")
        return v

    @property
    def groups(self) -> int:
        """The GroupNorm group count; it divides channels and so every level's width."""
        return _default_groups(self.channels) if self.norm_groups is None else self.norm_groups


def _default_groups(channels: int) -> int:
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


# -- fitting the network to the data ---------------------------------------------------


def _max_levels(size: int) -> int:
    """1 + the number of times ``size`` halves exactly."""
    levels = 1
    while size % 2 == 0 and size > 1:
        size //= 2
        levels += 1
    return levels


def resolutions(params: UNetParams, height: int) -> list[int]:
    """The feature-map heights of the levels, from the input's down to the lowest."""
    return [height >> i for i in range(len(params.channel_mult))]


def _attention_at(params: UNetParams, height: int) -> set[int]:
    if params.attention_resolutions is None:
        return {resolutions(params, height)[-1]}
    return set(params.attention_resolutions)


def fit_problems(params: UNetParams, shape: tuple[int, ...], what: str = "the data") -> list[str]:
    """What keeps a U-Net with these parameters from taking samples of ``shape``."""
    if len(shape) != 3:
        return [
            f"the unet denoiser needs images of shape (C, H, W), but {what} has samples of shape {tuple(shape)};"
            " use an image dataset, or the mlp denoiser for vectors"
        ]
    _, h, w = shape
    levels = len(params.channel_mult)
    factor = 2 ** (levels - 1)
    if h % factor or w % factor:
        most = min(_max_levels(h), _max_levels(w))
        example = list(params.channel_mult[:most])
        return [
            f"channel_mult has {levels} levels, which downsample {factor}×; {h}×{w} images allow at most"
            f" {most} level{'s' if most > 1 else ''} (e.g. channel_mult: {example})"
        ]
    occurring = resolutions(params, h)
    unused = sorted(set(params.attention_resolutions or ()) - set(occurring), reverse=True)
    if unused:
        return [
            f"attention_resolutions has {', '.join(map(str, unused))}, which never occur{'s' if len(unused) == 1 else ''}:"
            f" with channel_mult of {levels} level{'s' if levels > 1 else ''}, {h}×{w} images have feature maps of"
            f" height {', '.join(map(str, occurring))}; choose among those"
        ]
    return []


def check(params: UNetParams, spec: Any) -> list[str]:
    """Cross-check against the data section: a known sample shape must be (C, H, W) with
    H and W divisible by the total downsampling, and attention at resolutions that occur."""
    from diffkit.spec import data_shape

    try:
        shape = data_shape(spec.data)
    except ComponentLookupError:  # a dataset unknown to the process-wide registry: shape unknown
        return []
    if shape is None:
        return []
    return fit_problems(params, shape, f"data '{spec.data.type}'")


# -- the network -------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GN → SiLU → conv, then AdaGN: GN(h)·(1 + scale) + shift with (scale, shift) from
    the embedding, → SiLU → dropout → conv, plus a skip (Nichol & Dhariwal 2021, Sec. 3)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb(F.silu(e)), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three n d) h w -> three b n (h w) d", three=3, n=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b n (h w) d -> b (n d) h w", h=h, w=w))


class Stage(nn.Module):
    """A residual block, followed by self-attention where the resolution asks for it."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, params: UNetParams, attend: bool) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, params.dropout, params.groups)
        self.attn = Attention(c_out, params.num_heads, params.groups) if attend else None

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.res(x, e)
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, stride=2, padding=1))


class Upsample(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch, so each block starts as the
    identity (Nichol & Dhariwal 2021, following Goyal et al. 2017)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class UNet(nn.Module):
    """ε_θ(x_t, t) for images ``[B, C, H, W]``.

    The time embedding is the sinusoidal embedding of t through a two-layer MLP
    (Ho et al. 2020, App. B). With ``num_classes`` set, a label embedding is added to
    it; index ``num_classes`` is the reserved "no label" used by classifier-free guidance.
    """

    def __init__(self, sample_shape: tuple[int, ...], params: UNetParams, num_classes: int | None = None) -> None:
        super().__init__()
        problems = fit_problems(params, sample_shape)
        if problems:
            raise ValueError(problems[0])
        c_data, height, _ = sample_shape
        base, levels = params.channels, len(params.channel_mult)
        emb_dim = 4 * base
        attend = _attention_at(params, height)
        self.levels = levels
        self.num_classes = num_classes
        self.time = SinusoidalEmbedding(base, emb_dim)
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.inp = nn.Conv2d(c_data, base, 3, padding=1)

        ch, res, skips = base, height, [base]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(params.channel_mult):
            stages = nn.ModuleList()
            for _ in range(params.num_res_blocks):
                stages.append(Stage(ch, base * mult, emb_dim, params, res in attend))
                ch = base * mult
                skips.append(ch)
            self.down.append(stages)
            if level < levels - 1:
                self.downsample.append(Downsample(ch))
                skips.append(ch)
                res //= 2

        self.mid = nn.ModuleList([Stage(ch, ch, emb_dim, params, res in attend), Stage(ch, ch, emb_dim, params, False)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(params.channel_mult))):
            stages = nn.ModuleList()
            for _ in range(params.num_res_blocks + 1):
                stages.append(Stage(ch + skips.pop(), base * mult, emb_dim, params, res in attend))
                ch = base * mult
            self.up.append(stages)
            if level > 0:
                self.upsample.append(Upsample(ch))
                res *= 2

        self.out = nn.Sequential(nn.GroupNorm(params.groups, ch), nn.SiLU(), _zero(nn.Conv2d(ch, c_data, 3, padding=1)))

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        factor = 2 ** (self.levels - 1)
        if x_t.shape[-2] % factor or x_t.shape[-1] % factor:
            raise ValueError(f"this U-Net downsamples {factor}×; H and W must be divisible by {factor}, got {tuple(x_t.shape[-2:])}")
        e = self.time(t)
        if self.label is not None:  # a missing or negative label means "no label"
            null = t.new_full(t.shape, self.num_classes)
            e = e + self.label(null if cond is None else torch.where(cond >= 0, cond, null))

        h = self.inp(x_t)
        skips = [h]
        for level, stages in enumerate(self.down):
            for stage in stages:
                h = stage(h, e)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        for stage in self.mid:
            h = stage(h, e)
        for level, stages in enumerate(self.up):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), e)
            if level < len(self.upsample):
                h = self.upsample[level](h)
        return self.out(h)


def unet(params: UNetParams, ctx: BuildContext) -> UNet:
    if not ctx.sample_shape:
        raise ValueError("the unet denoiser needs the data's sample shape (C, H, W) to be known")
    return UNet(tuple(ctx.sample_shape), params, params.num_classes)


@hookimpl
def diffkit_denoisers() -> list[Component]:
    return [
        Component(
            "unet",
            unet,
            UNetParams,
            "U-Net with AdaGN residual blocks and self-attention (Ho et al. 2020; Nichol & Dhariwal 2021).",
            check=check,
        )
    ]
