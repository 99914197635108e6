"""Pictures: scatter plots of points and the loss curve."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from diffkit.checkpoint import atomic_write  # noqa: E402

__all__ = ["scatter", "loss_curve", "image_grid", "frames", "to_uint8_grid"]


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    out = atomic_write(path, lambda p: fig.savefig(p, format=fmt, dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return out


def scatter(samples: Tensor, path: str | Path, reference: Tensor | None = None, title: str | None = None) -> Path:
    """Samples as a scatter plot (the first two coordinates), beside the data if given."""
    panels = [("data", reference), ("samples", samples)] if reference is not None else [("samples", samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False, sharex=True, sharey=True)
    for ax, (name, pts) in zip(axes[0], panels):
        pts = pts.detach().reshape(pts.shape[0], -1).cpu().numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue" if name == "samples" else "0.4", linewidths=0)
        ax.set_title(f"{name} (n = {len(pts):,})")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def loss_curve(history: Sequence[dict[str, Any]], path: str | Path, title: str = "training loss") -> Path:
    """The logged training loss against the step, on a log scale."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], color="tab:blue", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def to_uint8_grid(images: Tensor, nrow: int, padding: int = 1) -> Tensor:
    """Images in [−1, 1], shape ``[N, C, H, W]``, tiled into one ``[C', H', W']`` uint8 grid."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, pad_value=1.0, normalize=True, value_range=(-1, 1))
    return (grid * 255).round().to(torch.uint8)


def image_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Images in [−1, 1] as one PNG grid (``nrow`` images per row; square by default),
    each pixel enlarged ``scale`` times so small images stay visible."""
    from PIL import Image

    n = images.shape[0]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    grid = to_uint8_grid(images, nrow)
    array = grid.permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda p: img.save(p, format="PNG"))


def frames(
    states: Tensor,
    labels: Sequence[str],
    path: str | Path,
    title: str,
    reference: Tensor | None = None,
) -> Path:
    """A strip of states, one column per entry of ``labels``: ``states`` is
    ``[F, N, C, H, W]`` (images: N rows of F columns) or ``[F, N, D]`` (points: F scatter panels)."""
    F_, n = states.shape[0], states.shape[1]
    if states.ndim == 5:
        grid_imgs = states.transpose(0, 1).reshape(F_ * n, *states.shape[2:])
        grid = to_uint8_grid(grid_imgs, nrow=F_).permute(1, 2, 0).numpy()
        h, w = states.shape[-2:]
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * F_ * w / 8), max(2, 0.9 * n * h / 8) + 0.6))
        ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray", interpolation="nearest")
        step = grid.shape[1] / F_
        ax.set_xticks([step * (i + 0.5) for i in range(F_)], labels, fontsize=8)
        ax.set_yticks([])
        ax.set_title(title)
        return _save(fig, path)
    fig, axes = plt.subplots(1, F_, figsize=(2.6 * F_, 2.8), squeeze=False, sharex=True, sharey=True)
    for ax, state, label in zip(axes[0], states, labels):
        pts = state.reshape(n, -1).cpu().numpy()
        if reference is not None:
            ref = reference.reshape(reference.shape[0], -1).cpu().numpy()
            ax.scatter(ref[:, 0], ref[:, 1], s=1, color="0.8", linewidths=0)
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.6, color="tab:blue", linewidths=0)
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
    fig.suptitle(title)
    return _save(fig, path)
