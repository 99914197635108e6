"""Pictures: scatter plots of points and the loss curve."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from diffkit.checkpoint import atomic_write  # noqa: E402

__all__ = ["scatter", "loss_curve"]


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
